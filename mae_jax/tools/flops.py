"""Analytic FLOPs per image of a MaskedAutoencoder, forward and training.

Conventions (those of model-FLOPs utilization, PaLM App. B):
  * a multiply-add is 2 FLOPs; only matrix products are counted: every linear layer
    (patch embed, qkv, proj, MLP, decoder embed, prediction head) and attention's
    QK^T and AV. Norms, softmax, GELU, masking, the loss and the optimizer are left out
    (a few % at ViT sizes; the test against XLA's cost analysis bounds the gap);
  * training = 3 x forward (the backward pass computes gradients with respect to both
    activations and weights, 2 x forward); recomputation by remat is not counted, so
    the same model and batch have the same FLOPs under every remat policy;
  * the encoder runs on 1 + K tokens (cls + visible, K = int(N * (1 - mask_ratio))),
    the decoder on 1 + N tokens and the prediction head on all 1 + N decoder tokens,
    as `MaskedAutoencoder` computes them. `encoder_tokens="all"` counts the variant
    whose encoder sees all 1 + N tokens (mask tokens in the encoder, paper Table 2).
"""
from mae_jax.model import masking

# How many tokens the encoder processes: (num_patches N, num_visible K) -> tokens.
ENCODER_TOKENS = {
    "visible": lambda n, k: 1 + k,  # MAE: cls + visible patches
    "all": lambda n, k: 1 + n,      # cls + every patch (masked ones as mask tokens)
}


def linear_flops(tokens, d_in, d_out):
  """A dense layer applied to `tokens` vectors: 2 * tokens * d_in * d_out."""
  return 2 * tokens * d_in * d_out


def attention_flops(tokens, width):
  """QK^T and AV over all heads: 2 * (2 * T * T * width)."""
  return 2 * (2 * tokens * tokens * width)


def block_flops(tokens, width, mlp_dim):
  """One pre-LN transformer block: qkv, QK^T, AV, proj, fc1, fc2."""
  return (linear_flops(tokens, width, 3 * width) + attention_flops(tokens, width)
          + linear_flops(tokens, width, width) + 2 * linear_flops(tokens, width, mlp_dim))


def forward_breakdown(model, encoder_tokens="visible"):
  """Forward FLOPs per image by part, for a MaskedAutoencoder (or anything with its fields)."""
  if encoder_tokens not in ENCODER_TOKENS:
    raise ValueError(f"encoder_tokens={encoder_tokens!r}; valid: {sorted(ENCODER_TOKENS)}")
  n = (model.image_size // model.patch_size)**2
  t_enc = ENCODER_TOKENS[encoder_tokens](n, masking.num_visible(n, model.mask_ratio))
  d, dd = model.width, model.decoder_width
  pixels = model.patch_size**2 * model.channels
  return {
      "patch_embed": linear_flops(n, pixels, d),
      "encoder": model.depth * block_flops(t_enc, d, int(d * model.mlp_ratio)),
      "decoder_embed": linear_flops(t_enc, d, dd),
      "decoder": model.decoder_depth * block_flops(1 + n, dd, int(dd * model.mlp_ratio)),
      "decoder_pred": linear_flops(1 + n, dd, pixels),
  }


def forward_flops(model, encoder_tokens="visible"):
  """Forward FLOPs per image."""
  return sum(forward_breakdown(model, encoder_tokens).values())


def train_flops(model, encoder_tokens="visible"):
  """Training FLOPs per image: 3 x forward (see the module docstring)."""
  return 3 * forward_flops(model, encoder_tokens)
