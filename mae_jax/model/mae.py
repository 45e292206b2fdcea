"""The Masked Autoencoder (He et al. 2021): encoder on visible patches, light decoder.

`MaskedAutoencoder.__call__` reconstructs (pretraining); `encode` gives features of the
whole unmasked image (evaluation). `mae_loss` is the per-patch MSE over masked patches.
"""
import flax.linen as nn
import jax.numpy as jnp

from mae_jax.model import masking, patches, posembed
from mae_jax.model.vit import BlockStack, Layer, dense, encoder_of, layer_norm, token_init


class MaskedAutoencoder(Layer):
  """MAE over (B, H, W, C) normalized images; parameter names follow the reference."""
  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  width: int = 768           # encoder width
  depth: int = 12            # encoder blocks
  num_heads: int = 12
  mlp_ratio: float = 4.0
  decoder_width: int = 512   # the paper's default decoder: 8 blocks x 512, 16 heads
  decoder_depth: int = 8
  decoder_heads: int = 16
  mask_ratio: float = 0.75
  mask_strategy: str = "random"

  @property
  def grid_size(self):
    return (self.image_size // self.patch_size,) * 2

  @property
  def num_patches(self):
    return self.grid_size[0] * self.grid_size[1]

  def setup(self):
    self.encoder = encoder_of(self)
    nn.share_scope(self, self.encoder)  # the encoder's parameters at the top level
    self.decoder_embed = dense(self.decoder_width, "decoder_embed", **self.ops)
    self.mask_token = self.param("mask_token", token_init, (1, 1, self.decoder_width),
                                 self.param_dtype)
    self.decoder_blocks = BlockStack(self.decoder_depth, self.decoder_heads,
                                     int(self.decoder_width * self.mlp_ratio), **self.ops)
    self.decoder_norm = layer_norm("decoder_norm", self.dtype, self.param_dtype)
    self.decoder_pred = dense(self.patch_size**2 * self.channels, "decoder_pred", **self.ops)

  def mask(self, batch, noise_BN=None):
    """masking.mask_from_noise's (keep_idx (B, K), mask (B, N), restore_idx (B, N)).
    Without `noise`, it is drawn from the 'mask' RNG stream by `mask_strategy`."""
    if noise_BN is None:
      noise_BN = masking.make_noise(self.mask_strategy, self.make_rng("mask"), batch,
                                    self.grid_size, self.mask_ratio)
    return masking.mask_from_noise(noise_BN, masking.num_visible(self.num_patches,
                                                                 self.mask_ratio))

  def encode_masked(self, images_BHWC, noise_BN=None):
    """Encoder on the visible patches only: (latent (B, 1+K, D) with the cls token first,
    mask (B, N), restore_idx (B, N))."""
    x_BND = self.encoder.embed(images_BHWC)
    keep_idx_BK, mask_BN, restore_idx_BN = self.mask(x_BND.shape[0], noise_BN)
    x_BKD = masking.gather_tokens(x_BND, keep_idx_BK)
    return self.encoder(self.encoder.prepend_cls(x_BKD)), mask_BN, restore_idx_BN

  def encode(self, images_BHWC):
    """Features of the whole unmasked image: (B, 1+N, D), cls token first."""
    return self.encoder(self.encoder.prepend_cls(self.encoder.embed(images_BHWC)))

  def decode(self, latent_BTD, restore_idx_BN):
    """Decoder: embed, append mask tokens, unshuffle, + pos-embed, blocks -> (B, N, p*p*C)."""
    b, n = restore_idx_BN.shape
    x = self.decoder_embed(latent_BTD)
    fill = jnp.broadcast_to(self.mask_token.astype(self.dtype),
                            (b, n + 1 - x.shape[1], self.decoder_width))
    x_BND = masking.gather_tokens(jnp.concatenate([x[:, 1:], fill], axis=1), restore_idx_BN)
    x = jnp.concatenate([x[:, :1], x_BND], axis=1)
    x = x + posembed.sincos_2d(self.decoder_width, self.grid_size).astype(self.dtype)
    x = self.decoder_norm(self.decoder_blocks(x))
    return self.decoder_pred(x)[:, 1:].astype(jnp.float32)

  def __call__(self, images_BHWC, noise_BN=None):
    """Reconstruct: returns {'pred': (B, N, p*p*C) float32, 'mask': (B, N), 'restore_idx'}."""
    latent, mask_BN, restore_idx_BN = self.encode_masked(images_BHWC, noise_BN)
    pred = self.decode(latent, restore_idx_BN)
    return {"pred": pred, "mask": mask_BN, "restore_idx": restore_idx_BN}


class AllTokensMAE(MaskedAutoencoder):
  """The paper's "w/ [M]" variant (Table 1c, 2): the encoder sees all 1 + N tokens.

  Masked patches enter the encoder as a learned mask token (+ pos-embed); the decoder gets
  the encoder's N patch tokens in patch order. Same loss, masks and decoder as MAE, so the
  step-time ratio against MaskedAutoencoder is the cost of not dropping masked tokens.
  `encode` (evaluation) is MaskedAutoencoder's: the whole image, no mask tokens.
  """

  def setup(self):
    super().setup()
    self.encoder_mask_token = self.param("encoder_mask_token", token_init,
                                         (1, 1, self.width), self.param_dtype)

  def __call__(self, images_BHWC, noise_BN=None):
    x_BND = self.encoder.embed(images_BHWC)
    b, n = x_BND.shape[:2]
    _, mask_BN, _ = self.mask(b, noise_BN)
    fill = (self.encoder_mask_token + self.encoder.position_table()[1:]).astype(self.dtype)
    x_BND = jnp.where(mask_BN[:, :, None] > 0, fill, x_BND)
    latent = self.encoder(self.encoder.prepend_cls(x_BND))
    identity_BN = jnp.broadcast_to(jnp.arange(n), (b, n))
    return {"pred": self.decode(latent, identity_BN), "mask": mask_BN,
            "restore_idx": identity_BN}


# model.encoder_tokens -> the model class: what the encoder processes during pretraining.
ENCODERS = {"visible": MaskedAutoencoder, "all": AllTokensMAE}


def patch_targets(images_BHWC, patch_size, norm_pix_loss):
  """Reconstruction targets (B, N, p*p*C), float32. With norm_pix_loss each patch is
  normalized by its own mean and (unbiased, as the reference's torch.var) variance, eps 1e-6
  (paper Sec. 3, "Reconstruction target")."""
  target = patches.patchify(images_BHWC.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / (var + 1e-6)**0.5
  return target


def mae_loss(pred_BNP, target_BNP, mask_BN):
  """Per-patch MSE averaged over masked patches only (float32 scalar)."""
  per_patch_BN = jnp.mean(jnp.square(pred_BNP.astype(jnp.float32) - target_BNP), axis=-1)
  return jnp.sum(per_patch_BN * mask_BN) / jnp.sum(mask_BN)
