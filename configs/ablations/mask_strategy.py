"""Mask sampling (paper Table 1f and Fig. 6): random, block-wise, grid-wise; center is a fixed central square.

  python -m mae_jax.sweep configs/ablations/mask_strategy.py --workdir workdirs/ablations
"""
from configs.ablations import common


def get_sweep():
  return common.sweep("mask_strategy", axes={"model.mask_strategy": ["random", "block", "grid", "center"]})
