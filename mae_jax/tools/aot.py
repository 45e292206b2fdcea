"""Compile the trainer's step for a TPU slice on any host: memory, collectives, FLOPs.

  python -m mae_jax.aot --topology v5p:4x4x8 --config configs/mae_imagenet.py \
      [--config.FIELD=VALUE ...] [--max_batch --remat none,full]
      [--max_batch --remat full --max_batch_range 4064:79.71,4374:85.70]

The program is the trainer's own (mae_jax.train.program.pretraining: the same jitted
train_step, shardings, donation, accumulation, remat and dtype), lowered with
abstract inputs (no data, no parameters) for the compile-only devices of libtpu's
topology (`pip install 'mae_jax[tpu]'`) and compiled by the real TPU compiler. The model
is built for platform "tpu", so it carries the TPU program's kernels, not the host's.

Reported per device (a chip; on v4 one of its two TensorCores): XLA's memory analysis
(arguments, outputs, temporaries, aliased = donated, total) against its HBM with a
headroom; the collectives of the partitioned program by kind and mesh axis with their
bytes per step (mae_jax.tools.hlo) and the lower bound on their time at the ICI bandwidth
(arithmetic on those bytes, not a measurement); compile time; the analytic training FLOPs
(mae_jax.model.flops) and XLA's count, which is complete only where no block stack is scanned
(model.unroll=True). A table to stdout, then one JSON line; docs/scaling.md explains each
field. `--max_batch` instead finds, by compiling, the largest per-device batch that fits
for each remat policy given (aot.search: steps along the memory measured at each batch,
checked by compiles). benchmarks/aot_gpu.py reuses these functions for compile-only H100s
(the CUDA plugin, not a dependency).
"""
import json
import os
import sys
import time

from absl import app, flags

from mae_jax.tools import pretrain

GIB = 2**30
# (HBM GiB, ICI GB/s per chip per direction) by device_kind. HBM: Cloud TPU system
# architecture pages. ICI: their bidirectional per-chip figures halved (v5e 400, v5p 1200,
# v6e 800 GB/s), v4's 2,400 Gbps per direction.
CHIPS = {
    "TPU v4": ("v4", 32, 300e9),
    "TPU v5 lite": ("v5e", 16, 200e9),
    "TPU v5": ("v5p", 95, 600e9),
    "TPU v6 lite": ("v6e", 32, 400e9),
    # Compile-only GPUs of the CUDA plugin (benchmarks/aot_gpu.py). NVIDIA's H100 datasheet:
    # 80 GB HBM3 (80 GiB; CUDA shows 79.1 of it), NVLink 900 GB/s per GPU bidirectional.
    "NVIDIA H100 80GB HBM3": ("h100", 80, 450e9),
}
# ImageNet-1k's train split: only the learning-rate schedule's step counts (constants of
# the program) depend on it; memory, collectives and FLOPs do not.
TRAIN_EXAMPLES = 1_281_167
MAX_PER_DEVICE = 1 << 16  # --max_batch never searches beyond this per-device batch


class AotError(ValueError):
  """Bad input to the tool: one line naming the flag or field."""


# libtpu on a host without TPUs: a single-host view (it otherwise prints that it cannot
# find the TPU host and worker names), and no lock on a chip, so that several compiles
# (and tests) may run at once. Set before libtpu loads; an explicit setting wins.
LIBTPU_ENV = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1",
              "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def topology_devices(name):
  """The compile-only devices of a TPU topology such as "v5p:4x4x8"."""
  for key, value in LIBTPU_ENV.items():
    os.environ.setdefault(key, value)
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
  except Exception as e:  # libtpu raises several kinds for a name it does not know
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise AotError(f"--topology={name!r}: not a TPU topology libtpu knows (e.g. v5e:2x2, "
                   f"v5p:4x4x8, v4:2x2x2, v6e:4x4): {first}") from None


