"""The math of the MAE, and nothing of training, data or tools.

  patches    patchify / unpatchify
  posembed   fixed 2D sin-cos position tables
  masking    the noise-field masking strategies (random, block, grid, center)
  kernels    how the layers compute (matmul, attention, remat, unroll): one Kernels
             object, chosen for the platform where the program is built
  vit        attention, MLP, block, block stack and Encoder: the one ViT encoder
  mae        MaskedAutoencoder (encoder over visible patches, light decoder), the loss
  sizes      the size table ("Ti/16", "B/16", ...) and build_model
"""
