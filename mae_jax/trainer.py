"""The pretraining loop: data -> jitted sharded step -> metrics/log -> checkpoint -> eval."""
import collections
import dataclasses
import functools
import json
import math
import os
import time

import flax.linen as nn
import jax
import ml_collections
import optax

from mae_jax import checkpoint, config as config_lib, data, distributed, models, optim, paths
from mae_jax import sharding
from mae_jax import train_step as ts
from mae_jax import visualize
from mae_jax.data import device_resize
from mae_jax.evaluation import knn
from mae_jax.logger import InputWait, Logger


# fold_in data of the evaluation's masks: apart from every training step's (0, 1, 2, ...).
EVAL_RNG_STREAM = 2**31 - 1


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the state of that step is never saved."""


@dataclasses.dataclass
class Run:
  """Everything a run wires together, built once before the loop."""
  config: ml_collections.ConfigDict
  workdir: str | None
  model: nn.Module
  mesh: jax.sharding.Mesh
  train_src: data.Source | None  # None in a compile-only run (mae_jax.aot)
  test_src: data.Source | None
  durations: config_lib.Durations
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: ts.TrainState  # a NamedSharding per leaf of the state
  num_params: int
  norm_stats: tuple  # (mean, std) per channel that the step normalizes images with
  notes: list = dataclasses.field(default_factory=list)  # for the run's log at start-up


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
  config_lib.validate(config)
  train_src = data.load_source(config.data, "train")
  test_src = data.load_source(config.data, "test")
  if test_src.note:
    notes.append(test_src.note)
  config_lib.check_data_size(config, len(train_src))
  run = step_run(config, jax.devices(), len(train_src), (train_src.mean, train_src.std),
                 workdir, train_src, test_src)
  run.notes.extend(notes)
  return run


def step_run(config, devices, num_train_examples, norm_stats, workdir=None, train_src=None,
             test_src=None):
  """The Run of a validated config over `devices`: mesh, model for their platform,
  optimizer and state shardings. Without sources it is compile-only: mae_jax.aot builds
  the trainer's step this way for TPU topology devices."""
  dur = config_lib.durations(config, num_train_examples)
  mesh = sharding.make_mesh(config.mesh, devices)
  model = models.build_model(config, sharding.platform(mesh))
  tx, schedule = optim.make_optimizer(config.optim, config.batch_size, dur.warmup_steps,
                                      dur.total_steps)
  abstract = abstract_state(model, tx, config)
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  return Run(config, workdir, model, mesh, train_src, test_src, dur, tx, schedule,
             sharding.state_shardings(abstract, mesh), num_params, norm_stats)


def image_shape(config):
  return (config.data.image_size,) * 2 + (config.data.channels,)


def abstract_state(model, tx, config):
  """The TrainState as ShapeDtypeStructs (the key made inside: shapes only, no compile)."""
  return jax.eval_shape(
      lambda: ts.init_state(model, tx, jax.random.key(0), image_shape=image_shape(config)))


def initial_state(run, ckpt):
  """The latest checkpoint's state if the workdir has one, else a fresh initialization."""
  saved = checkpoint.load_config_dict(run.workdir)
  if ckpt.latest_step() is not None and saved is not None:
    config_lib.check_resume(run.config, saved, run.workdir)  # before anything compiles
    change = config_lib.check_config_change(run.config, saved, run.workdir)
    if change:
      ckpt.notes.append(change)
  init = jax.jit(functools.partial(ts.init_state, run.model, run.tx,
                                   image_shape=image_shape(run.config)),
                 out_shardings=run.state_shardings)
  state = init(jax.random.key(run.config.seed))
  ckpt.check_space(state)
  unfit = None
  if saved is None and ckpt.latest_step() is not None:  # nothing says which config wrote it
    unfit = (f"{run.workdir} has no config.json to tell whether the checkpoint is damaged "
             "or of another config: resume with the config of the run that wrote it, or "
             "use a new --workdir")
  state, step = ckpt.restore_latest(state, unfit)
  if step is None and run.config.init_from:
    state = state.replace(params=load_init_params(run, state.params))
  return state, step


def load_init_params(run, params):
  """Parameters of an imported checkpoint (python -m mae_jax.convert), checked against
  this run's model; the optimizer state stays fresh."""
  loaded, fields = checkpoint.load_params(run.config.init_from, target=params)
  ours = models.model_kwargs(run.config.model, run.config.data.image_size,
                             run.config.data.channels)
  differ = sorted(k for k, v in fields.items() if k in ours and ours[k] != v)
  if differ:
    raise config_lib.ConfigError(
        f"config.init_from={run.config.init_from}: its model differs in "
        + ", ".join(f"{k} ({fields[k]} there, {ours[k]} here)" for k in differ))
  return loaded