def chip_of(devices):
  """(generation, HBM bytes, ICI bytes/s) per device. v4 topologies list each chip's two
  TensorCores as devices: each gets half the chip's HBM and ICI. For a GPU the ICI figure
  is its NVLink bandwidth."""
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise AotError(f"device {kind!r} has no HBM/ICI figures here ({list(CHIPS)})")
  gen, hbm_gib, ici = CHIPS[kind]
  cores = len(devices) // len({tuple(d.coords) for d in devices})
  return gen, hbm_gib * GIB // cores, ici / cores


def checked_config(config, num_devices, explicit=()):
  """The recipe (smoke applied, keeping the `explicit` fields) validated for the topology's
  device count."""
  from mae_jax.model import sizes
  from mae_jax.train import config as config_lib
  if config.smoke:
    config = config_lib.apply_smoke(config, explicit)
  try:
    sizes.check(config, explicit)
    config_lib.validate(config, num_devices)
  except config_lib.ConfigError as e:
    raise AotError(str(e)) from None
  return config


def with_batch(config, global_batch, remat=None):
  """A copy of config with another global batch (and remat policy)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.batch_size = global_batch
    if remat is not None:
      config.model.remat = remat
  return config


def compile_step(config, devices, stage=None):
  """The trainer's step for `devices` (the step of `stage`, one of the program's stages,
  where given), compiled: (compiled, program, seconds); compiled is None where the
  compiler ran out of device memory (the program does not fit)."""
  from mae_jax.data import source
  from mae_jax.train import program
  stats = (source.stats_for(config.data.name, config.data.channels)
           or ((0.5,) * config.data.channels, (0.25,) * config.data.channels))
  run = program.pretraining(config, devices, TRAIN_EXAMPLES, stats)
  step = run.step if stage is None else run.stage_step(stage)
  lowered = step.lower(*run.abstract_inputs(stage))
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # XlaRuntimeError; RESOURCE_EXHAUSTED = does not fit in HBM
    if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
      raise
    compiled = None
  return compiled, run, time.perf_counter() - t0


def memory(compiled, hbm, headroom):
  """Per-chip bytes from XLA's memory analysis; total = arguments + outputs + temporaries
  + generated code - aliased (a donated input's buffer holds its output)."""
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes,
         "generated_code": m.generated_code_size_in_bytes}
  out["total"] = (out["arguments"] + out["outputs"] + out["temporaries"]
                  + out["generated_code"] - out["aliased"])
  out.update(hbm=hbm, headroom=headroom, fits=out["total"] <= hbm * (1 - headroom))
  return out


def analyze(compiled, run, hbm, ici, headroom, stage=None):
  """The report's numbers for one compiled step (of `stage`, where given)."""
  from mae_jax.tools import flops
  from mae_jax.tools import hlo
  mesh_shape = tuple(run.mesh.shape.values())
  found = hlo.collectives(compiled.as_text(), mesh_shape)
  coll = hlo.summarize(found)
  ici_bytes = sum(row["ici_bytes"] for row in coll.values())
  n = run.mesh.devices.size
  model = run.model if stage is None else run.stage_model(stage)
  per_image = flops.train_flops(model, run.config.model.get("encoder_tokens", "visible"))
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # GPU compile-only: None
  complete = run.model.kernels.unroll and run.config.grad_accum_steps == 1
  return {
      "memory": memory(compiled, hbm, headroom),
      "collectives": coll,
      "collectives_by_axes": by_axes(found),
      "ici_bytes_per_device": ici_bytes,
      "ici_lower_bound_s": ici_bytes / ici,
      "flops": {"analytic_per_step": per_image * run.config.batch_size,
                "analytic_per_device": per_image * run.config.batch_size / n,
                "xla_per_device": cost.get("flops") if complete else None,
                "xla_per_device_incomplete": None if complete else cost.get("flops")},
  }


