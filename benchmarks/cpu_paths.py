"""The library's CPU code paths against the plain formulation, in one process.

  python benchmarks/cpu_paths.py --path matmul --variant Ti/4 --image_size 32 \
      --batch_size 64 --decoder_width 128 --decoder_depth 4 --decoder_heads 4 --remat full
  python benchmarks/cpu_paths.py --path gelu ...   # the same model flags

Takes `python -m mae_jax.bench`'s flags and compiles the MAE train step twice: as the
library builds it, and with one path swapped for the plain one. `--path matmul`: every
Dense layer's product through `vit.token_matmul` (its backward pass written for the CPU)
against plain `jnp.dot`, whose gradient XLA derives itself. `--path gelu`: `vit.gelu`
(the erf form) against `jax.nn.gelu(approximate=False)` (the erfc form).
`--classifier` times the fine-tuning classifier's forward + backward pass instead (the
encoder of the same flags, 10 classes, no optimizer). The two programs run in interleaved
rounds, so load from other processes hits both alike; medians of the pooled step times.
"""
import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mae_jax import bench, vit
from mae_jax.evaluation import classifier


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
  model = classifier.from_mae(bench.build_model(config), num_classes=10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(config.batch_size, d.image_size, d.image_size,
                                   d.channels)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, config.batch_size))
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
  grad = jax.jit(jax.grad(loss))
  return lambda: jax.block_until_ready(grad(params))


def jax_gelu(x):
  return jax.nn.gelu(x, approximate=False)


# --path -> (module attribute read while tracing, the plain version, names of both programs)
PATHS = {"matmul": ("token_matmul", jnp.dot, ("autodiff jnp.dot", "token_matmul")),
         "gelu": ("gelu", jax_gelu, ("jax.nn.gelu erfc", "vit.gelu erf"))}


def build_pair(path, config, build):
  """{name: step callable}, the plain program first; each compiled and warmed up, and the
  library's function back in place afterwards."""
  attr, plain_fn, names = PATHS[path]
  library_fn = getattr(vit, attr)
  runners = {}
  try:
    for name, fn in zip(names, (plain_fn, library_fn)):
      setattr(vit, attr, fn)
      runners[name] = build(config)
      for _ in range(2):  # compile + warm up
        runners[name]()
  finally:
    setattr(vit, attr, library_fn)
  return runners


def main(argv):
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--path", choices=sorted(PATHS), default="matmul")
  p.add_argument("--classifier", action="store_true")
  p.add_argument("--rounds", type=int, default=5)
  extra, rest = p.parse_known_args(argv)
  args = bench.parse_args(rest)
  config = bench.bench_config(args)
  build = classifier_grad if extra.classifier else mae_step
  runners = build_pair(extra.path, config, build)
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
  plain, library = PATHS[extra.path][2]
  print(f"speedup {medians[plain] / medians[library]:.2f}x "
        f"({len(times[library])} steps each, {extra.rounds} rounds)")
  return medians


if __name__ == "__main__":
  main(sys.argv[1:])
