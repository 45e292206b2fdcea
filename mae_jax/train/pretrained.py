"""Pretrained MAE params from either place they live: a train.py workdir or a converted
checkpoint (`python -m mae_jax.convert import ...`).

  pre = pretrained.load("workdirs/demo")          # latest checkpoint of a run
  pre = pretrained.load("out/mae_visualize_large")  # an imported official / HF model
  out = pre.model.apply({"params": pre.params}, normalized_images, rngs={"mask": rng})

Only the params are read, never the optimizer state, in their training layout on `mesh`;
converted checkpoints take ImageNet's mean and std, a workdir its dataset's."""
import dataclasses
import functools

import jax
import ml_collections
import optax
import orbax.checkpoint as ocp

from mae_jax import data, paths
from mae_jax.model import sizes
from mae_jax.train import checkpoints, param_dirs, program, sharding, train_step as ts, workdirs
from mae_jax.data.source import KNOWN_STATS
from mae_jax.model.mae import MaskedAutoencoder

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


def is_workdir(path):
  return paths.isfile(paths.join(path, "config.json"))


def load(path, step=None, mesh=None):
  """The model, params and input statistics stored at `path`; the params in their
  training layout on `mesh` (None: the first device)."""
  if param_dirs.is_params_dir(path):
    return load_converted(path, mesh)
  return load_workdir(path, step, mesh)  # model_of refuses a path that holds neither


def model_of(path, platform=None):
  """(model, the run's config or None) stored at `path`, without reading any params; its
  kernels are those of `platform` (None: the platform of jax.devices())."""
  platform = platform or jax.devices()[0].platform
  if param_dirs.is_params_dir(path):
    fields = param_dirs.read_meta(path)["model"]
    math = {k: v for k, v in fields.items() if k not in sizes.COMPUTE_FIELDS + ("platform",)}
    return MaskedAutoencoder(**math, kernels=sizes.kernels_of(fields, platform)), None
  if is_workdir(path):
    config = ml_collections.ConfigDict(workdirs.load_config_dict(path))
    try:
      return sizes.build_model(config, platform), config
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise PretrainedError(f"{path}/config.json: does not describe a model "
                            f"({type(e).__name__}: {e}); expected train.py's config") from None
  raise PretrainedError(f"{path}: neither a train.py workdir (config.json + checkpoints/) "
                        "nor a converted checkpoint (model.json + params/)")


def init_params(model, rng):
  """The params a pretraining run seeded with `rng` starts from (ts.init_state's)."""
  image_shape = (model.image_size, model.image_size, model.channels)
  return ts.init_state(model, optax.identity(), rng, image_shape).params


def abstract_params(model, mesh=None):
  """ShapeDtypeStructs of the params, in their training layout on `mesh` (None: first device)."""
  abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, sharding.state_shardings(abstract, mesh or one_device_mesh()))


def one_device_mesh():
  """The mesh of params loaded without one: the first device."""
  return sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1}), jax.devices()[:1])


def random_params(model, seed, mesh=None):
  """The step-0 params of a pretraining run with `seed`: the random-init baseline."""
  target = abstract_params(model, mesh)
  init = program.jit(functools.partial(init_params, model), mesh or one_device_mesh(),
                     out_shardings=jax.tree.map(lambda a: a.sharding, target))
  return init(jax.random.key(seed))


def _platform(mesh):
  return sharding.platform(mesh) if mesh is not None else None


def load_converted(path, mesh=None):
  model, _ = model_of(path, _platform(mesh))
  params, fields = param_dirs.load_params(path, target=abstract_params(model, mesh))
  meta = param_dirs.read_meta(path)
  mean, std = IMAGENET_STATS if fields["channels"] == 3 else ((0.5,), (0.5,))
  return Pretrained(model, params, mean, std, bool(meta.get("norm_pix_loss")),
                    f"converted {meta.get('source')}")


def restore_params(path, model, step=None, mesh=None):
  """(params, step) of a workdir's checkpoint (the latest where step is None): its params
  alone, after the manifest check; nothing is written, so a run still writing is left alone."""
  directory = paths.absolute(paths.join(path, "checkpoints"))
  steps = checkpoints.complete_steps(directory)
  step = (steps[-1] if steps else None) if step is None else step
  if step not in steps:
    raise PretrainedError(f"{path}: no checkpoint of step {step} in {directory} (it has "
                          f"{steps or 'none'})" if step is not None else
                          f"{path}: the workdir has no checkpoint yet")
  step_dir = paths.join(directory, str(step))
  earlier = [s for s in steps if s < step]
  hint = (f"use another step (step {earlier[-1]} is the one before)" if earlier
          else "the workdir has no other checkpoint")
  checkpoints.verify(step_dir, step, hint)
  target = {"params": abstract_params(model, mesh)}
  try:  # the step's item, read directly: nothing in the workdir is written or cleaned up
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
      restored = reader.restore(paths.join(step_dir, "default"), args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  except Exception as e:  # Orbax / TensorStore on missing or damaged files
    raise checkpoints.CheckpointError(
        f"checkpoint step {step} in {directory} cannot be restored: "
        f"{checkpoints.short_reason(e, 200)}; {hint}") from None
  checkpoints.check_finite_tree(restored["params"],
                               f"checkpoint step {step} is damaged ({step_dir})", hint=hint)
  return restored["params"], step


def load_workdir(path, step=None, mesh=None):
  model, config = model_of(path, _platform(mesh))
  params, step = restore_params(path, model, step, mesh)
  train = data.load_source(config.data, "train")
  return Pretrained(model, params, tuple(train.mean), tuple(train.std),
                    bool(config.model.norm_pix_loss), f"{path} at step {step}", config)