def by_axes(found):
  """{"kind over axes": bytes per step}: which mesh axis each kind of traffic runs over."""
  out = {}
  for c in found:
    key = f"{c.kind} over {c.axes}"
    out[key] = out.get(key, 0) + c.count * c.bytes
  return dict(sorted(out.items()))


def report(config, topology, hbm_override=None, headroom=0.1, explicit=()):
  """Compile the recipe's step for `topology` and return the JSON-able report. `explicit`:
  the config fields given on the command line."""
  return report_on(config, topology_devices(topology), topology, hbm_override, headroom,
                   explicit)


def report_on(config, devices, topology, hbm_override=None, headroom=0.1, explicit=()):
  """`report` for given compile-only devices of a kind in CHIPS (TPU or GPU); `topology`
  names them in the report. A recipe with stages (config.schedule) is reported stage by
  stage (one compile per image size and mask ratio) under "stages"."""
  from mae_jax.train import config as config_lib, stages as stages_lib
  config = checked_config(config, len(devices), explicit)
  stages = stages_lib.of(config, config_lib.durations(config, TRAIN_EXAMPLES).total_steps)
  if len(stages) == 1:
    return report_stage(config, devices, topology, hbm_override, headroom)
  reports = {}
  for stage in stages:
    if stage.key not in reports:
      reports[stage.key] = dict(report_stage(config, devices, topology, hbm_override,
                                             headroom, stage),
                                mask_ratio=stage.mask_ratio, steps=[])
    reports[stage.key]["steps"].append([stage.start + 1, stage.end])
  first = next(iter(reports.values()))  # what every stage shares heads the report
  return dict({k: v for k, v in first.items() if k not in PER_STAGE},
              stages=list(reports.values()))


# The fields of a schedule's report that each stage has its own value of.
PER_STAGE = ("image_size", "compile_s", "memory", "collectives", "collectives_by_axes",
             "ici_bytes_per_device", "ici_lower_bound_s", "flops", "mask_ratio", "steps")


def report_stage(config, devices, topology, hbm_override=None, headroom=0.1, stage=None):
  """The report of one compiled step: the recipe's, or `stage`'s."""
  gen, hbm, ici = chip_of(devices)
  hbm = hbm_override * GIB if hbm_override else hbm
  compiled, run, seconds = compile_step(config, devices, stage)
  head = {"topology": topology, "chip": gen, "devices": len(devices),
          "mesh": dict(run.mesh.shape), "variant": config.model.variant,
          "image_size": config.data.image_size if stage is None else stage.image_size,
          "dtype": config.model.dtype,
          "remat": config.model.remat, "grad_accum_steps": config.grad_accum_steps,
          "global_batch": config.batch_size,
          "per_device_batch": config.batch_size // len(devices),
          "params": run.num_params, "compile_s": round(seconds, 1), "ici_bytes_per_s": ici}
  if compiled is None:
    return dict(head, memory={"hbm": hbm, "headroom": headroom, "fits": False,
                              "compiler": "out of device memory"})
  return dict(head, **analyze(compiled, run, hbm, ici, headroom, stage))


def fits(config, devices, per_device, remat, hbm, headroom):
  """Whether the step at `per_device` images per device fits: (fits, total bytes or None)."""
  cfg = with_batch(config, per_device * len(devices), remat)
  compiled, run, _ = compile_step(cfg, devices)
  if len(run.stages) > 1:  # a schedule fits where each of its programs does
    programs = {s.key: s for s in run.stages}.values()
    compiled = [compile_step(cfg, devices, s)[0] for s in programs]
  else:
    compiled = [compiled]
  if None in compiled:
    return False, None
  worst = max((memory(c, hbm, headroom) for c in compiled), key=lambda m: m["total"])
  return worst["fits"], worst["total"]


