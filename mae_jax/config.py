"""Config checks and derived quantities: everything decided before anything compiles."""
import dataclasses
import math

import jax

from mae_jax import masking, models, vit


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line naming the field."""


def _check(ok, field, message):
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def _check_choice(value, field, valid):
  _check(value in valid, field, f"{value!r} is not valid; valid values: {', '.join(map(str, valid))}")


def validate_model(config):
  """Model fields: a known variant, consistent sizes, a mask that leaves patches visible."""
  m = config.model
  _check_choice(m.mask_strategy, "model.mask_strategy", sorted(masking.STRATEGIES))
  _check_choice(m.dtype, "model.dtype", sorted(models.DTYPES))
  _check_choice(m.remat, "model.remat", sorted(vit.REMAT_POLICIES))
  _check_choice(m.attn_impl, "model.attn_impl", [None, "xla", "cudnn"])
  try:
    kw = models.model_kwargs(m, config.data.image_size, config.data.channels)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  _check(kw["image_size"] > 0 and kw["image_size"] % kw["patch_size"] == 0, "data.image_size",
         f"{kw['image_size']} is not a positive multiple of the patch size {kw['patch_size']}")
  _check(kw["width"] % 4 == 0, "model.width", f"{kw['width']} must be divisible by 4 (2D sin-cos)")
  _check(kw["decoder_width"] % 4 == 0, "model.decoder_width",
         f"{kw['decoder_width']} must be divisible by 4")
  _check(kw["width"] % kw["num_heads"] == 0, "model.num_heads",
         f"{kw['num_heads']} does not divide width {kw['width']}")
  _check(kw["decoder_width"] % kw["decoder_heads"] == 0, "model.decoder_heads",
         f"{kw['decoder_heads']} does not divide decoder_width {kw['decoder_width']}")
  _check(kw["depth"] >= 1 and kw["decoder_depth"] >= 1, "model.depth",
         "encoder and decoder need at least one block")
  _check(0 < m.mask_ratio < 1, "model.mask_ratio", f"{m.mask_ratio} must be in (0, 1)")
  num_patches = (kw["image_size"] // kw["patch_size"])**2
  _check(masking.num_visible(num_patches, m.mask_ratio) >= 1, "model.mask_ratio",
         f"{m.mask_ratio} leaves no visible patch out of {num_patches}")


def validate(config, num_devices=None):
  """Raise ConfigError on the first field that cannot work."""
  validate_model(config)
  _check_choice(config.data.channels, "data.channels", [1, 3])
  _check_choice(config.data.augment, "data.augment", ["none", "crop", "crop_flip"])
  lo, hi = config.data.crop_scale
  _check(0 < lo <= hi <= 1, "data.crop_scale", f"{(lo, hi)} must satisfy 0 < min <= max <= 1")
  _check(config.num_steps is not None or config.num_epochs > 0, "num_epochs",
         "must be positive (or set num_steps)")
  _check(config.num_steps is None or config.num_steps >= 1, "num_steps", "must be >= 1")
  _check(config.stop_after_steps is None or config.stop_after_steps >= 1, "stop_after_steps",
         "must be >= 1")
  _check(config.optim.base_lr > 0, "optim.base_lr", "must be positive")
  _check(config.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _check(config[field] >= 1, field, f"{config[field]} must be >= 1")
  mesh_shape(config.mesh, num_devices or jax.device_count())
  n = data_parallel_size(config.mesh, num_devices or jax.device_count())
  for field in ("batch_size", "eval_batch_size"):
    _check(config[field] >= 1 and config[field] % n == 0, field,
           f"{config[field]} is not a positive multiple of the {n} data-parallel devices")
    _check(config[field] % jax.process_count() == 0, field,
           f"{config[field]} is not divisible by the {jax.process_count()} processes")
  accum = config.grad_accum_steps
  _check(isinstance(accum, int) and accum >= 1, "grad_accum_steps", f"{accum} must be >= 1")
  _check(config.batch_size % (accum * n) == 0, "grad_accum_steps",
         f"batch_size {config.batch_size} is not divisible into {accum} micro-batches "
         f"over the {n} data-parallel devices")


def mesh_shape(mesh_config, num_devices):
  """(data, fsdp) sizes; one of them may be -1 = the devices the other leaves."""
  data, fsdp = mesh_config.data, mesh_config.fsdp
  _check(not (data == -1 and fsdp == -1), "mesh", "at most one axis may be -1")
  if data == -1:
    _check(fsdp >= 1 and num_devices % fsdp == 0, "mesh.fsdp",
           f"{fsdp} does not divide the {num_devices} devices")
    data = num_devices // fsdp
  if fsdp == -1:
    _check(data >= 1 and num_devices % data == 0, "mesh.data",
           f"{data} does not divide the {num_devices} devices")
    fsdp = num_devices // data
  _check(data * fsdp == num_devices, "mesh",
         f"data={data} x fsdp={fsdp} does not cover the {num_devices} devices")
  return data, fsdp


def data_parallel_size(mesh_config, num_devices):
  """The batch is split over both mesh axes (FSDP is data parallel too)."""
  data, fsdp = mesh_shape(mesh_config, num_devices)
  return data * fsdp


@dataclasses.dataclass(frozen=True)
class Durations:
  """A run's lengths in steps, from epochs or steps, whichever the config sets."""
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int


def durations(config, num_train_examples):
  """The one place where epochs become steps."""
  steps_per_epoch = max(1, num_train_examples // config.batch_size)
  total = config.num_steps or math.ceil(config.num_epochs * steps_per_epoch)
  warmup = config.optim.warmup_steps
  if warmup is None:
    warmup = round(config.optim.warmup_epochs * steps_per_epoch)
  return Durations(steps_per_epoch, total, min(warmup, total))


def apply_smoke(config):
  """Shrink any recipe to a seconds-long check: tiny model, few steps, small batches."""
  with config.unlocked():
    config.model.update(width=32, depth=1, num_heads=2, decoder_width=32,
                        decoder_depth=1, decoder_heads=2)
    config.batch_size = 16
    config.num_steps = 4
    config.optim.warmup_steps = 1
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_batch_size = 64
    config.data.synthetic_size = 128
  return config
