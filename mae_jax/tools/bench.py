"""Throughput benchmark of the real train step on synthetic images held in device memory.

  python -m mae_jax.bench --config configs/mae_imagenet.py --config.model.variant=B/16 \
      --config.batch_size=256 [--steps 20 --warmup 3 --peak_tflops 989]

It takes a recipe as train.py does (--config FILE, any --config.FIELD=VALUE; default the
paper's ImageNet recipe, configs/mae_imagenet.py) and times the step that recipe trains, on
synthetic images of its size in device memory (model.encoder_tokens=all: the encoder on
every token, the paper's Table 2).

The step timed is the training program itself (mae_jax.train.program.pretraining: the trainer's
jitted step, shardings, activation rules and donation), built for the benchmark's config. Reported: compile time, step time (median over
`--steps` steps after `--warmup`, each ended by block_until_ready), images/s, the analytic
training FLOPs/image of `mae_jax.model.flops` (3 x forward, remat recompute not counted),
achieved TFLOP/s, MFU against `--peak_tflops` or PEAK_TFLOPS, and peak device memory
where the device reports it. A table goes to stdout, then one JSON line; progress to stderr.
"""
import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import ml_collections
import numpy as np

from mae_jax.model import mae, sizes
from mae_jax.tools import flops
from mae_jax.train import config as config_lib, program, sharding
from mae_jax.tools import cli

# Dense bfloat16 peak TFLOP/s per chip, by a substring of device_kind; first match wins.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,        # H100 SXM
    "H200": 989.0,        # H200 SXM: the H100 SXM's compute, more memory
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,       # v5p reports "TPU v5"
}


# What the encoder processes -> the model class; keys match flops.ENCODER_TOKENS.
ENCODERS = mae.ENCODERS
AllTokensMAE = mae.AllTokensMAE


IMAGENET = "configs/mae_imagenet.py"  # the default recipe: the paper's ImageNet pretraining


@dataclasses.dataclass
class Args:
  config: ml_collections.ConfigDict  # the recipe with its --config.FIELD overrides
  steps: int
  warmup: int
  peak_tflops: float | None
  seed: int


def parse_args(argv):
  """Args of `argv` (without the program name): --config FILE and --config.FIELD=VALUE, as
  train.py takes them, and the benchmark's own flags. A bad flag, field or recipe raises
  cli.UsageError (one line naming it)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  default = cli.default_recipe(os.path.basename(IMAGENET))
  check_recipe(cli.recipe_files(argv, [default])[-1])
  fv = flags.FlagValues()  # its own: the benchmarks parse several argvs in one process
  try:  # the recipe and its overrides load while the flags are defined and parsed
    config_flags.DEFINE_config_file(
        "config", default,
        "Recipe whose training step is timed.", flag_values=fv, lock_config=True,
        sys_argv=["bench", *argv])
    flags.DEFINE_integer("steps", 20, "Timed steps (the median is reported).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_float("peak_tflops", None, "Per-device peak TFLOP/s for MFU; default: "
                       "PEAK_TFLOPS by device kind.", flag_values=fv)
    flags.register_validator("peak_tflops", lambda v: v is None or 0 < v < math.inf,
                             "--peak_tflops: expected a positive, finite number",
                             flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Synthetic images and initial state.", lower_bound=0,
                         flag_values=fv)
    fv(["bench", *argv])
    fv["config"].value.keys()  # the recipe file loads lazily: a failure to load it is here
    return Args(fv.config, fv.steps, fv.warmup, fv.peak_tflops, fv.seed)
  except flags.UnrecognizedFlagError as e:
    raise cli.UsageError(f"--{e.flagname}: unknown flag; the benchmark takes a recipe: "
                         "--config FILE and --config.FIELD=VALUE (e.g. "
                         "--config.model.variant=B/16 --config.batch_size=256)") from None
  except Exception as e:  # pylint: disable=broad-except (absl, ml_collections, the recipe)
    raise cli.UsageError(cli.flag_error(e, argv, recipe=IMAGENET)) from None


def check_recipe(path):
  """cli.UsageError naming `path` unless it is a recipe file: Python whose get_config()
  returns a ConfigDict with the fields train.py reads (an optim block among them)."""
  what = "a recipe defining get_config()"
  module = cli.load_python_file(path, what, name="bench_recipe")
  config = cli.call_user_function(module, path, "get_config", what)
  if not isinstance(config, ml_collections.ConfigDict) or "optim" not in config:
    raise cli.UsageError(f"--config {path}: get_config() must return a ConfigDict with an "
                         "optim block (see configs/default.py)")


def bench_config(args):
  """The recipe on synthetic images of its size and channels (the benchmark reads no
  data), validated."""
  config = args.config.copy_and_resolve_references()
  try:
    with config.unlocked():
      config.data.name = "synthetic"
    sizes.check(config)
    config_lib.validate(config)
  except (AttributeError, KeyError) as e:  # a recipe without the fields train.py needs
    raise cli.UsageError(f"--config: not a pretraining recipe (no field {e}; see "
                         "configs/default.py)") from None
  return config


_START = time.perf_counter()


def log(message):
  """A progress line on stderr, stamped with seconds since import."""
  print(f"[bench {time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def setup(config, encoder_tokens=None, seed=0):
  """(jitted train step, initial state, synthetic batch on device, rng, model): the
  trainer's program (mae_jax.train.program.pretraining) on synthetic uint8 images."""
  run, state, rng = build(config, encoder_tokens, seed)
  return run.step, state, synthetic_batch(run, config.data.image_size, seed), rng, run.model