def max_batch(config, topology, remats, hbm_override=None, headroom=0.1, log=print,
              explicit=(), bracket=None):
  """{remat: largest per-device batch that fits}, found by compiling (in steps of
  grad_accum_steps, which must divide each chip's batch); see `search`. `bracket`: the
  --max_batch_range text (one remat policy), two known ends that are not compiled again."""
  return max_batch_on(config, topology_devices(topology), remats, hbm_override, headroom,
                      log, explicit, bracket)


def max_batch_on(config, devices, remats, hbm_override=None, headroom=0.1, log=print,
                 explicit=(), bracket=None):
  """`max_batch` for given compile-only devices of a kind in CHIPS (TPU or GPU)."""
  from mae_jax.model import vit
  bad = [r for r in remats if r not in vit.REMAT_POLICIES]
  if bad:
    raise AotError(f"--remat: {bad[0]!r} is not one of {sorted(vit.REMAT_POLICIES)}")
  if bracket is not None and len(remats) != 1:
    raise AotError(f"--max_batch_range: a bracket holds for one remat policy; give one "
                   f"--remat, not {','.join(remats)}")
  _, hbm, _ = chip_of(devices)
  hbm = hbm_override * GIB if hbm_override else hbm
  config = checked_config(config, len(devices), explicit)
  unit = config.grad_accum_steps
  known = {} if bracket is None else known_ends(bracket, unit, hbm * (1 - headroom))
  out = {}
  for remat in remats:
    def measure(k, remat=remat):
      good, total = fits(config, devices, k * unit, remat, hbm, headroom)
      if k > 1 or good:  # batch 1 not fitting is said once, as the error below
        log(f"  remat={remat} per-device batch {k * unit}: "
            f"{'fits' if good else 'does not fit'}"
            + (f" ({total / GIB:.2f} GiB)" if total is not None
               else " (compiler: out of memory)"))
      return good, total

    found = search(measure, hbm * (1 - headroom), known)
    if not found:
      raise AotError(f"--config.model.variant={config.model.variant}: does not fit on a "
                     f"{hbm / GIB:g} GiB chip even at per-device batch {unit} "
                     f"(remat={remat}); add mesh.fsdp or a smaller model")
    out[remat] = found * unit
  return out


