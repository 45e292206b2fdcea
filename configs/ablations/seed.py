"""The noise floor: the default point pretrained with three seeds (initialization, masks,
data order). Differences between other points smaller than this spread are not findings.

  python -m mae_jax.sweep configs/ablations/seed.py --workdir workdirs/ablations
"""
from configs.ablations import common


def get_sweep():
  return common.sweep("seed", axes={"seed": [0, 1, 2]})
