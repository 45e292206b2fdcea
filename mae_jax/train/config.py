"""Config checks and derived quantities: everything decided before anything compiles."""
import dataclasses
import importlib
import json
import math
import os
import re

import jax
import ml_collections

from mae_jax import cli
from mae_jax.model import kernels, masking, sizes, vit
from mae_jax.train import logger, sharding, stages


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line naming the field."""


def _check(ok, field, message):
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def _check_choice(value, field, valid):
  _check(value in valid, field, f"{value!r} is not valid; valid values: {', '.join(map(str, valid))}")


def _is_int(x):
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
  """A finite int or float (not a bool, NaN or infinity)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(value, field, minimum, optional=False):
  _check((optional and value is None) or (_is_int(value) and value >= minimum), field,
         f"{value!r} must be an int >= {minimum}" + (" (or None)" if optional else ""))


def _check_number(value, field, minimum, *, strict=False, below=None, optional=False):
  """A finite number >= minimum (> where strict), < below where given."""
  ok = _is_number(value) and (value > minimum if strict else value >= minimum)
  ok = ok and (below is None or value < below)
  low = f"{'>' if strict else '>='} {minimum}"
  expected = f"in [{minimum}, {below})" if below is not None else low
  _check((optional and value is None) or ok, field,
         f"{value!r} must be a finite number {expected}" + (" (or None)" if optional else ""))


