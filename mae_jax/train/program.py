"""The one program builder: every program trained, timed (bench), compiled ahead of time
(aot) or evaluated is jitted by `jit` (explicit shardings, the activation rules in force
while it traces). `build` makes a training program (abstract state, shardings, jitted init
and donating step); `pretraining` is the MAE's.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mae_jax.model import sizes
from mae_jax.train import config as config_lib, optim, sharding, stages as stages_lib
from mae_jax.train import train_step as ts


def jit(fn, mesh, *, in_shardings=None, out_shardings=None, donate_argnums=()):
  """`fn` jitted on `mesh` with the input and output shardings given (those not given
  follow the arguments / are XLA's choice), traced under sharding.activation_rules(mesh)."""

  def traced(*args):
    with sharding.activation_rules(mesh):
      return fn(*args)

  inner = fn.func if isinstance(fn, functools.partial) else fn
  traced.__name__ = traced.__qualname__ = getattr(inner, "__name__", "program")
  kw = {k: v for k, v in (("in_shardings", in_shardings), ("out_shardings", out_shardings))
        if v is not None}
  return jax.jit(traced, donate_argnums=donate_argnums, **kw)


@dataclasses.dataclass
class Program:
  """A training program on `mesh`.

  init: rng -> state, laid out by `state_shardings`; step: (state, batch, rng) ->
  (state, metrics), the old state donated, the batch's leaves split over every device,
  rng and metrics replicated; abstract_state: ShapeDtypeStructs with their shardings
  (a restore target, or aot's inputs)."""
  mesh: jax.sharding.Mesh
  abstract_state: Any
  state_shardings: Any
  init: Callable
  step: Callable
  batch_keys: tuple

  def abstract_batch(self, batch_size, specs):
    """The step's batch as ShapeDtypeStructs: specs = {key: (per-example shape, dtype)}."""
    rows = sharding.batch_sharding(self.mesh)
    return {k: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=rows)
            for k, (shape, dtype) in specs.items()}

  def abstract_rng(self):
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(self.mesh))

  def jit_step(self, step_fn):
    """`step_fn(state, batch, rng)` jitted as this program's step: the state in its
    shardings and donated, the batch split over every device, rng and metrics
    replicated."""
    repl = sharding.replicated(self.mesh)
    batch = {k: sharding.batch_sharding(self.mesh) for k in self.batch_keys}
    return jit(step_fn, self.mesh, in_shardings=(self.state_shardings, batch, repl),
               out_shardings=(self.state_shardings, repl), donate_argnums=0)


def build(mesh, init_fn, step_fn, batch_keys=("image", "label"), state_shardings=None):
  """The Program of `init_fn(rng) -> state` and `step_fn(state, batch, rng)`.

  state_shardings: by default sharding.state_shardings (FSDP over the mesh's fsdp axis,
  small leaves replicated); a callable of the abstract state may choose others.
  """
  abstract = jax.eval_shape(lambda: init_fn(jax.random.key(0)))  # traced: nothing compiles
  shardings = (state_shardings or sharding.state_shardings)(abstract, mesh)
  init = jit(init_fn, mesh, in_shardings=(sharding.replicated(mesh),),
             out_shardings=shardings)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  program = Program(mesh, abstract, shardings, init, None, tuple(batch_keys))
  program.step = program.jit_step(step_fn)
  return program


@dataclasses.dataclass
class Pretraining(Program):
  """The MAE pretraining program of a validated config (the trainer's, the benchmark's
  and the ahead-of-time compiler's: one program).

  `step` and `model` are those of data.image_size and model.mask_ratio (evaluation's);
  `stages` (mae_jax.train.stages) say which image size and mask ratio train each step,
  and `stage_step(stage)` is the step that trains a stage (`step` itself where the stage
  is the recipe's), jitted once per image size and mask ratio."""
  config: ml_collections.ConfigDict = None
  model: nn.Module = None
  durations: config_lib.Durations = None
  tx: optax.GradientTransformation = None
  schedule: optax.Schedule = None
  norm_stats: tuple = None  # (mean, std) per channel that the step normalizes images with
  num_params: int = 0
  stages: tuple = ()
  step_fn: Callable = None  # step_fn(model) -> the step function of that model
  _stage_steps: dict = dataclasses.field(default_factory=dict)

  def abstract_inputs(self, stage=None):
    """(state, batch, rng) of the step (of `stage`'s where given) as ShapeDtypeStructs
    carrying their shardings."""
    size = self.config.data.image_size if stage is None else stage.image_size
    shape = (size, size, self.config.data.channels)
    batch = self.abstract_batch(self.config.batch_size, {"image": (shape, jnp.uint8),
                                                         "label": ((), jnp.int32)})
    return self.abstract_state, batch, self.abstract_rng()

  def stage_model(self, stage):
    return self.model.clone(image_size=stage.image_size, mask_ratio=stage.mask_ratio)

  def stage_step(self, stage):
    """The jitted step that trains `stage` (one per image size and mask ratio)."""
    if stage.key == (self.model.image_size, self.model.mask_ratio):
      return self.step
    if stage.key not in self._stage_steps:
      self._stage_steps[stage.key] = self.jit_step(self.step_fn(self.stage_model(stage)))
    return self._stage_steps[stage.key]

  def eval_step(self, baseline_HWC):
    """ts.eval_step on the params in their training layout and a split batch."""
    fn = functools.partial(ts.eval_step, model=self.model, mean=self.norm_stats[0],
                           std=self.norm_stats[1], baseline_HWC=baseline_HWC,
                           norm_pix_loss=self.config.model.norm_pix_loss)
    return jit(fn, self.mesh, in_shardings=(self.state_shardings.params,
                                            sharding.batch_sharding(self.mesh),
                                            sharding.replicated(self.mesh)))


def pretraining(config, devices, num_train_examples, norm_stats):
  """The Pretraining program of a validated config over `devices`: the mesh, the model
  for their platform, the optimizer, the state's shardings and the jitted steps."""
  dur = config_lib.durations(config, num_train_examples)
  mesh = sharding.make_mesh(config.mesh, devices)
  model = sizes.build_model(config, sharding.platform(mesh))
  stages_lib.check(config, model.patch_size)  # sizes.check's, for callers that skip it
  tx, schedule = optim.make_optimizer(config.optim, config.batch_size, dur.warmup_steps,
                                      dur.total_steps)
  image_shape = (config.data.image_size,) * 2 + (config.data.channels,)
  init = functools.partial(ts.init_state, model, tx, image_shape=image_shape)

  def step_fn(model):  # the train step of `model` (each stage's model is its own)
    return functools.partial(
        ts.train_step, model=model, tx=tx, schedule=schedule, mean=norm_stats[0],
        std=norm_stats[1], norm_pix_loss=config.model.norm_pix_loss,
        accum_steps=config.grad_accum_steps, skip_nonfinite=config.skip_nonfinite)

  core = build(mesh, init, step_fn(model))
  num_params = sum(x.size for x in jax.tree.leaves(core.abstract_state.params))
  return Pretraining(**{f.name: getattr(core, f.name) for f in dataclasses.fields(core)},
                     config=config, model=model, durations=dur, tx=tx, schedule=schedule,
                     norm_stats=norm_stats, num_params=num_params,
                     stages=tuple(stages_lib.of(config, dur.total_steps)),
                     step_fn=step_fn)