def compile_train_step(run):
  """The train step jitted with explicit shardings, the old state donated."""
  step = functools.partial(
      ts.train_step, model=run.model, tx=run.tx, schedule=run.schedule,
      mean=run.norm_stats[0], std=run.norm_stats[1],
      norm_pix_loss=run.config.model.norm_pix_loss,
      accum_steps=run.config.grad_accum_steps, skip_nonfinite=run.config.skip_nonfinite)
  repl = sharding.replicated(run.mesh)
  batch_sh = {"image": sharding.batch_sharding(run.mesh),
              "label": sharding.batch_sharding(run.mesh)}

  def step_in_mesh(state, batch, base_rng):  # the model's vit.batch_split sees the mesh
    with jax.sharding.use_abstract_mesh(run.mesh.abstract_mesh):
      return step(state, batch, base_rng)

  return jax.jit(step_in_mesh, in_shardings=(run.state_shardings, batch_sh, repl),
                 out_shardings=(run.state_shardings, repl), donate_argnums=0)


def device_batches(run, start_step):
  """Host batches for steps start_step.. as global arrays, two steps ahead."""
  cfg = run.config
  resize = device_resize.resolve(cfg.data.get("resize", "auto"), sharding.platform(run.mesh))
  host = data.make_train_batches(
      run.train_src, image_size=cfg.data.image_size, global_batch_size=cfg.batch_size,
      seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      augment=cfg.data.augment, crop_scale=tuple(cfg.data.crop_scale), start_step=start_step,
      num_workers=cfg.data.num_workers, repeat_samples=cfg.data.get("repeat_samples", 1),
      worker_processes=cfg.data.get("worker_processes", 0), resize=resize)
  finish = device_crops(run) if resize == "device" else None
  queue = collections.deque()
  for batch in host:
    batch = sharding.global_batch(batch, run.mesh)
    queue.append(finish(batch) if finish else batch)
    if len(queue) == 2:
      yield queue.popleft()


def device_crops(run):
  """data.resize='device': the jitted resize of the host's crop regions to the batch the
  train step takes (mae_jax.data.device_resize), sharded as the batch."""
  crops = functools.partial(device_resize.crops_of, image_size=run.config.data.image_size)
  return jax.jit(crops, out_shardings=sharding.batch_sharding(run.mesh))


def check_finite(step, metrics, ckpt, skip_nonfinite=False):
  """Stop on a step whose loss, gradients or new parameters are not finite, unless the
  step skipped that update (skip_nonfinite); nothing of such a step is ever saved."""
  loss = float(metrics["loss"])
  if metrics["nonfinite"] and not skip_nonfinite:
    last = ckpt.latest_step()
    raise NonFiniteLossError(
        f"non-finite loss, gradients or update at step {step} (loss {loss}, grad_norm "
        f"{float(metrics['grad_norm'])}); nothing of it was saved; last good checkpoint: "
        f"{'none' if last is None else f'step {last} in {ckpt.directory}'}; "
        "lower optim.base_lr, set optim.grad_clip, or set skip_nonfinite=True")
  return loss


def train_loop(run, state, ckpt, logger, stop=None, input_wait=None):
  """Run steps until total_steps, or until `stop` (a distributed.GracefulStop) says all
  processes reached the step a signal asks to save; metrics of step N are read after N+1
  is dispatched.

  Returns (state, last loss, images/s after the first step: compilation left out)."""
  cfg, total = run.config, run.durations.total_steps
  step_fn = compile_train_step(run)
  base_rng = jax.random.key(cfg.seed)
  start = int(state.step)
  last = total if cfg.stop_after_steps is None else min(total, start + cfg.stop_after_steps)
  pending = None  # (step number after the update, metrics) not yet read on the host
  loss = None
  monitor = knn.Monitor.for_run(run)  # None unless config.knn_every_epochs is set
  batches = device_batches(run, start)
  input_wait = input_wait or InputWait(run.config.data.get("input_wait_warn", 0.2))
  t_compiled = None
  for step in range(start + 1, last + 1):
    t_ask = time.perf_counter()
    batch = next(batches)
    input_wait.add(time.perf_counter() - t_ask)
    state, metrics = step_fn(state, batch, base_rng)
    if t_compiled is None:  # the first call compiled, then dispatched asynchronously
      jax.block_until_ready(state.step)
      t_compiled = time.perf_counter()
      input_wait.start()
    if pending is not None:
      loss = report(run, pending, ckpt, logger, input_wait)
    pending = (step, metrics)
    stopping = stop is not None and stop.reached(step)
    if step % cfg.checkpoint_every_steps == 0 or step == last or stopping:
      loss = report(run, pending, ckpt, logger, input_wait)  # saved once known finite
      pending = None
      if ckpt.save(step, state, force=step == last or stopping):
        sync_logs(logger, run.workdir)  # a gs:// workdir gets the records saved so far
    if monitor is not None and monitor.due(step):
      monitor(step, state.params, logger)  # before the next step donates these params
    if stopping:
      break
  jax.block_until_ready(state.step)
  steps_after_first = int(state.step) - start - 1
  images_per_sec = (steps_after_first * cfg.batch_size / (time.perf_counter() - t_compiled)
                    if steps_after_first > 0 else None)
  return state, loss, images_per_sec


