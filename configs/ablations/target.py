"""Reconstruction target (paper Table 1d): pixels, or pixels normalized per patch.

  python -m mae_jax.sweep configs/ablations/target.py --workdir workdirs/ablations
"""
from configs.ablations import common


def get_sweep():
  return common.sweep("target", axes={"model.norm_pix_loss": [False, True]})
