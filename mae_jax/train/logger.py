"""Run logging (process 0): progress lines with ETA, TensorBoard events and metrics.jsonl
(one JSON object per logged step, one write each: a killed run leaves no half record) in
the workdir, and W&B where config.logging.wandb names a project. A resumed run logs its
steps after the checkpoint again, with the same values. A gs:// workdir has no appendable
files: the logs are staged locally and copied whole at each checkpoint (`sync`), at most
`sync_secs` after a record and at close."""
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time

import jax

from mae_jax import paths


def _fmt_duration(seconds):
  h, rem = divmod(int(max(0, seconds)), 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


def summary_writer_class():
  """tensorboardX's SummaryWriter, imported lazily (only process 0 writes) and without torch,
  which it imports where installed only to accept torch tensors (seconds at every start)."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError for a moment
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


WANDB_ID_FILE = "wandb_run_id"  # in the workdir: every launch of a run logs to one W&B run


def wandb_project(config):
  """config.logging.wandb (None where the config has no such field: W&B off)."""
  return (config.get("logging") or {}).get("wandb")


class WandbStartError(RuntimeError):
  """wandb.init failed (no login, no network, a bad project name): the message says why."""


class WandbRun:
  """The W&B run of a workdir (id in WORKDIR/wandb_run_id: a resumed launch continues it).
  Every record's x-axis is the training step (`step`): W&B's own counter would drop late
  pictures and the steps a resume logs again. A failing call is one line on `say`, then
  W&B is off; one that cannot start raises WandbStartError before the first step."""

  def __init__(self, project, workdir, kind, config, say):
    import wandb  # pylint: disable=import-outside-toplevel (optional: mae_jax[wandb])
    self.wandb, self.say, self.lock = wandb, say, threading.Lock()
    id_file = paths.join(workdir, WANDB_ID_FILE)
    run_id = paths.read_text(id_file).strip() if paths.exists(id_file) else None
    if not run_id:
      run_id = secrets.token_hex(6)
      paths.write_atomic(id_file, run_id)
    name = "/".join(str(workdir).rstrip("/").split("/")[-2:])  # e.g. workdirs/demo
    try:
      self.run = wandb.init(project=project, id=run_id, resume="allow", name=name,
                            job_type=kind, config=dict(config, workdir=str(workdir)))
    except Exception as e:  # pylint: disable=broad-except (wandb's errors have no common base)
      raise WandbStartError(f"W&B did not start ({type(e).__name__}: {e})") from None
    self.run.define_metric("step")
    self.run.define_metric("*", step_metric="step")

  def log(self, step, record):
    """`record` ({tag: value}, or a function making it) at training step `step`."""
    with self.lock:
      try:
        if self.run is not None:
          self.run.log({"step": int(step), **(record() if callable(record) else record)})
      except Exception as e:  # pylint: disable=broad-except (logging never loses the run)
        self.say(f"W&B logging failed at step {step} ({type(e).__name__}: {e}); W&B is "
                 "off for the rest of this launch, TensorBoard goes on")
        self.run = None

  def image(self, step, tag, image_HWC):
    self.log(step, lambda: {tag: self.wandb.Image(image_HWC, caption=f"step {step}")})

  def close(self):
    with self.lock:
      if self.run is not None:
        self.run.finish()
        self.run = None


class Logger:
  """Scalars to TensorBoard (and W&B after `start_wandb`); progress of a run of `total_steps`."""

  def __init__(self, workdir, total_steps, start_step=0, stream=None, sync_secs=30):
    self.workdir, self.total_steps = workdir, total_steps
    self.stream = stream or sys.stdout
    self.is_main, self.tty = jax.process_index() == 0, self.stream.isatty()
    self.writer = self.wandb = None
    self.remote = paths.join(workdir) if paths.is_gcs(workdir) else None
    self.sync_secs, self._synced = sync_secs, time.monotonic()
    if self.is_main:
      logdir = self._stage() if self.remote else workdir
      self.writer = summary_writer_class()(logdir=logdir, flush_secs=30)
      self.jsonl = os.open(os.path.join(logdir, "metrics.jsonl"),
                           os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    self._t0, self._s0 = time.perf_counter(), start_step

  def start_wandb(self, project, kind, config):
    """Log to the W&B run of this workdir in `project` from here on (process 0); `kind`
    (the job) and `config` (a dict) describe it there. Raises WandbStartError."""
    if self.is_main:
      self.wandb = WandbRun(project, self.workdir, kind, config, self.info)

  def _stage(self):
    """A local directory holding a copy of the gs:// workdir's metrics.jsonl, if any."""
    self.staging = tempfile.mkdtemp(prefix="mae_jax_logs_")
    remote_jsonl = paths.join(self.remote, "metrics.jsonl")
    if paths.exists(remote_jsonl):
      with open(os.path.join(self.staging, "metrics.jsonl"), "wb") as f:
        f.write(paths.resolve(remote_jsonl).read_bytes())
    return self.staging

  def sync(self):
    """Copy the staged event files and metrics.jsonl to the gs:// workdir."""
    if self.remote and self.writer:
      self.writer.flush()
      self._upload()

  def _upload(self):
    for name in sorted(os.listdir(self.staging)):
      with open(os.path.join(self.staging, name), "rb") as f:
        paths.write_atomic(paths.join(self.remote, name), f.read())
    self._synced = time.monotonic()

  def scalars(self, step, values, prefix="train"):
    if self.writer:
      record = {f"{prefix}/{name}": float(value) for name, value in values.items()}
      for name, value in record.items():
        self.writer.add_scalar(name, value, step)
      os.write(self.jsonl, (json.dumps({"step": int(step), **record}) + "\n").encode())
      if self.wandb:
        self.wandb.log(step, record)
      if self.remote and time.monotonic() - self._synced > self.sync_secs:
        self.sync()

  def image(self, step, tag, image_HWC):
    """A uint8 (H, W, C) image in TensorBoard (and W&B) at `step` (process 0)."""
    if self.writer:
      self.writer.add_image(tag, image_HWC, step, dataformats="HWC")
    if self.wandb:
      self.wandb.image(step, tag, image_HWC)

  def progress(self, step, metrics, images_per_step):
    """One line (or a redrawn bar on a tty) with step, loss, lr, img/s and ETA."""
    if not self.is_main:
      return
    elapsed = time.perf_counter() - self._t0
    rate = max(1, step - self._s0) / elapsed if elapsed > 0 else 0.0
    eta = (self.total_steps - step) / rate if rate else 0.0
    text = (f"step {step}/{self.total_steps}  loss {metrics['loss']:.4f}  "
            f"lr {metrics['lr']:.2e}  grad_norm {metrics['grad_norm']:.3f}  "
            f"{rate * images_per_step:.0f} img/s  ETA {_fmt_duration(eta)}")
    if metrics.get("input_wait") is not None:
      text += f"  input wait {metrics['input_wait']:.0%}"
    if self.tty:
      filled = int(24 * step / max(1, self.total_steps))  # a bar 24 characters wide
      end = "\n" if step >= self.total_steps else ""
      self.stream.write(f"\r[{'#' * filled}{'.' * (24 - filled)}] {text}{end}")
    else:
      self.stream.write(text + "\n")
    self.stream.flush()

  def info(self, message):
    if self.is_main:
      self.stream.write(("\n" if self.tty else "") + message + "\n")
      self.stream.flush()

  def close(self):
    if self.wandb:
      self.wandb.close()
    if self.writer:
      self.writer.close()
      os.close(self.jsonl)
      if self.remote:
        self._upload()
        shutil.rmtree(self.staging, ignore_errors=True)


class InputWait:
  """The share of wall time the loop spends waiting for the next batch, per log interval
  and over the run (the first, compiling step left out); says once when it is high."""

  WARMUP_STEPS = 10  # after the compiling step: still warming up (caches, threads), not input

  def __init__(self, warn_above: float, suggestions: str | None = None):
    self.warn_above, self.warned = warn_above, False
    self.suggestions = suggestions or "more data.num_workers or data.worker_processes"
    self.total_wait = self.interval_wait = 0.0
    self.first_step = self.t_start = self.t_interval = None

  def start(self) -> None:
    self.t_start = self.t_interval = time.perf_counter()

  def add(self, seconds: float) -> None:
    if self.t_start is not None:
      self.total_wait += seconds
      self.interval_wait += seconds

  def interval_share(self) -> float | None:
    """Share since the last call (None before the first step ended)."""
    if self.t_start is None:
      return None
    now = time.perf_counter()
    share = self.interval_wait / max(now - self.t_interval, 1e-9)
    self.interval_wait, self.t_interval = 0.0, now
    return share

  def total_share(self) -> float | None:
    return (None if self.t_start is None
            else self.total_wait / max(time.perf_counter() - self.t_start, 1e-9))

  def advice(self, share: float, step: int) -> str | None:
    """The one-time note when `share` passes the threshold after the warm-up (else
    None), with the suggestions that fit the run."""
    self.first_step = step if self.first_step is None else self.first_step
    if self.warned or share <= self.warn_above or step < self.first_step + self.WARMUP_STEPS:
      return None
    self.warned = True
    return (f"input-bound: {share:.0%} of wall time at step {step} went to waiting for the "
            f"next batch (data.input_wait_warn={self.warn_above}); try {self.suggestions}")