def build(config, encoder_tokens=None, seed=0):
  """(the Pretraining program of `config`, its initial state, rng)."""
  config = config.copy_and_resolve_references()
  if encoder_tokens is not None:  # another encoder for the same recipe (vs_pytorch.py)
    with config.unlocked():
      config.model.encoder_tokens = encoder_tokens
  channels = config.data.channels
  run = program.pretraining(config, jax.devices(), 10**6 * config.batch_size,
                            ((0.5,) * channels, (0.25,) * channels))
  return run, run.init(jax.random.key(seed)), jax.random.key(seed)


def synthetic_batch(run, image_size, seed):
  """A global batch of uniform random uint8 images at `image_size`, on the mesh."""
  rng = np.random.default_rng(seed)
  shape = (run.config.batch_size, image_size, image_size, run.config.data.channels)
  return sharding.global_batch(
      {"image": rng.integers(0, 256, shape, dtype=np.uint8),
       "label": np.zeros((run.config.batch_size,), np.int32)}, run.mesh)


def compile_step(step, state, batch, rng):
  """(compiled executable, seconds spent tracing, lowering and compiling)."""
  start = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile()
  return compiled, time.perf_counter() - start


def run_steps(compiled, state, batch, rng, num_steps, on_step=None):
  """Run num_steps steps, each ended by block_until_ready; (state, seconds per step)."""
  times = []
  for i in range(num_steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    if on_step:
      on_step(i, times[-1])
  return state, times


def peak_tflops(device_kind, override=None):
  """(per-device peak TFLOP/s or None, where it came from)."""
  if override is not None:
    return override, "--peak_tflops"
  for key, value in PEAK_TFLOPS.items():
    if key in device_kind:
      return value, f"PEAK_TFLOPS[{key!r}] (dense bf16)"
  return None, f"unknown device kind {device_kind!r}"


def peak_memory_bytes(devices):
  """Largest peak_bytes_in_use over the devices, or None where memory_stats has none."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  return None if None in peaks else max(peaks)


def xla_memory_bytes(compiled):
  """XLA's per-device estimate: arguments + outputs + temporaries - donated aliases."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def xla_flops_per_image(compiled, model, batch_size, num_devices):
  """XLA's cost-analysis FLOPs / image, or None where it undercounts.

  XLA counts a while-loop body once, so only unrolled or single-block stacks give the
  full count; the count is per device (of the partitioned program), hence x num_devices.
  """
  if not (model.kernels.unroll or model.depth == model.decoder_depth == 1):
    return None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) * num_devices / batch_size


def fused_attention_calls(compiled):
  """The fused-attention custom calls in the compiled program (cuDNN's `__cudnn$fmha...`
  forward and backward kernels); empty where attention is plain XLA ops."""
  return sorted(set(re.findall(r'custom_call_target="([^"]*fmha[^"]*)"', compiled.as_text())))


def summarize(args, config, model, compiled, compile_s, times_s):
  """The result record (the JSON line)."""
  devices = jax.devices()
  kind = devices[0].device_kind
  step_s = float(np.median(times_s))
  images_per_s = config.batch_size / step_s
  encoder_tokens = config.model.get("encoder_tokens", "visible")
  flops_per_image = flops.train_flops(model, encoder_tokens)
  achieved = flops_per_image * images_per_s / 1e12
  peak, peak_source = peak_tflops(kind, args.peak_tflops)
  data, fsdp = config_lib.mesh_shape(config.mesh, len(devices))
  return {
      "variant": config.model.variant, "width": model.width, "depth": model.depth,
      "num_heads": model.num_heads, "patch_size": model.patch_size,
      "decoder": [model.decoder_width, model.decoder_depth, model.decoder_heads],
      "encoder_tokens": encoder_tokens, "mask_ratio": model.mask_ratio,
      "image_size": model.image_size, "batch_size": config.batch_size,
      "grad_accum_steps": config.grad_accum_steps,
      "dtype": config.model.dtype, "remat": model.kernels.remat,
      "unroll": model.kernels.unroll, "attn_impl": model.kernels.attention,
      "matmul": model.kernels.matmul,
      "fused_attention_calls": fused_attention_calls(compiled),
      "mesh": {"data": data, "fsdp": fsdp},
      "platform": devices[0].platform, "device_kind": kind, "num_devices": len(devices),
      "jax_version": jax.__version__, "compile_s": compile_s, "steps": len(times_s),
      "step_time_s": step_s, "step_time_min_s": float(np.min(times_s)),
      "images_per_s": images_per_s, "flops_per_image": flops_per_image,
      "xla_flops_per_image": xla_flops_per_image(compiled, model, config.batch_size,
                                                 len(devices)),
      "achieved_tflops": achieved, "peak_tflops_per_device": peak,
      "peak_tflops_source": peak_source,
      "mfu": None if peak is None else achieved / (peak * len(devices)),
      "peak_memory_bytes": peak_memory_bytes(devices),
      "xla_memory_estimate_bytes": xla_memory_bytes(compiled),
  }


