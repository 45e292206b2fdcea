"""Pretraining: the MAE program (mae_jax.train.program) on the one loop (mae_jax.train.loop), then the
final evaluation, picture and summary."""
import collections
import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import shutil
import sys
import time

import jax

from mae_jax import data, paths
from mae_jax.data import device_resize
from mae_jax.evaluation import knn, pictures, watch
from mae_jax.model import sizes
from mae_jax.train import checkpoints, config as config_lib, loop, param_dirs, program, sharding
from mae_jax.train import stages


# fold_in data of the evaluation's masks: apart from every training step's (0, 1, 2, ...).
EVAL_RNG_STREAM = 2**31 - 1


@dataclasses.dataclass
class Run(program.Pretraining):
  """The pretraining program with what a run wires around it: its workdir, data sources
  (None in a compile-only run) and notes for the run's log."""
  workdir: str | None = None
  train_src: data.Source | None = None
  test_src: data.Source | None = None
  notes: list = dataclasses.field(default_factory=list)
  explicit: tuple = ()  # the config fields given on the command line
  # {stage.key: (compiled step, seconds to compile it)}: this invocation's programs
  compiled: dict = dataclasses.field(default_factory=dict)

  @property
  def resize(self):
    """Where training crops are resized: 'host' or 'device' (config.data.resize)."""
    return device_resize.resolve(self.config.data.get("resize", "auto"),
                                 sharding.platform(self.mesh))


def build_run(config, workdir, explicit=()):
  """Validate the config and build data sources, model, optimizer and mesh. `explicit`:
  the config fields given on the command line (smoke=True leaves them as they are)."""
  notes = []
  if config.smoke:
    before = config.copy_and_resolve_references()
    config = config_lib.apply_smoke(config, explicit)
    kept = sorted(set(explicit) & set(config_lib.SMOKE))
    notes.append("smoke=True replaced " + ", ".join(config_lib.smoke_replaced(before, config))
                 + ("; kept the command line's " + ", ".join(kept) if kept else ""))
  sizes.check(config, explicit)
  config_lib.validate(config)
  config_lib.validate_logging(config)
  train_src = data.load_source(config.data, "train")
  test_src = data.load_source(config.data, "test")
  if test_src.note:
    notes.append(test_src.note)
  config_lib.check_data_size(config, len(train_src))
  pre = program.pretraining(config, jax.devices(), len(train_src),
                            (train_src.mean, train_src.std))
  return Run(**{f.name: getattr(pre, f.name) for f in dataclasses.fields(pre)},
             workdir=workdir, train_src=train_src, test_src=test_src, notes=notes,
             explicit=tuple(explicit))


def fresh_state(run):
  """The step-0 state of the seed, with an imported checkpoint's params where
  config.init_from names one."""
  state = run.init(jax.random.key(run.config.seed))
  if run.config.init_from:
    state = state.replace(params=load_init_params(run, state.params))
  return state


def load_init_params(run, params):
  """Parameters of an imported checkpoint (python -m mae_jax.convert), checked against
  this run's model; the optimizer state stays fresh."""
  loaded, fields = param_dirs.load_params(run.config.init_from, target=params)
  ours = sizes.model_kwargs(run.config.model, run.config.data.image_size,
                             run.config.data.channels)
  differ = sorted(k for k, v in fields.items() if k in ours and ours[k] != v)
  if differ:
    raise config_lib.ConfigError(
        f"config.init_from={run.config.init_from}: its model differs in "
        + ", ".join(f"{k} ({fields[k]} there, {ours[k]} here)" for k in differ))
  return loaded


def device_batches(run, start_step):
  """Host batches for steps start_step + 1, ... as global arrays, two steps ahead, each
  stage's at its image size (the crops of a step do not depend on it)."""
  for stage in run.stages:
    if stage.end > start_step:
      first = max(start_step, stage.start)
      host = stage_batches(run, stage.image_size, first)
      yield from sharding.device_batches(
          itertools.islice(host, stage.end - first), run.mesh,
          finish=device_crops(run, stage.image_size) if run.resize == "device" else None)


def stage_batches(run, image_size, start_step):
  cfg = run.config
  return data.make_train_batches(
      run.train_src, image_size=image_size, global_batch_size=cfg.batch_size,
      seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      augment=cfg.data.augment, crop_scale=tuple(cfg.data.crop_scale), start_step=start_step,
      num_workers=cfg.data.num_workers, repeat_samples=cfg.data.get("repeat_samples", 1),
      worker_processes=cfg.data.get("worker_processes", 0), resize=run.resize)


def device_crops(run, image_size):
  """data.resize='device': the jitted resize of the host's crop regions to the batch the
  train step takes (mae_jax.data.device_resize), sharded as the batch."""
  crops = functools.partial(device_resize.crops_of, image_size=image_size)
  return program.jit(crops, run.mesh, out_shardings=sharding.batch_sharding(run.mesh))


