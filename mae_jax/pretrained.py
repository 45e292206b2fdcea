"""Pretrained MAE params from either place they live: a train.py workdir or a converted
checkpoint (`python -m mae_jax.convert import ...`).

  pre = pretrained.load("workdirs/demo")          # latest checkpoint of a run
  pre = pretrained.load("out/mae_visualize_large")  # an imported official / HF model
  out = pre.model.apply({"params": pre.params}, normalized_images, rngs={"mask": rng})

A workdir gives its model from config.json and the params of its latest (or a chosen)
Orbax checkpoint; the optimizer state is not read into memory beyond what Orbax needs.
Converted checkpoints were trained on ImageNet, so their inputs use ImageNet's mean and
std; a workdir's inputs use its dataset's.
"""
import dataclasses
import functools
import os

import jax
import ml_collections

from mae_jax import checkpoint, data, models, optim
from mae_jax import train_step as ts
from mae_jax.data.source import KNOWN_STATS
from mae_jax.mae import MaskedAutoencoder

IMAGENET_STATS = KNOWN_STATS["imagenet2012"]


class PretrainedError(ValueError):
  """A path that holds neither a training workdir nor a converted checkpoint."""


@dataclasses.dataclass
class Pretrained:
  model: MaskedAutoencoder
  params: dict
  mean: tuple  # per-channel input normalization on [0, 1] pixels
  std: tuple
  norm_pix_loss: bool
  description: str
  config: ml_collections.ConfigDict | None = None  # the run's config (workdirs only)


def is_converted(path):
  from mae_jax import convert
  return os.path.isfile(os.path.join(path, convert.META_FILE))


def is_workdir(path):
  return os.path.isfile(os.path.join(path, "config.json"))


def load(path, step=None):
  """The model, params and input statistics stored at `path` (see the module doc)."""
  if is_converted(path):
    return load_converted(path)
  if is_workdir(path):
    return load_workdir(path, step)
  raise PretrainedError(f"{path}: neither a train.py workdir (config.json + checkpoints/) "
                        "nor a converted checkpoint (model.json + params/)")


def load_converted(path):
  from mae_jax import convert  # its readers are optional; loading our own format is not
  params, fields = convert.load_params(path)
  meta = convert.read_meta(path)
  mean, std = IMAGENET_STATS if fields["channels"] == 3 else ((0.5,), (0.5,))
  return Pretrained(MaskedAutoencoder(**fields), params, mean, std,
                    bool(meta.get("norm_pix_loss")), f"converted {meta.get('source')}")


def load_workdir(path, step=None):
  config = ml_collections.ConfigDict(checkpoint.load_config_dict(path))
  model = models.build_model(config)
  tx, _ = optim.make_optimizer(config.optim, config.batch_size, 1, 2)  # only its structure
  image_shape = (config.data.image_size,) * 2 + (config.data.channels,)
  abstract = jax.eval_shape(functools.partial(ts.init_state, model, tx,
                                              image_shape=image_shape), jax.random.key(0))
  ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints"), keep=1, every_steps=1,
                                 async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise PretrainedError(f"{path}: the workdir has no checkpoint yet")
    state = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  train = data.load_source(config.data, "train")
  return Pretrained(model, state.params, tuple(train.mean), tuple(train.std),
                    bool(config.model.norm_pix_loss), f"{path} at step {step}", config)
