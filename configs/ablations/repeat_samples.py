"""Repeated sampling (MAE-ST's trick): k crops, flips and masks of each decoded image in a
batch, at an equal number of training samples (same steps, same batch) against k = 1.

  python -m mae_jax.sweep configs/ablations/repeat_samples.py --workdir workdirs/ablations
"""
from configs.ablations import common


def get_sweep():
  return common.sweep("repeat_samples", axes={"data.repeat_samples": [1, 2, 4]})