def known_ends(bracket, unit, limit):
  """--max_batch_range LO[:GIB],HI[:GIB] -> search's `known` {k: (fits, bytes or None)}:
  per-device batch LO fits, HI does not, each with the total measured there if given
  (the secant steps need it; without, the search bisects). k counts units of
  grad_accum_steps images."""
  if len(bracket) != 2:
    raise AotError(f"--max_batch_range: {','.join(bracket)!r} is not LO[:GIB],HI[:GIB], "
                   "e.g. 4064:79.71,4374:85.70")
  ends = [parse_end(text) for text in bracket]
  (lo, t_lo), (hi, t_hi) = ends
  if not 1 <= lo < hi:
    raise AotError(f"--max_batch_range: needs 1 <= LO < HI, got {lo},{hi}")
  for batch, total, fit in ((lo, t_lo, True), (hi, t_hi, False)):
    if batch % unit:
      raise AotError(f"--max_batch_range: {batch} is not a multiple of "
                     f"grad_accum_steps={unit}")
    if total is not None and (total <= limit) != fit:
      raise AotError(f"--max_batch_range: {batch} at {total / GIB:g} GiB "
                     f"{'does not fit' if fit else 'fits'} under the {limit / GIB:g} GiB "
                     f"limit, but is given as the {'LO' if fit else 'HI'} end")
  return {lo // unit: (True, t_lo), hi // unit: (False, t_hi)}


def parse_end(text):
  """"4064:79.71" -> (4064, its bytes); "4064" -> (4064, None)."""
  batch, _, gib = text.strip().partition(":")
  try:
    return int(batch), (float(gib) * GIB if gib else None)
  except ValueError:
    raise AotError(f"--max_batch_range: {text!r} is not BATCH or BATCH:GIB") from None


def search(measure, limit, known=None):
  """The largest k >= 1 with measure(k) = (fits, total bytes or None) fitting, 0 if k = 1
  does not; fitting is taken to be monotone in k. `known`: {k: (fits, total or None)}
  already measured (--max_batch_range), never measured again; where it holds a k that
  fits, the search starts there instead of at k = 1.

  Each next k comes from the memory measured so far: beyond the largest k that fits, the
  line through the two largest that fit; between one that fits and one that does not,
  the line through both (a secant step), or their midpoint where the compiler gave no
  total or the last secant step did not halve the interval. XLA's memory is close to
  linear in the batch, so this takes a few compiles where doubling from 1 and bisecting
  took 9 or more for batches in the hundreds; the answer B is checked (B fits, B + 1 does
  not) by compiles or by the known ends."""
  seen = dict(known or {})
  def at(k):
    if k not in seen:
      seen[k] = measure(k)
    return seen[k]
  if not any(good for good, _ in seen.values()) and not at(1)[0]:
    return 0
  lo = max(k for k, (good, _) in seen.items() if good)
  hi = min((k for k, (good, _) in seen.items() if not good and k > lo), default=None)
  halve = False
  while True:
    if hi is not None and hi - lo <= 1:
      return lo
    if lo >= MAX_PER_DEVICE:
      return MAX_PER_DEVICE
    width = None if hi is None else hi - lo
    k = next_k(seen, lo, hi, limit, halve)
    if at(k)[0]:
      lo = k
    else:
      hi = k
    halve = width is not None and (hi - lo) * 2 > width and not halve


def next_k(seen, lo, hi, limit, halve):
  """The next batch to compile between lo (fits) and hi (does not; None: none known)."""
  if hi is None:
    below = max((k for k, (good, _) in seen.items() if good and k < lo), default=None)
    t_lo = seen[lo][1]
    slope = (t_lo - seen[below][1]) / (lo - below) if below else 0
    guess = lo + int((limit - t_lo) // slope) if slope > 0 else 2 * lo
    return int(min(max(guess, lo + 1), 64 * lo, MAX_PER_DEVICE))
  t_lo, t_hi = seen[lo][1], seen[hi][1]
  if halve or t_hi is None or t_hi <= t_lo:
    return (lo + hi) // 2
  guess = lo + int((limit - t_lo) * (hi - lo) // (t_hi - t_lo))
  return min(max(guess, lo + 1), hi - 1)


def table(rep):
  """The report as aligned text lines."""
  if "max_batch" in rep:
    return "\n".join(f"largest per-device batch, remat={r}: {b}"
                     for r, b in rep["max_batch"].items())
  if "stages" in rep:
    return "\n".join(stages_table(rep))
  m = rep["memory"]
  lines = [f"{rep['variant']} {rep['image_size']}px {rep['dtype']} remat={rep['remat']} on "
           f"{rep['topology']} ({rep['devices']} x {rep['chip']}), mesh {rep['mesh']}, "
           f"global batch {rep['global_batch']} ({rep['per_device_batch']}/device), "
           f"{rep['params'] / 1e6:.1f}M params, compiled in {rep['compile_s']} s"]
  if "total" not in m:
    return "\n".join(lines + [f"does not fit: the compiler ran out of the {m['hbm'] / GIB:g} "
                              "GiB of device memory"])
  lines.append("per-device memory (GiB): " + ", ".join(
      f"{k} {m[k] / GIB:.3f}" for k in ("arguments", "outputs", "temporaries", "aliased",
                                        "generated_code", "total")))
  lines.append(f"  of {m['hbm'] / GIB:g} GiB HBM: {'fits' if m['fits'] else 'does NOT fit'} "
               f"with {m['headroom']:.0%} headroom")
  lines.append(f"{'collective':<20}{'per step':>10}{'MiB/step':>12}{'ICI MiB/chip':>14}")
  for kind, row in rep["collectives"].items():
    lines.append(f"{kind:<20}{row['count']:>10}{row['bytes'] / 2**20:>12.1f}"
                 f"{row['ici_bytes'] / 2**20:>14.1f}")
  lines.append(f"ICI lower bound (arithmetic: bytes / {rep['ici_bytes_per_s'] / 1e9:g} GB/s "
               f"per device, not a measurement): {rep['ici_lower_bound_s'] * 1e3:.2f} ms/step")
  f = rep["flops"]
  if f["xla_per_device"] is not None:
    xla = f"{f['xla_per_device'] / 1e12:.3f} TFLOP"
  elif f["xla_per_device_incomplete"] is not None:
    xla = "incomplete (scanned stack: XLA counts a loop body once; set model.unroll=True)"
  else:
    xla = "none (the compiler gave no cost analysis)"
  lines.append(f"training FLOPs per device per step: analytic {f['analytic_per_device'] / 1e12:.3f}"
               f" TFLOP; XLA {xla}")
  return "\n".join(lines)


def stages_table(rep):
  """A schedule's report: each stage's table, then the largest stage's memory."""
  lines = []
  for st in rep["stages"]:
    steps = ", ".join(f"{a}-{b}" for a, b in st["steps"])
    lines += [f"stage at {st['image_size']} px, mask ratio {st['mask_ratio']:g} (steps "
              f"{steps}):", table(st), ""]
  fitting = [st for st in rep["stages"] if "total" in st["memory"]]
  if len(fitting) < len(rep["stages"]):
    return lines + ["the schedule does NOT fit: a stage ran the compiler out of memory"]
  largest = max(fitting, key=lambda st: st["memory"]["total"])
  m = largest["memory"]
  return lines + [f"largest stage: {largest['image_size']} px, {m['total'] / GIB:.3f} GiB per "
                  f"device of {m['hbm'] / GIB:g}: "
                  f"{'fits' if all(st['memory']['fits'] for st in fitting) else 'does NOT fit'}"]


FLAGS = flags.FLAGS


def fail(message):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def define_flags():
  pretrain.define_recipe_flag()
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5p:4x4x8.",
                      required=True)
  flags.DEFINE_bool("max_batch", False, "Find the largest per-device batch that fits.")
  flags.DEFINE_list("remat", ["none", "full"], "Remat policies for --max_batch.")
  flags.DEFINE_list("max_batch_range", None,
                    "LO[:GIB],HI[:GIB]: --max_batch between a per-device batch known to "
                    "fit and one known not to (with the GiB measured at each, if known); "
                    "neither is compiled again, nor are batches 1 and 2. Implies "
                    "--max_batch; one --remat.")
  flags.DEFINE_float("hbm_gib", None, "Chip memory to plan for (default: the chip's HBM).")
  flags.DEFINE_float("headroom", 0.1, "Fraction of HBM left free for 'fits'.")


parse_flags = pretrain.parse_flags  # the same recipe flag, the same one-line errors


def main(argv):
  del argv
  import jax
  jax.config.update("jax_platforms", "cpu")  # compile-only: the host runs nothing
  # A cached compile-only TPU executable cannot be loaded without a TPU client.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    if FLAGS.max_batch or FLAGS.max_batch_range:
      found = max_batch(FLAGS.config, FLAGS.topology, FLAGS.remat, FLAGS.hbm_gib,
                        FLAGS.headroom, log=lambda s: print(s, file=sys.stderr),
                        explicit=pretrain.explicit_fields(),
                        bracket=FLAGS.max_batch_range)
      rep = {"topology": FLAGS.topology, "variant": FLAGS.config.model.variant,
             "max_batch": found}
    else:
      rep = report(FLAGS.config, FLAGS.topology, FLAGS.hbm_gib, FLAGS.headroom,
                   pretrain.explicit_fields())
  except AotError as e:
    fail(e)
  print(table(rep))
  print(json.dumps(rep, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def run():
  """`python -m mae_jax.aot`, the console script `mae-aot`."""
  define_flags()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
