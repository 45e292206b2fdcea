"""One matrix product at a time, jitted JAX against torch.mm, on the train steps' shapes.

  python benchmarks/matmul_solo.py                      # the shapes below
  python benchmarks/matmul_solo.py --shape 1576x1536x512 --transpose_b

Each shape MxKxN is timed as `a @ b` (a: M x K, b: K x N) or, with --transpose_b, as
`a @ b.T` (b stored N x K, the layout of an input gradient `g @ W.T`), float32, inputs
rotated among 8 sets so no run reuses the last one's operands, medians of --repeats
calls, the two libraries interleaved shape by shape. The rates are what the kernels reach
alone; `benchmarks/profile_step.py --by_matmul` shows what they reach inside a train step.
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

# The input-gradient products of the ViT-S/16 and ViT-Ti/4 steps (docs/benchmarks.md).
SHAPES = ("1576x1536x512", "1576x2048x512", "1576x512x2048", "400x1536x384",
          "1088x768x192", "1088x192x768")


def median_seconds(calls, repeats):
  for call in calls[:2]:
    call()
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    calls[i % len(calls)]()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", action="append", help="MxKxN, repeatable; default: SHAPES")
  p.add_argument("--transpose_b", action="store_true", help="time a @ b.T, b stored N x K")
  p.add_argument("--repeats", type=int, default=24)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  args = p.parse_args(argv)
  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  product = jax.jit((lambda a, b: a @ b.T) if args.transpose_b else (lambda a, b: a @ b))
  rates = {}
  print(f"{'M x K x N':>16} {'JAX GFLOP/s':>12} {'torch GFLOP/s':>14}")
  for shape in args.shape or SHAPES:
    m, k, n = map(int, shape.split("x"))
    b_shape = (n, k) if args.transpose_b else (k, n)
    pairs = [(rng.standard_normal((m, k), np.float32), rng.standard_normal(b_shape, np.float32))
             for _ in range(8)]
    jax_pairs = [tuple(map(jnp.asarray, pair)) for pair in pairs]
    torch_pairs = [tuple(map(torch.from_numpy, pair)) for pair in pairs]
    jax_calls = [lambda a=a, b=b: product(a, b).block_until_ready() for a, b in jax_pairs]
    torch_calls = [(lambda a=a, b=b: a @ b.T) if args.transpose_b else (lambda a=a, b=b: a @ b)
                   for a, b in torch_pairs]
    gflop = 2 * m * k * n / 1e9
    rates[shape] = (gflop / median_seconds(jax_calls, args.repeats),
                    gflop / median_seconds(torch_calls, args.repeats))
    print(f"{shape:>16} {rates[shape][0]:12.1f} {rates[shape][1]:14.1f}", flush=True)
  return rates


if __name__ == "__main__":
  main()