def validate_model(config, explicit=()):
  """Model fields: a known variant, consistent sizes, a mask that leaves patches visible.
  `explicit`: the fields given on the command line, which an error blames first."""
  m = config.model
  _check_choice(m.mask_strategy, "model.mask_strategy", sorted(masking.STRATEGIES))
  _check_choice(m.dtype, "model.dtype", sorted(sizes.DTYPES))
  _check_choice(m.remat, "model.remat", sorted(vit.REMAT_POLICIES))
  _check_choice(m.attn_impl, "model.attn_impl", [None, "xla", "cudnn"])
  _check_choice(m.matmul, "model.matmul", list(kernels.MATMULS))
  _check_choice(m.get("encoder_tokens", "visible"), "model.encoder_tokens",
                sorted(sizes.ENCODERS))
  try:
    kw = sizes.model_kwargs(m, config.data.image_size, config.data.channels)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  for field in ("width", "depth", "num_heads", "patch_size", "decoder_width", "decoder_depth",
                "decoder_heads"):
    _check_int(kw[field], f"model.{field}", 1)
  _check_int(kw["image_size"], "data.image_size", 1)
  _check_number(m.mlp_ratio, "model.mlp_ratio", 0, strict=True)
  if kw["image_size"] % kw["patch_size"]:  # blamed on the field the user set
    patch_field = "model.patch_size" if m.get("patch_size") is not None else "model.variant"
    _check(patch_field not in explicit or "data.image_size" in explicit, patch_field,
           f"{m.patch_size if patch_field == 'model.patch_size' else m.variant!r} gives patch "
           f"size {kw['patch_size']}, which does not divide data.image_size {kw['image_size']}")
    _check(False, "data.image_size", f"{kw['image_size']} is not a positive multiple of the "
           f"patch size {kw['patch_size']} ({patch_field})")
  _check(kw["width"] % 4 == 0, "model.width", f"{kw['width']} must be divisible by 4 (2D sin-cos)")
  _check(kw["decoder_width"] % 4 == 0, "model.decoder_width",
         f"{kw['decoder_width']} must be divisible by 4")
  _check(kw["width"] % kw["num_heads"] == 0, "model.num_heads",
         f"{kw['num_heads']} does not divide width {kw['width']}")
  _check(kw["decoder_width"] % kw["decoder_heads"] == 0, "model.decoder_heads",
         f"{kw['decoder_heads']} does not divide decoder_width {kw['decoder_width']}")
  _check(_is_number(m.mask_ratio) and 0 < m.mask_ratio < 1, "model.mask_ratio",
         f"{m.mask_ratio} must be in (0, 1)")
  num_patches = (kw["image_size"] // kw["patch_size"])**2
  _check(masking.num_visible(num_patches, m.mask_ratio) >= 1, "model.mask_ratio",
         f"{m.mask_ratio} leaves no visible patch out of {num_patches}")


def validate_data(config):
  """Data fields: a dataset name, channels, augmentation and its crop range."""
  d = config.data
  _check(isinstance(d.name, str) and d.name.strip() != "", "data.name",
         f"{d.name!r} must name a dataset (fashion_mnist, synthetic, folder or a TFDS name)")
  _check_choice(d.channels, "data.channels", [1, 3])
  _check_choice(d.augment, "data.augment", ["none", "crop", "crop_flip"])
  scale = d.crop_scale
  _check(isinstance(scale, (tuple, list)) and len(scale) == 2
         and all(_is_number(x) for x in scale) and 0 < scale[0] <= scale[1] <= 1,
         "data.crop_scale", f"{scale!r} must be (min, max) with 0 < min <= max <= 1")
  _check_int(d.num_workers, "data.num_workers", 0)
  _check_int(d.get("worker_processes", 0), "data.worker_processes", 0)
  _check_int(d.get("repeat_samples", 1), "data.repeat_samples", 1)
  _check_choice(d.get("resize", "auto"), "data.resize", ["auto", "host", "device"])
  _check(not _is_int(config.batch_size) or config.batch_size % d.get("repeat_samples", 1) == 0,
         "data.repeat_samples",
         f"{d.get('repeat_samples')} must divide batch_size={config.batch_size}")
  warn = d.get("input_wait_warn", 0.2)
  _check(_is_number(warn) and 0 <= warn <= 1, "data.input_wait_warn",
         f"{warn!r} must be a share of wall time in [0, 1]")
  if d.name == "synthetic":
    _check_int(d.synthetic_size, "data.synthetic_size", 1)


def validate_optim(config):
  """AdamW and schedule fields: finite, in range."""
  o = config.optim
  _check_number(o.base_lr, "optim.base_lr", 0, strict=True)
  _check_number(o.min_lr, "optim.min_lr", 0)
  _check_number(o.weight_decay, "optim.weight_decay", 0)
  _check_number(o.b1, "optim.b1", 0, below=1)
  _check_number(o.b2, "optim.b2", 0, below=1)
  _check_number(o.eps, "optim.eps", 0, strict=True)
  _check_number(o.warmup_epochs, "optim.warmup_epochs", 0)
  _check_int(o.warmup_steps, "optim.warmup_steps", 0, optional=True)
  _check_number(o.grad_clip, "optim.grad_clip", 0, strict=True, optional=True)


def validate_run(config):
  """Lengths and intervals of the run."""
  if config.num_steps is None:
    _check(_is_number(config.num_epochs) and config.num_epochs > 0, "num_epochs",
           f"{config.num_epochs!r} must be a positive number (or set num_steps)")
  _check_int(config.num_steps, "num_steps", 1, optional=True)
  _check_int(config.stop_after_steps, "stop_after_steps", 1, optional=True)
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _check_int(config[field], field, 1)
  _check_int(config.num_vis_images, "num_vis_images", 0)
  _check_int(config.get("vis_every_steps"), "vis_every_steps", 1, optional=True)
  _check_int(config.get("knn_bank_size"), "knn_bank_size", 1, optional=True)
  _check_int(config.get("knn_test_size"), "knn_test_size", 1, optional=True)
  _check_number(config.get("knn_every_epochs"), "knn_every_epochs", 0,
                optional=True)  # 0 or None: off


def validate_logging(config):
  """logging.wandb: a W&B project name or None (off), and where it is set, the wandb
  package importable (an extra, not a dependency): checked before anything compiles."""
  project = logger.wandb_project(config)
  if project is None:
    return
  _check(isinstance(project, str) and project.strip() != "", "logging.wandb",
         f"{project!r} must name a W&B project (or be None: W&B off)")
  try:
    importlib.import_module("wandb")
  except Exception as e:  # pylint: disable=broad-except (missing or broken: the same advice)
    _check(False, "logging.wandb", f"{project!r} logs to Weights & Biases, but `import wandb` "
           f"fails ({type(e).__name__}: {e}); install the extra: pip install 'mae_jax[wandb]' "
           "(or leave logging.wandb unset)")


def validate(config, num_devices=None, explicit=()):
  """Raise ConfigError on the first field that cannot work (`explicit`: the fields given on
  the command line, blamed first where two fields conflict)."""
  validate_model(config, explicit)
  validate_data(config)
  validate_optim(config)
  validate_run(config)
  mesh_shape(config.mesh, num_devices or jax.device_count())
  n = data_parallel_size(config.mesh, num_devices or jax.device_count())
  for field in ("batch_size", "eval_batch_size"):
    _check(_is_int(config[field]) and config[field] >= 1 and config[field] % n == 0, field,
           f"{config[field]} is not a positive multiple of the {n} data-parallel devices")
    _check(config[field] % jax.process_count() == 0, field,
           f"{config[field]} is not divisible by the {jax.process_count()} processes")
  accum = config.grad_accum_steps
  _check(isinstance(accum, int) and accum >= 1, "grad_accum_steps", f"{accum} must be >= 1")
  _check(config.batch_size % (accum * n) == 0, "grad_accum_steps",
         f"batch_size {config.batch_size} is not divisible into {accum} micro-batches "
         f"over the {n} data-parallel devices")


def validate_schedule(config, patch_size):
  """config.schedule (mae_jax.train.stages) for a model of `patch_size`."""
  try:
    stages.check(config, patch_size)
  except stages.ScheduleError as e:
    raise ConfigError(str(e)) from None


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
  keep = set(explicit)
  with config.unlocked():
    for path, value in SMOKE.items():
      if path not in keep:
        *parents, name = path.split(".")
        node = config
        for parent in parents:
          node = node[parent]
        node[name] = value
  return config


def check_data_size(config, num_train_examples):
  """An epoch must hold at least one full global batch."""
  _check(num_train_examples >= config.batch_size, "batch_size",
         f"{config.batch_size} is larger than the {num_train_examples} training images of "
         f"data.name={config.data.name!r} (expected at most {num_train_examples})")


# Fields that fix the shapes of the saved parameters and optimizer state: model_kwargs key
# -> config path.
SHAPE_FIELDS = {
    "width": "model.width", "depth": "model.depth", "num_heads": "model.num_heads",
    "patch_size": "model.patch_size", "mlp_ratio": "model.mlp_ratio",
    "decoder_width": "model.decoder_width", "decoder_depth": "model.decoder_depth",
    "decoder_heads": "model.decoder_heads", "image_size": "data.image_size",
    "channels": "data.channels",
}


def model_shape(config):
  """{config path: value} of the SHAPE_FIELDS of a run config (a ConfigDict, or the dict of
  a saved config.json), the variant decoded."""
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  kw = sizes.model_kwargs(config.model, config.data.image_size, config.data.channels)
  return {path: kw[key] for key, path in SHAPE_FIELDS.items()}


def check_resume(config, saved, workdir):
  """Refuse to resume `workdir` when its saved config (a dict) describes other shapes."""
  try:
    theirs = model_shape(saved)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"config: cannot compare with the run saved in {workdir}/config.json "
                      f"({type(e).__name__}: {e}); use a new --workdir") from None
  ours = model_shape(config)
  differ = [path for path in ours if ours[path] != theirs[path]]
  _check(not differ, differ[0] if differ else "", (
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


_FLAG_PROBLEMS = (  # fragments of absl / ml_collections parse errors -> what was expected
    ("invalid literal for int()", "expected an int"),
    ("could not convert string to float", "expected a float"),
    ("Non-boolean argument", "expected true or false"),
    ("is not a dict", "expected a field of it, e.g. --config.optim.base_lr=1e-4"),
    ("as a ConfigDict", "it is a group of fields; set one, e.g. --config.optim.base_lr=1e-4"),
)


def flag_error(error, argv, recipe="configs/default.py"):
  """One line for a bad --config, --config.FIELD or other flag: absl and ml_collections raise
  several kinds of error, some of them multi-line or quoted twice. `recipe` is the file an
  unknown field's message points to."""
  files = cli.recipe_files(argv, [cli.default_recipe(os.path.basename(recipe))])
  if cli.user_code_error(error, files) is not None:  # the recipe file's own code raised it
    return f"a recipe file fails to load: {cli.user_code_failure(error, files)}"
  text = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split())
  if isinstance(error, (KeyError, AttributeError)):  # an unknown --config.FIELD
    key = re.search(r"'(\w+)'", text)
    key = key.group(1) if key else text
    hint = re.search(r'Did you mean "(\w+)"', text)
    flag = next((a.split("=", 1)[0] for a in argv
                 if re.match(rf"--?config\.(\w+\.)*{re.escape(key)}(=|$)", a)), None)
    where = (flag.lstrip("-") if flag else f"config.{key}")
    return (f"{where}: unknown field {key!r}" + (f"; did you mean {hint.group(1)!r}?" if hint
                                                 else f"; see {recipe}"))
  match = re.match(r"flag --(config\.[\w.]+)=(.*?): (.*)", text)
  if match:
    field, value, problem = match.groups()
    expected = next((e for fragment, e in _FLAG_PROBLEMS if fragment in problem), problem)
    return f"{field}: {value!r} is not valid; {expected}"
  errno = re.search(r"\[Errno \d+\].*", text)
  if isinstance(error, OSError) and errno:
    return f"--config: cannot load the recipe: {errno.group(0)}"
  return text
