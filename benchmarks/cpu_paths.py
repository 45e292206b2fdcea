"""The CPU matmul kernel against XLA's own, in one process.

  python benchmarks/cpu_paths.py --config.model.variant=Ti/4 --config.data.image_size=32 \
      --config.batch_size=64 --config.model.decoder_width=128 --config.model.decoder_depth=4 \
      --config.model.decoder_heads=4 --config.model.remat=full --config.model.dtype=float32

Takes `python -m mae_jax.bench`'s flags (a recipe and its --config.FIELD overrides) and compiles the MAE train step twice, once with
`model.matmul=xla` (every Dense product a plain dot whose gradient XLA derives itself) and
once with `model.matmul=cpu` (`kernels.token_matmul`, its backward pass written for XLA's
CPU backend, what `auto` picks on CPU devices). `--classifier` times the fine-tuning
classifier's forward + backward pass instead (the encoder of the same flags, 10 classes, no
optimizer). The two programs run in interleaved rounds, so load from other processes hits
both alike; medians of the pooled step times. (The erf-form GELU was measured the same way
before it became the only one: docs/benchmarks.md.)
"""
import argparse
import copy
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mae_jax.evaluation import classifier
from mae_jax.model import sizes
from mae_jax.tools import bench


def mae_step(config):
  """A callable running one train step (the state carried inside)."""
  step, state, batch, rng, _ = bench.setup(config)
  compiled, _ = bench.compile_step(step, state, batch, rng)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch, rng)
    jax.block_until_ready((holder[0], metrics))
  return run


def classifier_grad(config):
  """A callable running the classifier's forward + backward pass on a fixed batch."""
  d = config.data
  model = classifier.from_mae(sizes.build_model(config, "cpu"), num_classes=10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(config.batch_size, d.image_size, d.image_size,
                                   d.channels)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, config.batch_size))
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
  grad = jax.jit(jax.grad(loss))
  return lambda: jax.block_until_ready(grad(params))


# model.matmul of each program, the plain one first
PROGRAMS = {"autodiff jnp.dot": "xla", "token_matmul": "cpu"}


def build_pair(config, build):
  """{name: step callable}, the plain program first; each compiled and warmed up."""
  runners = {}
  for name, matmul in PROGRAMS.items():
    variant = copy.deepcopy(config)
    with variant.unlocked():
      variant.model.matmul = matmul
    runners[name] = build(variant)
    for _ in range(2):  # compile + warm up
      runners[name]()
  return runners


def main(argv):
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--classifier", action="store_true")
  p.add_argument("--rounds", type=int, default=5)
  extra, rest = p.parse_known_args(argv)
  args = bench.parse_args(rest)
  config = bench.bench_config(args)
  build = classifier_grad if extra.classifier else mae_step
  runners = build_pair(config, build)
  times = {name: [] for name in runners}
  per_round = max(1, args.steps // extra.rounds)
  for _ in range(extra.rounds):
    for name, run in runners.items():
      for _ in range(per_round):
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
  medians = {name: float(np.median(t)) for name, t in times.items()}
  for name, s in medians.items():
    print(f"{name:18s} {s:.3f} s/step  {config.batch_size / s:8.1f} images/s")
  plain, library = PROGRAMS
  print(f"speedup {medians[plain] / medians[library]:.2f}x "
        f"({len(times[library])} steps each, {extra.rounds} rounds)")
  return medians


if __name__ == "__main__":
  main(sys.argv[1:])
