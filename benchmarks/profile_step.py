"""Where the time of one compiled train step goes: per-op totals from a JAX profiler trace.

  python benchmarks/profile_step.py --config.model.variant=Ti/4 --config.data.image_size=32 \
      --config.batch_size=64 --config.model.decoder_width=128 --config.model.decoder_depth=4 \
      --config.model.decoder_heads=4 --config.model.dtype=float32 [--config.model.unroll=True]

Takes `python -m mae_jax.bench`'s flags (a recipe and its --config.FIELD overrides), compiles its train step, runs a few warm-up
steps, traces --steps more with jax.profiler and prints, per op kind (an XLA op name
without its numeric suffix: ynn_fusion = an XNNPACK matmul fusion, copy_bitcast_fusion = a
layout copy, ...), the milliseconds per step summed over all threads, and the count. The
trace stays in --trace_dir for TensorBoard / Perfetto.

`--by_matmul` adds a table of the step's matrix products, joined with the compiled HLO:
per operand shapes and pass (forward, or backward where JAX's metadata says transpose),
the milliseconds per step, calls, GFLOP and the GFLOP/s they reached. XNNPACK products
(`ynn_fusion`) run synchronously; XLA's other dots (`dot_general`, Eigen) are timed as
traced, which on the CPU backend covers only their launch, so their rate is not shown.
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
import numpy as np

from mae_jax.tools import bench

# Trace events that wrap ops rather than being ops.
WRAPPERS = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool")


def op_events(trace_dir):
  """[(op name, microseconds)] of the newest Perfetto trace in trace_dir."""
  # jax.profiler adds a run directory per trace and keeps the old ones.
  path = max(glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True),
             key=os.path.getmtime)
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  return [(e["name"], e.get("dur", 0)) for e in events
          if e.get("ph") == "X" and not e["name"].startswith(WRAPPERS)]


def op_totals(events):
  """{op kind: (total microseconds, count)}; a kind is an op name less its numeric suffix."""
  totals, counts = collections.Counter(), collections.Counter()
  for name, dur in events:
    kind = re.sub(r"\.\d+$", "", name)
    totals[kind] += dur
    counts[kind] += 1
  return {k: (totals[k], counts[k]) for k in totals}


def _dims(shape):
  return [int(d) for d in re.match(r"\w+\[([\d,]*)\]", shape).group(1).split(",") if d]


def hlo_matmuls(hlo_text):
  """{op name: (kernel, pass, operand shapes, FLOPs per call)} for every op of the
  compiled program that is a dot or a fusion around one."""
  computations = dict(re.findall(r"^(?:ENTRY )?(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text,
                                 re.S | re.M))
  shapes = dict(re.findall(r"(%[\w.\-]+) = (\w+\[[\d,]*\])", hlo_text))  # names are unique

  def dot_of(body):
    for m in re.finditer(r"= (\w+\[[\d,]*\])\S* dot\(([^)]*)\), ([^\n]*)", body):
      operands = [shapes.get(x, "?[]") for x in re.findall(r"%[\w.\-]+", m.group(2))]
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m.group(3)).group(1)
      k = np.prod([_dims(operands[0])[int(d)] for d in contracting.split(",") if d])
      return operands, 2 * int(np.prod(_dims(m.group(1)))) * int(k)
    return None

  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?(fusion|dot)\(", line)
    if not m:
      continue
    name, op = m.groups()
    if op == "fusion" and name.startswith("ynn_fusion"):
      called = re.search(r"calls=(%[\w.\-]+)", line).group(1)
      found, kernel = dot_of(computations.get(called, "")), "xnnpack"
    elif op == "dot":
      found, kernel = dot_of(line), "eigen"
    else:
      continue
    if found:
      meta = re.search(r'op_name="([^"]*)"', line)
      stage = "bwd" if meta and "transpose(" in meta.group(1) else "fwd"
      out[name] = (kernel, stage, " x ".join(found[0]), found[1])
  return out


def matmul_table(events, hlo_text, steps):
  """Rows (ms/step, calls/step, GFLOP/step, kernel, pass, shapes), slowest first."""
  matmuls = hlo_matmuls(hlo_text)
  rows = collections.defaultdict(lambda: [0.0, 0, 0.0])
  for name, dur in events:
    if name in matmuls:
      kernel, stage, shapes, flop = matmuls[name]
      row = rows[(kernel, stage, shapes)]
      row[0] += dur / 1e3 / steps
      row[1] += 1
      row[2] += flop / 1e9 / steps
  return sorted(((ms, n // steps, gf, *key) for key, (ms, n, gf) in rows.items()),
                reverse=True)


def main(argv):
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--trace_dir", default="/tmp/mae_jax_profile")
  p.add_argument("--profile_steps", type=int, default=3, help="traced steps")
  p.add_argument("--by_matmul", action="store_true", help="also a table per matrix product")
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
  events = op_events(extra.trace_dir)
  totals = op_totals(events)
  all_ms = sum(t for t, _ in totals.values()) / steps / 1e3
  step_ms = sorted(times)[len(times) // 2] * 1e3
  print(f"compile {compile_s:.1f} s; traced step {step_ms:.0f} ms (median of {steps}); "
        f"op time summed over threads {all_ms:.0f} ms/step")
  print(f"{'ms/step':>9} {'share':>6} {'count':>6}  op kind")
  for kind, (total, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:25]:
    ms = total / steps / 1e3
    print(f"{ms:9.1f} {ms / all_ms:6.1%} {count // steps:6d}  {kind}")
  rows = None
  if extra.by_matmul:
    rows = matmul_table(events, compiled.as_text(), steps)
    xnn = [r for r in rows if r[3] == "xnnpack"]
    ms, gf = sum(r[0] for r in xnn), sum(r[2] for r in xnn)
    print(f"\nmatrix products: XNNPACK {ms:.0f} ms/step for {gf:.1f} GFLOP "
          f"({gf / ms * 1e3:.0f} GFLOP/s); Eigen dots "
          f"{sum(r[2] for r in rows if r[3] == 'eigen'):.1f} GFLOP")
    print(f"{'ms/step':>9} {'calls':>5} {'GFLOP':>7} {'GFLOP/s':>8}  kernel  pass  operands")
    for ms, n, gf, kernel, stage, shapes in rows[:30]:
      rate = f"{gf / ms * 1e3:8.0f}" if kernel == "xnnpack" and ms else f"{'-':>8}"
      print(f"{ms:9.1f} {n:5d} {gf:7.2f} {rate}  {kernel:7s} {stage}   {shapes}")
  return totals, rows


if __name__ == "__main__":
  main(sys.argv[1:])
