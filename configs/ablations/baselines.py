"""The ViT MAE against a convolutional masked autoencoder (configs/conv_mae.py: pixel
masking at 0.5, Conv 32-64-128, sigmoid output, whole-image MSE), same data and budget.

  python -m mae_jax.sweep configs/ablations/baselines.py --workdir workdirs/ablations
"""
from configs.ablations import common


def get_sweep():
  return common.sweep("baselines", points=[
      {"label": "vit_mae", "program": "mae"},
      {"label": "conv_mae", "program": "conv"},
  ])
