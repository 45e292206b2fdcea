"""Where the time of one compiled train step goes: per-op totals from a JAX profiler trace.

  python benchmarks/profile_step.py --variant Ti/4 --image_size 32 --batch_size 64 \
      --decoder_width 128 --decoder_depth 4 --decoder_heads 4 [--unroll]

Takes `python -m mae_jax.bench`'s flags, compiles its train step, runs a few warm-up
steps, traces --steps more with jax.profiler and prints, per op kind (an XLA op name
without its numeric suffix: ynn_fusion = an XNNPACK matmul fusion, copy_bitcast_fusion = a
layout copy, ...), the milliseconds per step summed over all threads, and the count. The
trace stays in --trace_dir for TensorBoard / Perfetto.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

import jax

from mae_jax import bench

# Trace events that wrap ops rather than being ops.
WRAPPERS = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool")


def op_totals(trace_dir):
  """{op kind: (total microseconds, count)} over the Perfetto trace in trace_dir."""
  # The newest trace: jax.profiler adds a run directory per trace and keeps the old ones.
  path = max(glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True),
             key=os.path.getmtime)
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals, counts = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(WRAPPERS):
      kind = re.sub(r"\.\d+$", "", e["name"])
      totals[kind] += e.get("dur", 0)
      counts[kind] += 1
  return {k: (totals[k], counts[k]) for k in totals}


def main(argv):
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--trace_dir", default="/tmp/mae_jax_profile")
  p.add_argument("--profile_steps", type=int, default=3, help="traced steps")
  extra, rest = p.parse_known_args(argv)
  steps = extra.profile_steps
  args = bench.parse_args(rest)
  config = bench.bench_config(args)
  step, state, batch, rng, _ = bench.setup(config)
  compiled, compile_s = bench.compile_step(step, state, batch, rng)
  state, times = bench.run_steps(compiled, state, batch, rng, max(args.warmup, 2))
  jax.profiler.start_trace(extra.trace_dir, create_perfetto_trace=True)
  state, times = bench.run_steps(compiled, state, batch, rng, steps)
  jax.profiler.stop_trace()
  totals = op_totals(extra.trace_dir)
  all_ms = sum(t for t, _ in totals.values()) / steps / 1e3
  step_ms = sorted(times)[len(times) // 2] * 1e3
  print(f"compile {compile_s:.1f} s; traced step {step_ms:.0f} ms (median of {steps}); "
        f"op time summed over threads {all_ms:.0f} ms/step")
  print(f"{'ms/step':>9} {'share':>6} {'count':>6}  op kind")
  for kind, (total, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:25]:
    ms = total / steps / 1e3
    print(f"{ms:9.1f} {ms / all_ms:6.1%} {count // steps:6d}  {kind}")


if __name__ == "__main__":
  main(sys.argv[1:])
