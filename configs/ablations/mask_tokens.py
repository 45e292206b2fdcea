"""Mask tokens in the encoder (paper Table 1c, 2): visible patches only, or all with [M] ("w/ [M]"), with its speed.

  python -m mae_jax.sweep configs/ablations/mask_tokens.py --workdir workdirs/ablations
"""
from configs.ablations import common


def get_sweep():
  return common.sweep("mask_tokens", axes={"model.encoder_tokens": ["visible", "all"]})
