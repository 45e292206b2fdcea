"""Config checks and derived quantities: everything decided before anything compiles."""
import dataclasses
import importlib
import json
import math

import jax

from mae_jax import checks
from mae_jax.train import logger, sharding


ConfigError = checks.ConfigError  # what every check below raises


def validate_data(config):
  """Data fields: a dataset name, channels, augmentation and its crop range."""
  d = config.data
  checks.check(isinstance(d.name, str) and d.name.strip() != "", "data.name",
               f"{d.name!r} must name a dataset (fashion_mnist, synthetic, folder or a TFDS name)")
  checks.check_choice(d.channels, "data.channels", [1, 3])
  checks.check_choice(d.augment, "data.augment", ["none", "crop", "crop_flip"])
  scale = d.crop_scale
  checks.check(isinstance(scale, (tuple, list)) and len(scale) == 2
               and all(checks.is_number(x) for x in scale) and 0 < scale[0] <= scale[1] <= 1,
               "data.crop_scale", f"{scale!r} must be (min, max) with 0 < min <= max <= 1")
  checks.check_int(d.num_workers, "data.num_workers", 0)
  checks.check_int(d.get("worker_processes", 0), "data.worker_processes", 0)
  checks.check_int(d.get("repeat_samples", 1), "data.repeat_samples", 1)
  checks.check_choice(d.get("resize", "auto"), "data.resize", ["auto", "host", "device"])
  repeat = d.get("repeat_samples", 1)
  checks.check(not checks.is_int(config.batch_size) or config.batch_size % repeat == 0,
               "data.repeat_samples",
               f"{repeat} must divide batch_size={config.batch_size}")
  warn = d.get("input_wait_warn", 0.2)
  checks.check(checks.is_number(warn) and 0 <= warn <= 1, "data.input_wait_warn",
               f"{warn!r} must be a share of wall time in [0, 1]")
  if d.name == "synthetic":
    checks.check_int(d.synthetic_size, "data.synthetic_size", 1)


def validate_optim(config):
  """AdamW and schedule fields: finite, in range."""
  o = config.optim
  for field, kw in (("base_lr", {"strict": True}), ("min_lr", {}), ("weight_decay", {}),
                    ("b1", {"below": 1}), ("b2", {"below": 1}), ("eps", {"strict": True}),
                    ("warmup_epochs", {}), ("grad_clip", {"strict": True, "optional": True})):
    checks.check_number(o[field], f"optim.{field}", 0, **kw)
  checks.check_int(o.warmup_steps, "optim.warmup_steps", 0, optional=True)


def validate_run(config):
  """Lengths and intervals of the run."""
  if config.num_steps is None:
    checks.check(checks.is_number(config.num_epochs) and config.num_epochs > 0, "num_epochs",
                 f"{config.num_epochs!r} must be a positive number (or set num_steps)")
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    checks.check_int(config[field], field, 1)
  for field in ("num_steps", "stop_after_steps", "vis_every_steps", "knn_bank_size",
                "knn_test_size"):
    checks.check_int(config.get(field), field, 1, optional=True)
  checks.check_int(config.num_vis_images, "num_vis_images", 0)
  checks.check_number(config.get("knn_every_epochs"), "knn_every_epochs", 0,
                      optional=True)  # 0 or None: off


def validate_logging(config):
  """logging.wandb: a W&B project name or None (off), and where it is set, the wandb
  package importable (an extra, not a dependency): checked before anything compiles."""
  project = logger.wandb_project(config)
  if project is None:
    return
  checks.check(isinstance(project, str) and project.strip() != "", "logging.wandb",
               f"{project!r} must name a W&B project (or be None: W&B off)")
  try:
    importlib.import_module("wandb")
  except Exception as e:  # pylint: disable=broad-except (missing or broken: the same advice)
    checks.check(False, "logging.wandb", f"{project!r} logs to Weights & Biases, but `import "
                 f"wandb` fails ({type(e).__name__}: {e}); install the extra: pip install "
                 "'mae_jax[wandb]' (or leave logging.wandb unset)")


def validate(config, num_devices=None):
  """Raise ConfigError on the first field of the data, optimizer, run and mesh that cannot
  work; the model's fields are mae_jax.model.sizes.check's."""
  validate_data(config)
  validate_optim(config)
  validate_run(config)
  n = data_parallel_size(config.mesh, num_devices or jax.device_count())  # checks the mesh
  for field in ("batch_size", "eval_batch_size"):
    size = config[field]
    checks.check(checks.is_int(size) and size >= 1 and size % n == 0, field,
                 f"{size} is not a positive multiple of the {n} data-parallel devices")
    checks.check(size % jax.process_count() == 0, field,
                 f"{size} is not divisible by the {jax.process_count()} processes")
  accum = config.grad_accum_steps
  checks.check(isinstance(accum, int) and accum >= 1, "grad_accum_steps", f"{accum} must be >= 1")
  checks.check(config.batch_size % (accum * n) == 0, "grad_accum_steps",
               f"batch_size {config.batch_size} is not divisible into {accum} micro-batches "
               f"over the {n} data-parallel devices")