def sync_logs(logger, workdir):
  """Copy the logs to a gs:// workdir; CheckpointError (one line) if it cannot be written."""
  try:
    logger.sync()
  except Exception as e:  # gcsfs raises OSError, aiohttp and google-auth errors
    raise checkpoint.CheckpointError(f"cannot copy the run's logs to {workdir}: "
                                     f"{checkpoint.gcs_reason(e)}") from e


def report(run, pending, ckpt, logger, input_wait=None):
  """Fetch one step's metrics, stop on a non-finite loss, log at the interval (with the
  share of wall time spent waiting for input since the last log)."""
  step, metrics = pending
  metrics = jax.device_get(metrics)
  loss = check_finite(step, metrics, ckpt, run.config.skip_nonfinite)
  if step % run.config.log_every_steps == 0 or step == run.durations.total_steps:
    share = input_wait.interval_share() if input_wait else None
    if share is not None:
      metrics = dict(metrics, input_wait=share)
      if (note := input_wait.advice(share, step)) is not None:
        logger.info(note)
    logger.scalars(step, metrics)
    logger.progress(step, metrics, run.config.batch_size)
  return loss


def evaluate_reconstruction(run, params):
  """Test-split masked-patch MSE on [0, 1] pixels, the per-pixel-mean baseline, and the
  first batch's images and reconstructions for the picture."""
  cfg = run.config
  baseline = data.per_pixel_mean(run.train_src, cfg.data.image_size)
  eval_fn = jax.jit(functools.partial(ts.eval_step, model=run.model, mean=run.train_src.mean,
                                      std=run.train_src.std, baseline_HWC=baseline,
                                      norm_pix_loss=cfg.model.norm_pix_loss))
  rng = jax.random.fold_in(jax.random.key(cfg.seed), EVAL_RNG_STREAM)
  sums = collections.Counter()
  first = None
  batches = data.make_eval_batches(run.test_src, image_size=cfg.data.image_size,
                                   batch_size=cfg.eval_batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  for i, batch in enumerate(batches):
    out = eval_fn(params, sharding.global_batch(batch, run.mesh), jax.random.fold_in(rng, i))
    for key in ("sq_err", "baseline_sq_err", "count"):
      sums[key] += float(out[key])
    if first is None:
      first = (batch["image"], sharding.to_host(out["pred"]), sharding.to_host(out["mask"]))
  return {"test_masked_mse": sums["sq_err"] / sums["count"],
          "baseline_masked_mse": sums["baseline_sq_err"] / sums["count"]}, first


def save_reconstructions(run, first, path):
  images_u8, pred_BNP, mask_BN = first
  n = min(run.config.num_vis_images, len(images_u8))
  return visualize.save_reconstructions(images_u8[:n], pred_BNP[:n], mask_BN[:n],
                                        run.model.patch_size, path)


def skipped_images(run):
  """{split: number of image files skipped as unreadable so far} (folder datasets)."""
  return {split: len(getattr(src, "skipped", None) or {})
          for split, src in (("train", run.train_src), ("test", run.test_src))}


def write_summary(run, results, train_seconds, final_loss, images_per_sec, skipped_steps=0,
                  input_wait=None):
  """summary.json: test MSEs, final loss (null where the last step's was not finite and
  skipped), steps, updates skipped as non-finite, images skipped as unreadable, this
  invocation's training seconds and images/s (the train loop after its first step: host
  pipeline and checkpoints included, compilation not), the share of that time spent
  waiting for input, devices and model."""
  if final_loss is not None and not math.isfinite(final_loss):
    final_loss = None  # JSON has no NaN; skipped_steps says why
  summary = dict(results, final_train_loss=final_loss, steps=run.durations.total_steps,
                 skipped_steps=skipped_steps, skipped_images=skipped_images(run),
                 input_wait_share=input_wait and round(input_wait, 4),
                 train_seconds=round(train_seconds, 1),
                 images_per_sec=images_per_sec and round(images_per_sec, 1), devices=jax.device_count(),
                 model=models.model_kwargs(run.config.model, run.config.data.image_size,
                                           run.config.data.channels))
  summary["model"].update(dtype=run.config.model.dtype,
                          encoder_tokens=run.config.model.get("encoder_tokens", "visible"))
  path = paths.join(run.workdir, "summary.json")
  paths.write_atomic(path, json.dumps(summary, indent=2, default=str))
  return path


def train_and_evaluate(config, workdir, explicit=()):
  """Pretrain (resuming from `workdir` if it holds checkpoints), then evaluate.

  `workdir` may be local or gs://BUCKET/PATH (mae_jax.paths). `explicit`: the config fields
  given on the command line (build_run)."""
  checkpoint.check_workdir(workdir)
  workdir = check_path("--workdir", workdir)
  run = build_run(config, workdir, explicit)
  # the lock file needs a writable workdir; an unwritable one is named for its checkpoints
  checkpoint.check_writable(paths.join(workdir, "checkpoints"))
  lock = checkpoint.lock_workdir(workdir)  # before anything in the workdir is touched
  try:
    return train_locked(run, lock)
  finally:
    if lock is not None:
      lock.release()


def train_locked(run, lock):
  """train_and_evaluate once this run holds the workdir."""
  workdir = run.workdir
  ckpt = checkpoint.Checkpointer(paths.join(workdir, "checkpoints"),
                                 keep=run.config.keep_checkpoints,
                                 every_steps=run.config.checkpoint_every_steps)
  state, restored = initial_state(run, ckpt)
  checkpoint.save_config(run.config, workdir, int(state.step))
  logger = Logger(workdir, run.durations.total_steps, int(state.step))
  logger.info(describe(run, restored))
  lock_notes = [lock.note] if lock is not None and lock.note else []
  for note in run.notes + lock_notes + ckpt.notes:
    logger.info(note)
  t0 = time.perf_counter()
  input_wait = InputWait(run.config.data.get("input_wait_warn", 0.2))
  with distributed.GracefulStop() as stop:
    try:
      state, final_loss, images_per_sec = train_loop(run, state, ckpt, logger, stop,
                                                     input_wait)
    finally:
      ckpt.wait()
  train_seconds = time.perf_counter() - t0
  results = None
  if int(state.step) >= run.durations.total_steps:
    results = finish(run, state, logger, train_seconds, final_loss, images_per_sec,
                     input_wait.total_share())
  else:
    why = stop.signal_name or "stop_after_steps"
    logger.info(f"stopped at step {int(state.step)} ({why}); run again to resume")
  ckpt.close()
  logger.close()
  return state, results


def finish(run, state, logger, train_seconds, final_loss, images_per_sec, input_wait=None):
  """Final evaluation, picture and summary (process 0 writes them)."""
  results, first = evaluate_reconstruction(run, state.params)
  skipped = int(state.skipped)
  if jax.process_index() == 0:
    png = save_reconstructions(run, first, paths.join(run.workdir, "reconstructions.png"))
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
        f"  tensorboard:     tensorboard --logdir {run.workdir}\n"
        f"  reconstructions: {png}\n  summary:         {summary}")
  if not all(math.isfinite(v) for v in results.values()):
    raise NonFiniteLossError(
        f"the final model's test masked MSE is not finite ({results['test_masked_mse']}) "
        f"after {skipped} skipped non-finite update(s); the run diverged: lower "
        "optim.base_lr or set optim.grad_clip")
  return results


def check_path(flag, path):
  """`path` unchanged, after a check: ConfigError naming `flag` for a gs:// path without
  a valid bucket."""
  try:
    paths.resolve(path)
    return os.fspath(path)
  except paths.PathError as e:
    raise config_lib.ConfigError(f"{flag}: {e}") from None


def describe(run, restored):
  d = run.durations
  unreadable = getattr(run.train_src, "listed_unreadable", 0)
  images = f"{len(run.train_src)} train images" + (  # the unreadable ones left out
      f", {unreadable} unreadable skipped" if unreadable else "")
  head = (f"mae_jax: {run.num_params / 1e6:.2f}M-parameter MAE on {run.config.data.name} "
          f"({images}), "
          f"{d.total_steps} steps of batch {run.config.batch_size} "
          f"({d.steps_per_epoch} steps/epoch, warmup {d.warmup_steps}), "
          f"{jax.device_count()} device(s), mesh {dict(run.mesh.shape)}")
  resume = f"; resuming from step {restored}" if restored is not None else ""
  return head + resume

