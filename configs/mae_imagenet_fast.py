"""The ImageNet recipe (configs/mae_imagenet.py: ViT-L/16, 800 epochs, batch 4096) with
progressive resolution: 112 px for the first half of the steps, 160 px to 80 %, then the
paper's 224 px (mae_jax.train.stages). The patch grid is 7 x 7, 10 x 10 and 14 x 14:
49, 100 and 196 patches, 12, 25 and 49 of them visible to the encoder. The learning-rate
schedule, masks and data order are the fixed recipe's functions of (seed, step); each
stage compiles once. Evaluation (and the kNN monitor) stay at 224 px.

Check that every stage fits a slice before renting it:
  python -m mae_jax.aot --topology v5p:4x4x4 --config configs/mae_imagenet_fast.py
Time each stage on the devices at hand:
  python -m mae_jax.bench --config configs/mae_imagenet_fast.py --config.batch_size=256
Train (as configs/mae_imagenet.py):
  python train.py --config configs/mae_imagenet_fast.py --workdir DIR \
    --config.data.data_dir=~/tensorflow_datasets --config.data.manual_dir=DIR_WITH_TARS
"""
from configs import mae_imagenet


def get_config():
  c = mae_imagenet.get_config()
  c.schedule.resolution = ((0.0, 112), (0.5, 160), (0.8, 224))
  return c