def _fmt(value):
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, list):
    return ", ".join(map(str, value)) or "none"
  return str(value)


TABLE_ROWS = (  # (label, key, scale)
    ("model", "variant", None), ("image size", "image_size", None),
    ("global batch", "batch_size", None), ("dtype", "dtype", None),
    ("encoder tokens", "encoder_tokens", None), ("device", "device_kind", None),
    ("fused attention calls", "fused_attention_calls", None),
    ("devices", "num_devices", None), ("compile (s)", "compile_s", None),
    ("step time, median (s)", "step_time_s", None), ("images/s", "images_per_s", None),
    ("train GFLOP/image", "flops_per_image", 1e-9),
    ("achieved TFLOP/s", "achieved_tflops", None), ("MFU", "mfu", None),
    ("peak memory (GiB)", "peak_memory_bytes", 2**-30),
    ("XLA memory estimate (GiB)", "xla_memory_estimate_bytes", 2**-30),
)


def format_table(result):
  lines = []
  for label, key, scale in TABLE_ROWS:
    value = result[key]
    if scale is not None and value is not None:
      value = value * scale
    lines.append(f"{label:<26} {_fmt(value)}")
  return "\n".join(lines)


def benchmark(args):
  """Compile, warm up and time the train step of each stage of the recipe (one stage
  unless config.schedule sets some); returns their result records."""
  config = bench_config(args)
  log(f"building {config.model.variant} at {config.data.image_size}px, batch "
      f"{config.batch_size}, {jax.device_count()} x {jax.devices()[0].device_kind}")
  run, state, rng = build(config, seed=args.seed)
  results, seen = [], {}
  for i, stage in enumerate(run.stages):
    if stage.key in seen:  # a later stage of the same program: the same figures
      results.append(dict(seen[stage.key], stage=stage_record(run, i)))
      continue
    batch = synthetic_batch(run, stage.image_size, args.seed)
    log(f"compiling the train step{stage_name(run, i)} ...")
    compiled, compile_s = compile_step(run.stage_step(stage), state, batch, rng)
    log(f"compiled in {compile_s:.1f}s; {args.warmup} warm-up steps ...")
    state, _ = run_steps(compiled, state, batch, rng, args.warmup)
    every = max(1, args.steps // 5)
    state, times = run_steps(
        compiled, state, batch, rng, args.steps,
        lambda k, t: (k + 1) % every == 0 and log(f"step {k + 1}/{args.steps}: {t:.3f}s"))
    seen[stage.key] = summarize(args, config, run.stage_model(stage), compiled, compile_s,
                                times)
    results.append(dict(seen[stage.key], stage=stage_record(run, i)))
  return results


def stage_name(run, i):
  s = run.stages[i]
  return "" if len(run.stages) == 1 else (
      f" of stage {i + 1}/{len(run.stages)} ({s.image_size} px, mask ratio "
      f"{s.mask_ratio:g})")


def stage_record(run, i):
  """Stage i of the recipe: its image size, mask ratio and share of the steps."""
  s, total = run.stages[i], run.durations.total_steps
  return {"index": i + 1, "of": len(run.stages), "image_size": s.image_size,
          "mask_ratio": s.mask_ratio, "from": s.start / total, "to": s.end / total}


def schedule_summary(results):
  """The whole run's mean step time and images/s where it has stages (each stage's step
  time weighted by its steps), against every step at the last stage's."""
  shares = [r["stage"]["to"] - r["stage"]["from"] for r in results]
  mean_step = sum(n * r["step_time_s"] for n, r in zip(shares, results)) / sum(shares)
  return {"schedule_mean_step_time_s": mean_step,
          "schedule_images_per_s": results[0]["batch_size"] / mean_step,
          "speedup_vs_last_stage": results[-1]["step_time_s"] / mean_step}


def main(argv=None):
  try:
    result = benchmark(parse_args(sys.argv[1:] if argv is None else argv))
  except (config_lib.ConfigError, cli.UsageError) as e:
    cli.fail(e)
  for r in result:
    if len(result) > 1:
      print(f"stage {r['stage']['index']}/{r['stage']['of']}: {r['stage']['from']:.0%}"
            f"-{r['stage']['to']:.0%} of the steps")
    print(format_table(r))
  if len(result) > 1:
    summary = schedule_summary(result)
    print(f"whole schedule: {summary['schedule_images_per_s']:.4g} images/s, "
          f"{summary['speedup_vs_last_stage']:.3g}x the last stage's")
    print(json.dumps(summary))
  for r in result:
    print(json.dumps(r), flush=True)


def run():
  """The console script `mae-bench`."""
  main()


if __name__ == "__main__":
  run()
