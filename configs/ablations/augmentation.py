"""Data augmentation (paper Table 1e): none, random-resized crop, crop + flip.

  python -m mae_jax.sweep configs/ablations/augmentation.py --workdir workdirs/ablations
"""
from configs.ablations import common


def get_sweep():
  return common.sweep("augmentation", axes={"data.augment": ["none", "crop", "crop_flip"]})
