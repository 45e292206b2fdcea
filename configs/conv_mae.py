"""Baseline recipe for `python -m mae_jax.conv_mae`: a convolutional masked autoencoder.

Element-wise random pixel masking (ratio 0.5, masked pixels set to 0), Conv 32-64-128 with
2 x 2 max-pooling, mirrored with nearest-neighbour upsampling to a sigmoid output, MSE over
the whole image. Same data, batch, schedule shape and optimizer as configs/default.py, so
the two can be compared point for point (python -m mae_jax.sweep runs both).
Override any field: --config.model.mask_ratio=0.25 --config.num_steps=200.
"""
from ml_collections import config_dict


def get_config():
  c = config_dict.ConfigDict()
  c.seed = 0

  c.data = config_dict.ConfigDict()
  c.data.name = "fashion_mnist"
  c.data.data_dir = config_dict.placeholder(str)
  c.data.manual_dir = config_dict.placeholder(str)
  c.data.image_size = 28  # a multiple of 2 ** (len(model.features) - 1)
  c.data.channels = 1
  c.data.augment = "crop_flip"  # none | crop | crop_flip
  c.data.crop_scale = (0.2, 1.0)
  c.data.num_workers = 0
  c.data.synthetic_size = 4096
  c.data.train_examples = config_dict.placeholder(int)

  c.model = config_dict.ConfigDict()
  c.model.features = (32, 64, 128)  # encoder conv widths; a 2x2 max-pool between them
  c.model.mask_ratio = 0.5          # probability that a pixel is zeroed

  c.batch_size = 128
  c.num_epochs = 2.0
  c.num_steps = config_dict.placeholder(int)

  c.optim = config_dict.ConfigDict()  # AdamW, lr = base_lr * batch / 256, warmup + cosine
  c.optim.base_lr = 2e-3
  c.optim.min_lr = 0.0
  c.optim.warmup_epochs = 0.25
  c.optim.warmup_steps = config_dict.placeholder(int)
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = config_dict.placeholder(float)

  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1

  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.stop_after_steps = config_dict.placeholder(int)  # leave after this many steps; resumable
  c.allow_config_change = False  # True: resume a run launched with other values
  c.eval_batch_size = 512
  # A Weights & Biases project that gets the scalars too (configs/default.py); None = off.
  c.logging = config_dict.ConfigDict()
  c.logging.wandb = config_dict.placeholder(str)
  return c