def stage_step(run, step, logger):
  """The compiled step of the stage that trains `step`; a stage's program is compiled
  (its seconds logged and kept for the summary) when its first step comes."""
  stage = stages.stage_at(run.stages, step)
  name = f"stage {run.stages.index(stage) + 1}/{len(run.stages)}: {stage.describe()}"
  if stage.key not in run.compiled:
    t0 = time.perf_counter()
    compiled = run.stage_step(stage).lower(*run.abstract_inputs(stage)).compile()
    run.compiled[stage.key] = compiled, time.perf_counter() - t0
    logger.info(f"{name}; compiled in {run.compiled[stage.key][1]:.1f} s")
  elif step == stage.start + 1:
    logger.info(name)
  return run.compiled[stage.key][0]


def job_of(run):
  """The loop's view of a pretraining run, with its monitors (each None unless its config
  field is set): kNN every knn_every_epochs, reconstructions every vis_every_steps."""
  monitor = knn.Monitor.for_run(run, run.explicit)
  pictures_every = watch.ReconstructionMonitor.for_run(run)
  every = tuple(m for m in (
      monitor and (monitor.every_steps,
                   lambda step, state, logger: monitor(step, state.params, logger)),
      pictures_every and (pictures_every.every_steps, pictures_every)) if m)
  on_exit = pictures_every and (lambda outcome, logger: pictures_every.close(
      logger, outcome.train_seconds))
  return loop.Job(
      kind="pretrain", workdir=run.workdir, config=run.config, program=run,
      total_steps=run.durations.total_steps, images_per_step=run.config.batch_size,
      batches=functools.partial(device_batches, run), fresh_state=lambda: fresh_state(run),
      check_resume=lambda saved: config_lib.check_resume(run.config, saved, run.workdir,
                                                           sizes.model_shape),
      describe=functools.partial(describe, run), every=every, on_exit=on_exit,
      step_for=functools.partial(stage_step, run),
      input_advice=input_advice(run.config, sharding.platform(run.mesh)),
      notes=list(run.notes))


def input_advice(config, platform):
  """What can feed a pretraining faster, by its data and devices: decode threads and a
  prepared dataset only where images are decoded, the device resize only on an
  accelerator."""
  d = config.data
  decoded = d.name not in ("synthetic", "prepared", "fashion_mnist")  # folders, TFDS
  options = ["more data.worker_processes"] + (["more data.num_workers"] if decoded else [])
  if decoded:
    options.append("a prepared dataset (python -m mae_jax.prepare, then data.name=prepared)")
  if platform != "cpu" and d.get("resize", "auto") == "host":
    options.append("data.resize=device")
  return ", ".join(options + ["data.repeat_samples=2"])


