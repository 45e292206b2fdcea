"""Masking ratio (paper Fig. 5: accuracy peaks near 0.75).

  python -m mae_jax.sweep configs/ablations/mask_ratio.py --workdir workdirs/ablations
"""
from configs.ablations import common


def get_sweep():
  return common.sweep("mask_ratio", axes={"model.mask_ratio": [0.1, 0.25, 0.5, 0.75, 0.9]})
