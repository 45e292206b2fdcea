"""Decoder width (paper Table 1b); 4 heads each.

  python -m mae_jax.sweep configs/ablations/decoder_width.py --workdir workdirs/ablations
"""
from configs.ablations import common


def get_sweep():
  return common.sweep("decoder_width", axes={"model.decoder_width": [32, 64, 128]})