def evaluate_reconstruction(run, params):
  """Test-split masked-patch MSE on [0, 1] pixels, the per-pixel-mean baseline, and the
  first batch's images and reconstructions for the picture."""
  cfg = run.config
  baseline = data.per_pixel_mean(run.train_src, cfg.data.image_size)
  eval_fn = run.eval_step(baseline)
  rng = jax.random.fold_in(jax.random.key(cfg.seed), EVAL_RNG_STREAM)
  sums = collections.Counter()
  first = None
  batches = data.make_eval_batches(run.test_src, image_size=cfg.data.image_size,
                                   batch_size=cfg.eval_batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  for i, batch in enumerate(batches):
    batch = sharding.global_batch(batch, run.mesh)
    out = eval_fn(params, batch, jax.random.fold_in(rng, i))
    for key in ("sq_err", "baseline_sq_err", "count"):
      sums[key] += float(out[key])
    if first is None:  # the picture's: only real images, not the padding of a short split
      real = sharding.to_host(batch["valid"])
      first = tuple(sharding.to_host(x)[real] for x in (batch["image"], out["pred"],
                                                         out["mask"]))
  return {"test_masked_mse": sums["sq_err"] / sums["count"],
          "baseline_masked_mse": sums["baseline_sq_err"] / sums["count"]}, first


def save_reconstructions(run, first, path):
  images_u8, pred_BNP, mask_BN = first
  n = min(run.config.num_vis_images, len(images_u8))
  title = (f"step {run.durations.total_steps} (the end) - "
           f"{pictures.target_note(run.config.model.norm_pix_loss)}")
  return pictures.save_reconstructions(images_u8[:n], pred_BNP[:n], mask_BN[:n],
                                        run.model.patch_size, path, title=title)


def skipped_images(run):
  """{split: number of image files skipped as unreadable so far} (folder datasets)."""
  return {split: len(getattr(src, "skipped", None) or {})
          for split, src in (("train", run.train_src), ("test", run.test_src))}


def write_summary(run, results, train_seconds, final_loss, images_per_sec, skipped_steps=0,
                  input_wait=None):
  """summary.json: test MSEs, final loss (null where not finite), steps, skipped updates
  and images, this invocation's training seconds and images/s (after the first step:
  compilation left out), its input-wait share, devices, model and stages."""
  if final_loss is not None and not math.isfinite(final_loss):
    final_loss = None  # JSON has no NaN; skipped_steps says why
  summary = dict(results, final_train_loss=final_loss, steps=run.durations.total_steps,
                 skipped_steps=skipped_steps, skipped_images=skipped_images(run),
                 input_wait_share=input_wait and round(input_wait, 4),
                 train_seconds=round(train_seconds, 1),
                 images_per_sec=images_per_sec and round(images_per_sec, 1), devices=jax.device_count(),
                 model=sizes.model_kwargs(run.config.model, run.config.data.image_size,
                                           run.config.data.channels))
  summary["model"].update(dtype=run.config.model.dtype,
                          encoder_tokens=run.config.model.get("encoder_tokens", "visible"),
                          kernels=dataclasses.asdict(run.model.kernels))
  summary["stages"] = [dict(dataclasses.asdict(s), compile_seconds=round(
      run.compiled[s.key][1], 2) if s.key in run.compiled else None)
                       for s in run.stages]  # compile_seconds: this invocation's
  path = paths.join(run.workdir, "summary.json")
  paths.write_atomic(path, json.dumps(summary, indent=2, default=str))
  return path


def train_and_evaluate(config, workdir, explicit=()):
  """Pretrain (resuming from `workdir` if it holds checkpoints), then evaluate; returns
  (state, results or None where the run stopped before its end).

  `workdir` may be local or gs://BUCKET/PATH (mae_jax.paths). `explicit`: the config fields
  given on the command line (build_run)."""
  checkpoints.check_workdir(workdir)
  workdir = loop.check_path("--workdir", workdir)
  if not paths.is_gcs(workdir):  # before the data is read (a bucket's: once it is reached)
    loop.check_kind(workdir, "pretrain")
  run = build_run(config, workdir, explicit)
  outcome, results = loop.run(job_of(run), lambda outcome, logger: finish(
      run, outcome.state, logger, outcome.train_seconds, outcome.final_loss,
      outcome.images_per_sec, outcome.input_wait_share))
  return outcome.state, results


def finish(run, state, logger, train_seconds, final_loss, images_per_sec, input_wait=None):
  """Final evaluation, picture and summary (process 0 writes them)."""
  results, first = evaluate_reconstruction(run, state.params)
  logger.scalars(run.durations.total_steps, results, prefix="test")  # beside the training's
  skipped = int(state.skipped)
  if jax.process_index() == 0:
    png = paths.join(run.workdir, "reconstructions.png")
    try:
      save_reconstructions(run, first, png)
    except Exception as e:  # pylint: disable=broad-except (a picture never loses the run)
      png = f"not drawn ({type(e).__name__}: {e})"
    summary = write_summary(run, results, train_seconds, final_loss, images_per_sec, skipped,
                            input_wait)
    images = skipped_images(run)
    if skipped or any(images.values()):
      logger.info(f"skipped: {skipped} non-finite update(s) (skip_nonfinite); "
                  f"{images['train']} train and {images['test']} test image file(s) that "
                  "could not be read")
    logger.info(
        f"test masked MSE {results['test_masked_mse']:.4f} (per-pixel-mean baseline "
        f"{results['baseline_masked_mse']:.4f}) after {train_seconds:.0f} s of training\n"
        f"  checkpoints:     {paths.join(run.workdir, 'checkpoints')}\n"
        f"  tensorboard:     {tensorboard_command(run.workdir)}\n"
        f"  reconstructions: {png}\n  summary:         {summary}")
  if not all(math.isfinite(v) for v in results.values()):
    raise loop.NonFiniteLossError(
        f"the final model's test masked MSE is not finite ({results['test_masked_mse']}) "
        f"after {skipped} skipped non-finite update(s); the run diverged: lower "
        "optim.base_lr or set optim.grad_clip")
  return results


def tensorboard_command(workdir):
  """The command that shows the run in TensorBoard, as this environment can run it."""
  if shutil.which("tensorboard") or importlib.util.find_spec("tensorboard") is not None:
    return f"tensorboard --logdir {workdir}"
  return (f"{sys.executable} -m pip install tensorboard && {sys.executable} -m "
          f"tensorboard.main --logdir {workdir}")


def describe(run, restored):
  """The run's first line: model, data, lengths, devices; where it resumes."""
  d = run.durations
  unreadable = getattr(run.train_src, "listed_unreadable", 0)
  images = f"{len(run.train_src)} train images" + (  # the unreadable ones left out
      f", {unreadable} unreadable skipped" if unreadable else "")
  head = (f"mae_jax: {run.num_params / 1e6:.2f}M-parameter MAE on {run.config.data.name} "
          f"({images}), "
          f"at {run.config.data.image_size} px, {run.config.data.channels} channel(s), "
          f"{d.total_steps} steps of batch {run.config.batch_size} "
          f"({d.steps_per_epoch} steps/epoch, warmup {d.warmup_steps}), "
          f"{jax.device_count()} device(s), mesh {dict(run.mesh.shape)}")
  if len(run.stages) > 1:
    head += f"; {len(run.stages)} stages (config.schedule)"
  resume = f"; resuming from step {restored}" if restored is not None else ""
  return head + resume

