"""Every GPU measurement of the throughput targets in one call, with a table at the end.

  python3 benchmarks/gpu_targets.py --part bench   # mae_jax alone: B/16, L/16, attention, flags
  python3 benchmarks/gpu_targets.py --part torch   # side by side with PyTorch on the same GPU

Meant for a lent GPU machine with a time limit per command: each part ends within
--budget seconds (default 540), skipping the runs that no longer fit. Every run is a
subprocess (so XLA_FLAGS can differ and one failure does not end the rest) with its own
timeout; its JSON line is kept, its last lines of output are printed when it fails.
Results go to $OUT/gpu_targets_<part>.json when OUT is set (else to the working
directory), the table to stdout.

`--part bench` runs `python -m mae_jax.bench`, bfloat16, global batch 256, on:
  B/16 @ 224 (attention picked automatically: cuDNN's fused kernel where it applies),
  B/16 with --attn_impl xla, B/16 with the latency-hiding scheduler flag, and L/16 @ 224.
The `fused attention` column lists the cuDNN custom calls found in the compiled program,
which shows whether cuDNN's kernel is the one that runs.
`--part torch` runs benchmarks/vs_pytorch.py on B/16@224 and L/16@224.

The machine's image has JAX, flax, optax and torch but not ml_collections: when it is
missing, this installs it from ./wheels (`make gpu-wheels` here downloads it there).
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = ["--config", "configs/mae_imagenet.py", "--config.batch_size=256", "--steps", "20",
         "--warmup", "3"]  # the paper's recipe: 224 px, bfloat16, its decoder
# name -> (bench flags, extra XLA_FLAGS)
BENCH_RUNS = {
    "B/16": (["--config.model.variant=B/16"], ""),
    "B/16 xla attention": (["--config.model.variant=B/16", "--config.model.attn_impl=xla"], ""),
    "B/16 latency-hiding scheduler": (["--config.model.variant=B/16"],
                                      "--xla_gpu_enable_latency_hiding_scheduler=true"),
    "L/16": (["--config.model.variant=L/16"], ""),
}
TORCH_CASES = ("B/16@224", "L/16@224")


def ensure_ml_collections():
  if importlib.util.find_spec("ml_collections") is None:
    wheels = os.path.join(ROOT, "wheels")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                    "--find-links", wheels, "ml-collections"], check=True)


class Budget:
  """Seconds left for the part; each run gets at most min(per run, what is left)."""

  def __init__(self, total, per_run):
    self.end, self.per_run = time.monotonic() + total, per_run

  def next_timeout(self):
    """A run's timeout, or None when under 30 s are left."""
    left = self.end - time.monotonic()
    return None if left < 30 else int(min(self.per_run, left))


def run(cmd, xla_flags, timeout):
  """(the last JSON line of stdout or None, seconds, output tail)."""
  env = dict(os.environ)
  if xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  start = time.perf_counter()
  try:
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    text, ok = out.stdout + out.stderr, out.returncode == 0
  except subprocess.TimeoutExpired as e:  # its partial output comes as bytes
    partial = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                      for x in (e.stdout, e.stderr))
    text, ok = f"{partial}\ntimed out after {timeout}s", False
  seconds = time.perf_counter() - start
  lines = [l for l in (text if ok else "").splitlines() if l.startswith("{")]
  return (json.loads(lines[-1]) if lines else None), seconds, "\n".join(text.splitlines()[-15:])


def run_all(jobs, budget, row_of):
  """Run each (name, cmd, xla_flags) job within the budget: ({name: record}, table rows).
  A row is (name, *row_of(record)), or the name and why there is no record."""
  records, rows = {}, []
  for name, cmd, xla_flags in jobs:
    timeout = budget.next_timeout()
    if timeout is None:
      rows.append((name, "skipped: budget spent"))
      continue
    record, seconds, tail = run(cmd, xla_flags, timeout)
    print(f"[{seconds:5.0f}s] {name}: {'ok' if record else 'FAILED'}", flush=True)
    if record is None:
      print(tail, flush=True)
      rows.append((name, "failed"))
      continue
    records[name] = record
    rows.append((name, *row_of(record)))
  return records, rows


def bench_row(record):
  mfu = record["mfu"]
  return (f"{record['images_per_s']:.0f}", f"{record['step_time_s'] * 1e3:.1f}",
          "n/a" if mfu is None else f"{mfu:.1%}", f"{record['compile_s']:.0f}",
          ", ".join(record["fused_attention_calls"]) or "none")


def torch_row(record):
  (r,) = record["results"]
  ips = r["images_per_s"]
  return (f"{ips['jax']:.0f}", f"{ips['torch']:.0f}", f"{r['jax_over_torch']:.2f}x",
          f"compile={r['torch']['torch_compile']}")


def bench_part(budget):
  jobs = [(name, [sys.executable, "-m", "mae_jax.bench", *flags, *BENCH], xla_flags)
          for name, (flags, xla_flags) in BENCH_RUNS.items()]
  records, rows = run_all(jobs, budget, bench_row)
  return records, ("run", "img/s", "step ms", "MFU", "compile s", "fused attention"), rows


def torch_part(budget):
  jobs = [(case, [sys.executable, os.path.join("benchmarks", "vs_pytorch.py"), "--case", case,
                  "--rounds", "3", "--steps_per_round", "5", "--no_all_tokens"], "")
          for case in TORCH_CASES]
  records, rows = run_all(jobs, budget, torch_row)
  return records, ("case", "mae_jax img/s", "PyTorch img/s", "ratio", "PyTorch"), rows


def print_table(header, rows):
  rows = [tuple(row) + ("",) * (len(header) - len(row)) for row in rows]
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  for row in (header, *rows):
    print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--part", choices=["bench", "torch"], required=True)
  p.add_argument("--timeout", type=int, default=300, help="seconds per run at most")
  p.add_argument("--budget", type=int, default=540, help="seconds for the whole part")
  args = p.parse_args(argv)
  ensure_ml_collections()
  part = bench_part if args.part == "bench" else torch_part
  records, header, rows = part(Budget(args.budget, args.timeout))
  path = os.path.join(os.environ.get("OUT", "."), f"gpu_targets_{args.part}.json")
  with open(path, "w") as f:
    json.dump(records, f, indent=1)
  print(f"\nrecords: {path}")
  print_table(header, rows)
  return 0 if len(records) == len(rows) else 1


if __name__ == "__main__":
  sys.exit(main())
