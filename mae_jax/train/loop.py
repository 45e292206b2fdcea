"""The one training loop: pretraining, fine-tuning, the linear probe and the conv baseline
all run here, with the same guarantees (docs/reliability.md): the workdir's lock,
checkpoints (periodic, final, on SIGTERM / SIGINT; never of a non-finite step), exact
resume by rerunning the command (batches and RNG are functions of (seed, step)), each
launch's config kept and checked, and the logs. A job gives its program
(mae_jax.train.program.build), its batches from a step on and its config.
"""
import dataclasses
import json
import math
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections

from mae_jax import paths
from mae_jax.train import checkpoints, config as config_lib, distributed, workdirs
from mae_jax.train.logger import InputWait, Logger, WandbStartError, wandb_project

KINDS = {"pretrain": "pretraining", "finetune": "fine-tuning", "linprobe": "linear probe",
         "conv_mae": "conv baseline"}


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the state of that step is never saved."""


@dataclasses.dataclass
class Job:
  """A training job as the loop runs it.

  config: saved with each launch, compared on resume; the loop reads seed, the
  checkpoint / log / stop fields, allow_config_change, skip_nonfinite, data.input_wait_warn.
  program: a mae_jax.train.program.Program. batches(start): global batches of steps
  start + 1, ... check_resume(saved): ConfigError where the saved config (a dict) is of a
  job this one cannot continue. every: (every_steps, fn(step, state, logger)) pairs run
  once those steps' metrics are known finite. step_for(step, logger): the step function
  of step `step` (pretraining's stages); default program.step.
  """
  kind: str
  workdir: str
  config: ml_collections.ConfigDict
  program: Any
  total_steps: int
  images_per_step: int
  batches: Callable[[int], Iterator]
  fresh_state: Callable[[], Any] | None = None  # default: program.init of the seed's key
  check_resume: Callable[[dict], None] | None = None
  describe: Callable[[int | None], str] | None = None
  on_resume: Callable[[int], None] | None = None  # the step resumed from, before the first
  on_exit: Callable[[Any, Any], None] | None = None  # (outcome, logger) before logs close
  input_advice: str | None = None  # what to try when input-bound (logger.InputWait)
  every: tuple = ()
  step_for: Callable[[int, Any], Callable] | None = None
  base_rng: Any = None  # default: jax.random.key(config.seed)
  notes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Outcome:
  """What one launch of a job did."""
  state: Any
  restored: int | None  # the step resumed from
  final_loss: float | None
  images_per_sec: float | None  # after the first step of this launch (compile left out)
  train_seconds: float
  input_wait_share: float | None
  stopped_by: str | None  # None: the job reached total_steps

  @property
  def complete(self):
    return self.stopped_by is None


def check_kind(workdir, kind, saved=None):
  """Refuse a workdir written by another kind of job (config.json's "job"; workdirs from
  before it was recorded are pretraining's). `saved`: its config, where already read."""
  saved = workdirs.load_config_dict(workdir) if saved is None else saved
  theirs = None if saved is None else saved.get("job", "pretrain")
  if theirs not in (None, kind):
    raise config_lib.ConfigError(
        f"--workdir {workdir}: holds a {KINDS.get(theirs, theirs)} run "
        f"({paths.join(workdir, 'config.json')}), not a {KINDS[kind]} one; use "
        "another --workdir")


def check_identity(config, workdir, fields, saved):
  """Refuse to resume a job whose saved config (a dict) differs in one of `fields` (what
  the job is of: its encoder, its classes), whatever allow_config_change says."""
  differ = [f for f in fields if f in saved and saved[f] != config[f]]
  if differ:
    raise config_lib.ConfigError(
        f"config.{differ[0]}: the run in {workdir} is of "
        + "; ".join(f"{f} {saved[f]!r}, this launch's {f} is {config[f]!r}" for f in differ)
        + f": it cannot resume with another; use another --workdir (or the {differ[0]} "
        "that run had)")


def check_before_start(job):
  """The saved config against this launch's, before anything compiles; notes of changes
  allowed by allow_config_change."""
  saved = workdirs.load_config_dict(job.workdir)
  if saved is None:
    return saved
  check_kind(job.workdir, job.kind, saved)
  if job.check_resume is not None:
    job.check_resume(saved)
  change = config_lib.check_config_change(job.config, saved, job.workdir)
  if change:
    job.notes.append(change)
  return saved


def start_state(job, ckpt, saved):
  """(state, step restored or None): the latest checkpoint's, else a fresh one."""
  unfit = None
  if saved is None and ckpt.latest_step() is not None:  # nothing says which config wrote it
    unfit = (f"{job.workdir} has no config.json to tell whether the checkpoint is damaged "
             "or of another config: resume with the config of the run that wrote it, or "
             "use a new --workdir")
  state, step = ckpt.restore_latest(job.program.abstract_state, unfit)
  if step is None:
    state = (job.fresh_state or (lambda: job.program.init(jax.random.key(job.config.seed))))()
  ckpt.check_space(state)
  return state, step


def run(job, finish=None):
  """Run `job` in its workdir to the end (or to a stop); `finish(outcome, logger)` runs on
  a complete job while the workdir is still held. Returns (outcome, what finish returned).
  """
  checkpoints.check_workdir(job.workdir)
  check_path("--workdir", job.workdir)
  # the lock file needs a writable workdir; an unwritable one is named for its checkpoints
  checkpoints.check_writable(paths.join(job.workdir, "checkpoints"))
  lock = workdirs.lock_workdir(job.workdir)  # before anything in the workdir is touched
  try:
    return run_locked(job, lock, finish)
  finally:
    if lock is not None:
      lock.release()


def run_locked(job, lock, finish):
  cfg = job.config
  saved = check_before_start(job)
  ckpt = checkpoints.Checkpointer(paths.join(job.workdir, "checkpoints"),
                                 keep=cfg.keep_checkpoints,
                                 every_steps=cfg.checkpoint_every_steps)
  state, restored = start_state(job, ckpt, saved)
  if restored is not None and job.on_resume is not None:
    job.on_resume(restored)
  workdirs.save_config(cfg, job.workdir, int(state.step), job=job.kind)
  logger = Logger(job.workdir, job.total_steps, int(state.step))
  if job.describe is not None:
    logger.info(job.describe(restored))
  lock_notes = [lock.note] if lock is not None and lock.note else []
  for note in job.notes + lock_notes + ckpt.notes:
    logger.info(note)
  start_wandb(job, logger)
  t0 = time.perf_counter()
  input_wait = InputWait(cfg.get("data", {}).get("input_wait_warn", 0.2), job.input_advice)
  with distributed.GracefulStop() as stop:
    try:
      state, loss, images_per_sec = steps(job, state, ckpt, logger, stop, input_wait)
    finally:
      ckpt.wait()
  done = int(state.step) >= job.total_steps
  outcome = Outcome(state, restored, loss, images_per_sec, time.perf_counter() - t0,
                    input_wait.total_share(),
                    None if done else stop.signal_name or "stop_after_steps")
  if job.on_exit is not None:
    job.on_exit(outcome, logger)
  result = None
  if done and finish is not None:
    result = finish(outcome, logger)
  elif not done:
    logger.info(f"stopped at step {int(state.step)} ({outcome.stopped_by}); run again to "
                "resume")
  ckpt.close()
  logger.close()
  return outcome, result


def start_wandb(job, logger):
  """Where config.logging.wandb names a project: the same scalars and pictures in that W&B
  project, in the run of this workdir; where W&B cannot start (on process 0, the one that
  logs), one line and exit 2 on every process."""
  project = wandb_project(job.config)
  if not project:
    return
  error = None
  try:
    logger.start_wandb(project, job.kind, json.loads(job.config.to_json_best_effort()))
  except WandbStartError as e:
    error = e
  if distributed.failed_on_process_0(error is not None):
    why = error or "W&B did not start on process 0 (its log says why)"
    raise config_lib.ConfigError(f"config.logging.wandb={project!r}: {why}") from None


def steps(job, state, ckpt, logger, stop=None, input_wait=None):
  """Run steps until total_steps, or until `stop` (a distributed.GracefulStop) says all
  processes reached the step a signal asks to save; metrics of step N are read after N+1
  is dispatched, so the host never stalls the device.

  Returns (state, last loss, images/s after the first step: compilation left out)."""
  cfg, total = job.config, job.total_steps
  base_rng = job.base_rng if job.base_rng is not None else jax.random.key(cfg.seed)
  start = int(state.step)
  last = total if cfg.get("stop_after_steps") is None else min(total,
                                                               start + cfg.stop_after_steps)
  pending, loss, t_compiled = None, None, None  # pending: (step, metrics) not yet read
  batches = job.batches(start)
  input_wait = input_wait or InputWait(0.2)
  for step in range(start + 1, last + 1):
    t_ask = time.perf_counter()
    batch = next(batches)
    input_wait.add(time.perf_counter() - t_ask)
    step_fn = job.program.step if job.step_for is None else job.step_for(step, logger)
    state, metrics = step_fn(state, batch, base_rng)
    if t_compiled is None:  # the first call compiled, then dispatched asynchronously
      jax.block_until_ready(state.step)
      t_compiled = time.perf_counter()
      input_wait.start()
    if pending is not None:
      loss = report(job, pending, ckpt, logger, input_wait)
    pending = (step, metrics)
    stopping = stop is not None and stop.reached(step)
    hooks = [fn for every, fn in job.every if every and step % every == 0]
    if step % cfg.checkpoint_every_steps == 0 or step == last or stopping or hooks:
      loss = report(job, pending, ckpt, logger, input_wait)  # known finite from here
      pending = None
      if (step % cfg.checkpoint_every_steps == 0 or step == last or stopping) and ckpt.save(
          step, state, force=step == last or stopping):
        sync_logs(logger, job.workdir)  # a gs:// workdir gets the records saved so far
    for fn in hooks:
      fn(step, state, logger)  # before the next step donates this state
    if stopping:
      break
  jax.block_until_ready(state.step)
  after_first = int(state.step) - start - 1
  images_per_sec = (after_first * job.images_per_step / (time.perf_counter() - t_compiled)
                    if after_first > 0 else None)
  return state, loss, images_per_sec


def report(job, pending, ckpt, logger, input_wait=None):
  """Fetch one step's metrics, stop on a non-finite one, log at the interval (with the
  share of wall time spent waiting for input since the last log)."""
  step, metrics = pending
  metrics = jax.device_get(metrics)
  loss = check_finite(step, metrics, ckpt, job.config.get("skip_nonfinite"))
  if step % job.config.log_every_steps == 0 or step == job.total_steps:
    share = input_wait.interval_share() if input_wait else None
    if share is not None:
      metrics = dict(metrics, input_wait=share)
      if (note := input_wait.advice(share, step)) is not None:
        logger.info(note)
    logger.scalars(step, metrics)
    logger.progress(step, metrics, job.images_per_step)
  return loss


def check_finite(step, metrics, ckpt, skip_nonfinite=None):
  """Stop on a step whose loss (or, where the step reports it, gradients or new
  parameters: metrics["nonfinite"]) is not finite, unless the step skipped that update
  (skip_nonfinite; None: a job whose step cannot skip); nothing of such a step is ever
  saved."""
  loss = float(metrics["loss"])
  nonfinite = metrics["nonfinite"] if "nonfinite" in metrics else not math.isfinite(loss)
  if nonfinite and not skip_nonfinite:
    last = ckpt.latest_step()
    grads = (f", grad_norm {float(metrics['grad_norm'])}" if "grad_norm" in metrics else "")
    raise NonFiniteLossError(
        f"non-finite loss, gradients or update at step {step} (loss {loss}{grads}); "
        "nothing of it was saved; last good checkpoint: "
        f"{'none' if last is None else f'step {last} in {ckpt.directory}'}; "
        "lower optim.base_lr, set optim.grad_clip" + (
            ", or set skip_nonfinite=True" if skip_nonfinite is not None else ""))
  return loss


def sync_logs(logger, workdir):
  """Copy the logs to a gs:// workdir; CheckpointError (one line) if it cannot be written."""
  try:
    logger.sync()
  except Exception as e:  # gcsfs raises OSError, aiohttp and google-auth errors
    raise checkpoints.CheckpointError(f"cannot copy the run's logs to {workdir}: "
                                     f"{checkpoints.gcs_reason(e)}") from e


def check_path(flag, path):
  """`path` unchanged, after a check: ConfigError naming `flag` for a gs:// path without
  a valid bucket."""
  try:
    paths.resolve(path)
    return str(path)
  except paths.PathError as e:
    raise config_lib.ConfigError(f"{flag}: {e}") from None