def mesh_shape(mesh_config, num_devices):
  """(data, fsdp) sizes of config.mesh over `num_devices`, checked (sharding.mesh_shape)."""
  try:
    return sharding.mesh_shape(mesh_config.data, mesh_config.fsdp, num_devices)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None


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


def smoke_replaced(before, after):
  """'field before -> after' of the fields apply_smoke changed (a run says what it did)."""
  ours, theirs = flatten(json.loads(after.to_json_best_effort())), flatten(
      json.loads(before.to_json_best_effort()))
  return [f"{f} {theirs[f]!r} -> {ours[f]!r}" for f in sorted(ours)
          if f in theirs and theirs[f] != ours[f]]


# What smoke=True sets: a tiny model, a few steps, small batches. {config path: value}.
SMOKE = {
    "model.width": 32, "model.depth": 1, "model.num_heads": 2, "model.decoder_width": 32,
    "model.decoder_depth": 1, "model.decoder_heads": 2, "batch_size": 16, "num_steps": 4,
    "optim.warmup_steps": 1, "log_every_steps": 1, "checkpoint_every_steps": 2,
    "eval_batch_size": 64, "data.synthetic_size": 128,
}


def apply_smoke(config, explicit=()):
  """Shrink any recipe to a seconds-long check. Fields named in `explicit` (the ones given
  on the command line, e.g. --config.num_steps=20) keep their values."""
  with config.unlocked():
    config.update_from_flattened_dict({k: v for k, v in SMOKE.items() if k not in explicit})
  return config


def check_data_size(config, num_train_examples):
  """An epoch must hold at least one full global batch."""
  checks.check(num_train_examples >= config.batch_size, "batch_size",
               f"{config.batch_size} is larger than the {num_train_examples} training images of "
               f"data.name={config.data.name!r} (expected at most {num_train_examples})")


def check_resume(config, saved, workdir, model_shape):
  """Refuse to resume `workdir` when its saved config (a dict) describes other shapes
  (`model_shape`: config or dict -> {config path: value}, mae_jax.model.sizes.model_shape)."""
  try:
    theirs = model_shape(saved)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"config: cannot compare with the run saved in {workdir}/config.json "
                      f"({type(e).__name__}: {e}); use a new --workdir") from None
  ours = model_shape(config)
  differ = [path for path in ours if ours[path] != theirs[path]]
  checks.check(not differ, differ[0] if differ else "", (
      f"the checkpoints in {workdir} are of another model ("
      + "; ".join(f"{p} {theirs[p]!r} there, {ours[p]!r} here" for p in differ)
      + f"); resume with the values in {workdir}/config.json or use a new --workdir"))


# Fields that steer one launch without changing what the run computes: a resume may
# change them freely (the mesh and kernels change only float rounding).
LAUNCH_FIELDS = frozenset({
    "stop_after_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "num_vis_images", "vis_every_steps", "knn_every_epochs", "knn_bank_size", "knn_test_size",
    "allow_config_change", "data.num_workers", "logging.wandb",
    "mesh.data", "mesh.fsdp", "model.remat", "model.attn_impl", "model.matmul",
    "model.unroll",
    # the same for the evaluation jobs (mae_jax.evaluate): fine-tuning's remat policy and
    # how often it tests the classifier
    "remat", "eval_every_epochs",
})


def flatten(tree, prefix=""):
  """{'optim.base_lr': value, ...} of a nested dict."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def changed_fields(config, saved):
  """[(field, saved value, this value)] of the fields (LAUNCH_FIELDS aside) in which a run
  config differs from the saved one (a dict). Fields the saved config lacks (added to the
  recipes after it was written) are not compared."""
  ours = flatten(json.loads(config.to_json_best_effort()))
  theirs = flatten(saved)
  return [(f, theirs[f], ours.get(f)) for f in sorted(theirs)
          if f not in LAUNCH_FIELDS and f in ours and ours[f] != theirs[f]]


def check_config_change(config, saved, workdir):
  """Refuse to resume with values other than the previous launch's, unless
  config.allow_config_change; returns the changes (a line for the log) or None."""
  changes = changed_fields(config, saved)
  if not changes:
    return None
  listed = "; ".join(f"{f} {a!r} there, {b!r} here" for f, a, b in changes)
  if not config.get("allow_config_change", False):
    raise ConfigError(
        f"config: the run in {workdir} was launched with other values ({listed}); resume "
        "with its values, set --config.allow_config_change=True to go on with these "
        f"(each launch's config is kept in {workdir}/configs/), or use a new --workdir")
  return f"config changed on resume (allow_config_change): {listed}"
