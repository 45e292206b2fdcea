"""The one program builder (mae_jax.train.program): the benchmark times the trainer's program, on
8 CPU devices with data=2 x fsdp=4, and the activation rules are what makes them one."""
import collections
import functools
import re

import jax
import pytest

from helpers import tiny_config
from mae_jax import trainer
from mae_jax.tools import bench, hlo
from mae_jax.train import program, sharding, train_step as ts

MESH = {"mesh.data": 2, "mesh.fsdp": 4}


def fsdp_config():
  """A model whose big kernels (>= 4096 elements) are split over fsdp, 32 px, batch 16."""
  return tiny_config({**MESH, "model.width": 64, "model.num_heads": 2, "model.depth": 2,
                      "model.decoder_width": 64, "data.image_size": 32, "model.remat": "none",
                      "num_steps": 4})


def collectives(compiled):
  """Sorted (kind, axes, bytes, count) of a compiled program's collectives."""
  return sorted((c.kind, c.axes, c.bytes, c.count)
                for c in hlo.collectives(compiled.as_text(), (2, 4)))


def opcodes(compiled):
  """How many instructions of each opcode the compiled program has (constants aside)."""
  ops = re.findall(r"= \S+ ([a-z][\w-]*)\(", compiled.as_text())
  return collections.Counter(op for op in ops if op != "constant")


@pytest.fixture(scope="module")
def trainer_step():
  run = trainer.build_run(fsdp_config(), workdir=None)
  return run.step.lower(*run.abstract_inputs()).compile()


@pytest.mark.slow
def test_bench_step_is_the_trainers_step(trainer_step):
  """`mae_jax.bench` compiles the trainer's program: the same collectives (kind, mesh axes,
  bytes, times per step) and the same instructions; they differ only in constants (the
  data's mean and std, the schedule's length)."""
  step, state, batch, rng, _ = bench.setup(fsdp_config())
  compiled, _ = bench.compile_step(step, state, batch, rng)
  assert collectives(compiled) == collectives(trainer_step)
  assert opcodes(compiled) == opcodes(trainer_step)
  kinds = {kind for kind, axes, _, _ in collectives(trainer_step)}
  assert "all-gather" in kinds  # FSDP really gathers the split kernels


@pytest.mark.slow
def test_without_the_activation_rules_the_program_differs(trainer_step):
  """The check above can fail: the same train step jitted with the same shardings but
  outside program.jit (no activation rules) compiles to other collectives."""
  run = trainer.build_run(fsdp_config(), workdir=None)
  step = functools.partial(ts.train_step, model=run.model, tx=run.tx, schedule=run.schedule,
                           mean=run.norm_stats[0], std=run.norm_stats[1],
                           norm_pix_loss=False)
  state, batch, rng = run.abstract_inputs()
  plain = jax.jit(step, in_shardings=(run.state_shardings,
                                      {k: sharding.batch_sharding(run.mesh) for k in batch},
                                      sharding.replicated(run.mesh)),
                  out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
                  donate_argnums=0)
  assert collectives(plain.lower(state, batch, rng).compile()) != collectives(trainer_step)


def test_jit_traces_under_the_activation_rules():
  """A logical constraint is a sharding constraint in program.jit, nothing in a plain jit."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(tiny_config(MESH).mesh)
  fn = lambda x: nn.with_logical_constraint(x * 2, ("batch", None))
  x = jax.numpy.ones((16, 4))
  built = program.jit(fn, mesh, in_shardings=(sharding.replicated(mesh),))
  assert "sharding_constraint" in built.lower(x).as_text()
  assert "sharding_constraint" not in jax.jit(fn).lower(x).as_text()
  assert built.lower(x).compile().output_shardings.spec == jax.sharding.PartitionSpec(
      sharding.BATCH_AXES)
