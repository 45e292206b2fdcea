"""Decoder depth in blocks (paper Table 1a).

  python -m mae_jax.sweep configs/ablations/decoder_depth.py --workdir workdirs/ablations
"""
from configs.ablations import common


def get_sweep():
  return common.sweep("decoder_depth", axes={"model.decoder_depth": [1, 2, 4, 8]})
