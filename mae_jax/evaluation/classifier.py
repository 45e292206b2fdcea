"""The MAE encoder as a classifier for fine-tuning (paper Sec. A.3).

Parameter names are the MaskedAutoencoder's (`patch_embed`, `cls_token`, `blocks/layers/...`,
`norm`), so a pretrained encoder loads as it is; the decoder is dropped. Heads: global
average pooling of the patch tokens + LayerNorm (`fc_norm`, the reference's default; the
encoder's final `norm` is then unused) or the cls token after `norm`.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mae_jax import patches, posembed
from mae_jax.mae import token_init
from mae_jax.vit import BlockStack, Dense, dense, layer_norm

POOLS = ("avg", "cls")
ENCODER_LEAVES = ("patch_embed", "cls_token", "blocks")  # + "norm" with pool="cls"


class ViTClassifier(nn.Module):
  """Images (B, H, W, C), normalized -> logits (B, num_classes) float32."""
  num_classes: int
  image_size: int
  patch_size: int
  channels: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  pool: str = "avg"          # avg: mean of patch tokens + fc_norm; cls: cls token + norm
  drop_path: float = 0.0     # stochastic depth of the last block (linear from 0)
  head_init_std: float = 2e-5  # the reference's fine-tuning head init
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"
  unroll: bool = False
  attn_impl: str | None = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.patch_embed = dense(self.width, "patch_embed", **kw)
    self.cls_token = self.param("cls_token", token_init, (1, 1, self.width), self.param_dtype)
    self.blocks = BlockStack(self.depth, self.num_heads, int(self.width * self.mlp_ratio),
                             remat=self.remat, unroll=self.unroll, attn_impl=self.attn_impl,
                             drop_path=self.drop_path, **kw)
    if self.pool == "cls":
      self.norm = layer_norm("norm", **kw)
    else:
      self.fc_norm = layer_norm("fc_norm", **kw)
    self.head = Dense(self.num_classes,
                      kernel_init=nn.initializers.truncated_normal(self.head_init_std),
                      dtype=self.dtype, param_dtype=self.param_dtype, name="head")

  def features(self, images_BHWC, train=False):
    """Pooled, normalized encoder features (B, width): what the head sees."""
    grid = (self.image_size // self.patch_size,) * 2
    pos_TD = posembed.sincos_2d(self.width, grid)
    x_BND = self.patch_embed(patches.patchify(images_BHWC.astype(self.dtype), self.patch_size))
    x_BND = x_BND + pos_TD[1:].astype(self.dtype)
    cls_B1D = jnp.broadcast_to((self.cls_token + pos_TD[:1]).astype(self.dtype),
                               (x_BND.shape[0], 1, self.width))
    x_BTD = self.blocks(jnp.concatenate([cls_B1D, x_BND], axis=1), deterministic=not train)
    if self.pool == "cls":
      return self.norm(x_BTD)[:, 0]
    return self.fc_norm(x_BTD[:, 1:].mean(axis=1))

  def __call__(self, images_BHWC, train=False):
    """Logits (B, num_classes) float32; train=True turns drop path on ('dropout' RNG)."""
    return self.head(self.features(images_BHWC, train)).astype(jnp.float32)


def from_mae(mae_model, num_classes, pool="avg", drop_path=0.0):
  """The classifier over `mae_model`'s encoder (same sizes and compute options)."""
  fields = ("image_size", "patch_size", "channels", "width", "depth", "num_heads", "mlp_ratio",
            "dtype", "param_dtype", "remat", "unroll", "attn_impl")
  return ViTClassifier(num_classes=num_classes, pool=pool, drop_path=drop_path,
                       **{f: getattr(mae_model, f) for f in fields})


def load_encoder(params, mae_params, pool):
  """`params` of a ViTClassifier with the encoder leaves taken from MAE params."""
  names = ENCODER_LEAVES + (("norm",) if pool == "cls" else ())
  return {**params, **{name: mae_params[name] for name in names}}
