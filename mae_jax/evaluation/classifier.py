"""The MAE encoder as a classifier for fine-tuning (paper Sec. A.3): the MAE's own
`vit.Encoder`, so a pretrained encoder loads by its parameter names, with average pooling +
`fc_norm` (the reference's default) or the cls token after `norm`, and a linear head.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mae_jax.model.kernels import Kernels
from mae_jax.model.vit import DEFAULT_KERNELS, ENCODER_FIELDS, dense, encoder_of, layer_norm

POOLS = ("avg", "cls")
POS_EMBEDS = ("learned", "fixed")  # the fine-tuning config's finetune.pos_embed
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
  learned_pos_embed: bool = False  # train `pos_embed` (from the sin-cos table) or keep it fixed
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernels: Kernels = DEFAULT_KERNELS  # how it computes: the MAE's (from_mae)

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = encoder_of(self, drop_path=self.drop_path,
                              learned_pos_embed=self.learned_pos_embed)
    nn.share_scope(self, self.encoder)  # the encoder's parameters at the top level
    if self.pool == "avg":
      self.fc_norm = layer_norm("fc_norm", **kw)
    self.head = dense(self.num_classes, "head", kernels=self.kernels,
                      kernel_init=nn.initializers.truncated_normal(self.head_init_std), **kw)

  def features(self, images_BHWC, train=False):
    """Pooled, normalized encoder features (B, width): what the head sees."""
    enc = self.encoder
    x_BTD = enc.prepend_cls(enc.embed(images_BHWC))
    if self.pool == "cls":
      return enc(x_BTD, deterministic=not train)[:, 0]
    x_BTD = enc.transform(x_BTD, deterministic=not train)
    return self.fc_norm(x_BTD[:, 1:].mean(axis=1))

  def __call__(self, images_BHWC, train=False):
    """Logits (B, num_classes) float32; train=True turns drop path on ('dropout' RNG)."""
    return self.head(self.features(images_BHWC, train)).astype(jnp.float32)


def from_mae(mae_model, num_classes, pool="avg", drop_path=0.0, learned_pos_embed=False):
  """The classifier over `mae_model`'s encoder (same sizes and compute options)."""
  return ViTClassifier(num_classes=num_classes, pool=pool, drop_path=drop_path,
                       learned_pos_embed=learned_pos_embed,
                       **{f: getattr(mae_model, f) for f in ENCODER_FIELDS})


def load_encoder(params, mae_params, pool):
  """`params` of a ViTClassifier with the encoder leaves taken from MAE params (a learned
  `pos_embed` keeps its initialization, the sin-cos table the MAE used)."""
  names = ENCODER_LEAVES + (("norm",) if pool == "cls" else ())
  return {**params, **{name: mae_params[name] for name in names}}


def count_correct(logits_BC, labels_B, valid_B):
  """Correctly classified valid examples of a batch (int32 scalar)."""
  return ((logits_BC.argmax(-1) == labels_B) & valid_B).sum()
