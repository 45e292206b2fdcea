"""Orbax checkpoints of the train state: async, keep-N, atomic, verified, resumable; on a
local disk or gs:// (paths go through mae_jax.paths).

On a local disk Orbax writes step N into `N.orbax-checkpoint-tmp` and renames it to `N`
once every file is written; on Cloud Storage, which has no rename, it writes `N/` in place
and adds `N/commit_success.txt` last. Either way `complete_steps` only sees finished steps,
and an unfinished one a killed run left behind is noted (`notes`) and removed.

Once a step is complete, a background thread of process 0 writes a manifest of its files
(MANIFEST: size and checksum of each): locally the CRC-32 of each file, read back while
it is still in the page cache; on Cloud Storage the CRC-32C the server computed on upload,
from one listing, so nothing is downloaded. Training never waits for it. Restore checks
the manifest first: every file present at its size, and its checksum (locally re-read;
on Cloud Storage compared from a listing); a truncated, missing or corrupted file is named
instead of being read as garbage. `python -m mae_jax.checkpoint verify DIR` re-reads every
byte of every step (Cloud Storage objects downloaded and their CRC-32C recomputed).
Write failures (a full or unwritable disk, an unreachable bucket) surface as one
CheckpointError naming the directory; the previous complete checkpoint is never touched.
The data position needs no saving: batches are a pure function of (seed, step).
"""
import argparse
import base64
import concurrent.futures
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import zlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mae_jax import paths

# Seconds a gs:// checkpoint operation may go without finishing (a save waits for the one
# before it): a server that stops answering mid-save fails the run after this long instead
# of after TensorStore's retries (up to 32, backing off to 32 s each).
GCS_SAVE_TIMEOUT_S = float(os.environ.get("MAE_JAX_CHECKPOINT_TIMEOUT_S", "1800"))
MANIFEST = "mae_manifest.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a local step still being written
COMMIT_FILE = "commit_success.txt"  # Orbax's last file of a step on Cloud Storage
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
  """A checkpoint or workdir that cannot be written, read or trusted (one line naming it)."""


class Checkpointer:
  """A CheckpointManager over `directory` (local or gs://) holding TrainState pytrees."""

  def __init__(self, directory, *, keep, every_steps, async_save=True):
    self.directory = paths.absolute(directory)
    check_writable(self.directory)
    self.interrupted = interrupted_steps(self.directory)  # before Orbax removes them
    self.notes = []  # what restore_latest skipped, for the run's log
    ignore_late_callbacks()
    quiet_orbax_tracebacks()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._manifests = concurrent.futures.ThreadPoolExecutor(1, "mae_manifest")
    self._pending = None  # the Future of the manifest task last submitted
    self._waiter = concurrent.futures.ThreadPoolExecutor(1, "mae_ckpt_deadline")
    self._stuck = None  # the CheckpointError of an operation that ran past its deadline
    self._started = self._complete = self.manager.latest_step()  # steps known to Orbax

  def step_dir(self, step):
    return paths.join(self.directory, str(step))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, force=False):
    """Start saving `state` at `step` (if due, or `force`); returns whether it saves.

    Raises CheckpointError if this save, or an earlier asynchronous one, cannot be written.
    """
    try:
      saved = self._bounded(self.manager.save, step, args=ocp.args.StandardSave(state),
                            force=force)
    except CheckpointError:
      raise
    except Exception as e:  # Orbax and TensorStore raise ValueError, OSError, ...
      raise self._write_error(e) from e
    self._complete = self._started  # the save above waited for the previous one to finish
    self._started = step if saved else self._started
    self.write_manifests()
    return saved

  def restore(self, step, target, unfit_hint=None):
    """Restore `step` onto the shapes, dtypes and shardings of `target` (a state pytree
    of arrays or jax.ShapeDtypeStructs), after checking its files against the manifest.

    unfit_hint: what to advise when Orbax cannot restore the step although its files
    passed their checks: it may be of another config rather than damaged (a workdir
    without config.json), so deleting it would be the wrong advice.
    """
    step_dir = self.step_dir(step)
    verify(step_dir, step, self._fallback(step))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      raise CheckpointError(f"checkpoint step {step} cannot be restored: {short_reason(e)}; "
                            f"{unfit_hint or self._fallback(step)}") from e
    # Only finite states are ever saved: NaN here means damage the manifest did not catch
    check_finite_tree(state, f"checkpoint step {step} is damaged ({step_dir})",
                      hint=self._fallback(step))
    return state

  def restore_latest(self, target, unfit_hint=None):
    """(state, step) from the latest complete checkpoint, or (target, None) if none.

    Steps whose writing was interrupted are never candidates; each one newer than the
    step restored is noted in `notes`.
    """
    step = self.latest_step()
    resumed = "starting from scratch" if step is None else f"resuming from step {step}"
    for s, path in self.interrupted:
      if step is None or s > step:
        self.notes.append(f"checkpoint step {s} was interrupted mid-write "
                          f"({os.path.basename(path)}): ignored, {resumed}")
    if step is None:
      return target, None
    return self.restore(step, target, unfit_hint), step

  def check_space(self, target):
    """Raise CheckpointError if the disk cannot hold one checkpoint of `target` (Cloud
    Storage has no fixed capacity: nothing to check there)."""
    if not paths.is_gcs(self.directory):
      check_space(self.directory, sum(x.nbytes for x in jax.tree.leaves(target)))

  def write_manifests(self):
    """Queue the manifests of the complete steps that have none (process 0 only); a
    background thread writes them, one task at a time."""
    if jax.process_index() != 0:
      return
    if self._pending is not None and not self._pending.done():
      return  # the running task lists the steps again when it is done
    self._raise_manifest_error()
    self._pending = self._manifests.submit(write_missing_manifests, self.directory)

  def wait(self):
    """Block until pending saves are on disk; CheckpointError if one could not be written."""
    try:
      self._bounded(self.manager.wait_until_finished)
    except CheckpointError:
      raise
    except Exception as e:
      raise self._write_error(e) from e
    self._complete = self._started
    if self._pending is not None:  # it may have listed the steps before the last one
      concurrent.futures.wait([self._pending], timeout=self._timeout())
    self.write_manifests()  # nothing runs now: a new task lists every complete step
    if self._pending is not None:
      concurrent.futures.wait([self._pending], timeout=self._timeout())
      self._raise_manifest_error()

  def _timeout(self):
    return GCS_SAVE_TIMEOUT_S if paths.is_gcs(self.directory) else None

  def close(self):
    self.wait()
    self.manager.close()
    self._manifests.shutdown()

  def _bounded(self, fn, *args, **kwargs):
    """fn(*args, **kwargs); on gs://, given at most GCS_SAVE_TIMEOUT_S, after which the
    run stops with a CheckpointError (the call is left behind in its thread: the process
    exits without waiting for it)."""
    if self._stuck is not None:
      raise self._stuck
    if not paths.is_gcs(self.directory):
      return fn(*args, **kwargs)
    future = self._waiter.submit(fn, *args, **kwargs)
    try:
      return future.result(timeout=GCS_SAVE_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
      kept = (f"the last complete checkpoint, step {self._complete}, is intact"
              if self._complete is not None else "no checkpoint was completed")
      self._stuck = CheckpointError(
          f"cannot write a checkpoint in {self.directory}: not finished after "
          f"{GCS_SAVE_TIMEOUT_S:.0f} s (MAE_JAX_CHECKPOINT_TIMEOUT_S): the storage stopped "
          f"answering; {kept}")
      raise self._stuck from None

  def _raise_manifest_error(self):
    error = self._pending.exception() if self._pending and self._pending.done() else None
    self._pending = None if error else self._pending
    if error is not None:
      raise CheckpointError(f"cannot write a checkpoint manifest in {self.directory}: "
                            f"{short_reason(error)}") from error

  def _write_error(self, error):
    steps = complete_steps(self.directory)
    kept = (f"the last complete checkpoint, step {steps[-1]}, is intact" if steps
            else "no checkpoint was completed")
    return CheckpointError(f"cannot write a checkpoint in {self.directory}: "
                           f"{short_reason(error)}; {kept}")

  def _fallback(self, step):
    earlier = [s for s in complete_steps(self.directory) if s < step]
    after = f"resume from step {earlier[-1]}" if earlier else "start afresh"
    return f"delete {self.step_dir(step)} to {after}"


class _DropClosedLoopErrors:
  """sys.unraisablehook that drops "Event loop is closed" and passes on everything else."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      self.previous(unraisable)


def ignore_late_callbacks():
  """When a save fails, TensorStore still completes that save's other writes and calls back
  into the event loop Orbax has closed; each call would print a traceback around the
  one-line error. Such callbacks can no longer matter: drop them (process-wide, once)."""
  if not isinstance(sys.unraisablehook, _DropClosedLoopErrors):
    sys.unraisablehook = _DropClosedLoopErrors(sys.unraisablehook)


def entries(directory):
  """Names in `directory`; none where it does not exist (on Cloud Storage a "directory"
  exists only while an object is below it)."""
  try:
    return paths.listdir(directory)
  except (FileNotFoundError, NotADirectoryError):
    return []


class _OneLineOrbaxErrors(logging.Filter):
  """Orbax logs the exception of a failed background save with its traceback before the
  run's own one-line error; keep such a record to one line (its message, shortened)."""

  def filter(self, record):
    if record.exc_info and "orbax" in record.pathname:
      text = " ".join(record.getMessage().split())
      record.msg, record.args = text[:300] + ("..." if len(text) > 300 else ""), ()
      record.exc_info = record.exc_text = None
    return True


def quiet_orbax_tracebacks():
  """Install _OneLineOrbaxErrors on absl's logger (process-wide, once)."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _OneLineOrbaxErrors) for f in logger.filters):
    logger.addFilter(_OneLineOrbaxErrors())


def complete_steps(directory):
  """Sorted steps whose directory Orbax finished (renamed from its temporary name locally;
  holding its commit file on Cloud Storage)."""
  names = [name for name in entries(directory) if name.isdigit()]
  if paths.is_gcs(directory):
    return sorted(int(n) for n in names if paths.exists(paths.join(directory, n, COMMIT_FILE)))
  return sorted(int(n) for n in names if os.path.isdir(os.path.join(directory, n)))


def interrupted_steps(directory):
  """Sorted (step, path) of the directories of saves that never finished."""
  found = []
  complete = set(complete_steps(directory)) if paths.is_gcs(directory) else set()
  for name in entries(directory):
    match = re.fullmatch(r"(\d+)" + re.escape(TMP_SUFFIX) + r".*", name)
    if match:
      found.append((int(match.group(1)), paths.join(directory, name)))
    elif paths.is_gcs(directory) and name.isdigit() and int(name) not in complete:
      found.append((int(name), paths.join(directory, name)))
  return sorted(found)


def check_workdir(workdir, flag="--workdir"):
  """Raise CheckpointError for an empty workdir (it would mean the current directory)."""
  if not isinstance(workdir, (str, os.PathLike)) or not str(workdir).strip():
    raise CheckpointError(f"{flag}: empty; expected a directory for the run's checkpoints "
                          "and logs")


def check_writable(directory):
  """Raise CheckpointError unless `directory` exists (or can be made) and takes a file."""
  if paths.is_gcs(directory):
    return check_gcs_writable(directory)
  probe = os.path.join(directory, f".write-probe-{jax.process_index()}-{os.getpid()}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    where = f": {e.filename}" if e.filename and e.filename != probe else ""
    raise CheckpointError(f"{directory}: cannot write checkpoints there ({e.strerror}{where}); "
                          "choose another --workdir, or fix its permissions or free space"
                          ) from None
  finally:
    if os.path.exists(probe):
      os.remove(probe)


def check_gcs_writable(directory):
  """Write and delete a probe object under `directory`: a missing bucket, missing
  credentials or an unreachable server is one CheckpointError before any work starts."""
  try:
    paths.write_probe(directory, f"{jax.process_index()}-")
  except FileNotFoundError:
    raise CheckpointError(f"{directory}: bucket {paths.bucket(directory)} does not exist "
                          "(or these credentials cannot see it); create it or choose another "
                          "--workdir") from None
  except Exception as e:  # gcsfs raises OSError, aiohttp and google-auth errors
    raise CheckpointError(f"{directory}: cannot write checkpoints there "
                          f"({gcs_reason(e)}); check the bucket, its permissions and the "
                          "network") from None


def gcs_reason(error, limit=200):
  """A gcsfs / aiohttp / google-auth error in a phrase."""
  text = " ".join(str(error).split()) or type(error).__name__
  text = f"{type(error).__name__}: {text}" if type(error).__name__ not in text else text
  return text[:limit] + ("..." if len(text) > limit else "")


def check_space(directory, need_bytes):
  """Raise CheckpointError if `directory`'s file system has less than `need_bytes` free."""
  free = shutil.disk_usage(directory).free
  if free < need_bytes:
    raise CheckpointError(
        f"{directory}: {free / 2**20:.1f} MiB free, but one checkpoint of this run needs "
        f"{need_bytes / 2**20:.1f} MiB; free some space or choose another --workdir")


def file_crc32(path):
  crc = 0
  with paths.resolve(path).open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def file_crc32c(path):
  """Base64 CRC-32C of a file's bytes, as Cloud Storage reports it."""
  import google_crc32c
  crc = google_crc32c.Checksum()
  with paths.resolve(path).open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc.update(chunk)
  return base64.b64encode(crc.digest()).decode()


def step_listing(step_dir):
  """{path relative to `step_dir`: (size, CRC-32C from the server or None locally)} of all
  its files but the manifest: one listing, nothing read."""
  if paths.is_gcs(step_dir):
    sizes = paths.walk_files(step_dir)
    crcs = paths.gcs_checksums(step_dir)
    files = {rel: (size, crcs.get(rel)) for rel, size in sizes.items()}
  else:
    files = {rel: (size, None) for rel, size in paths.walk_files(step_dir).items()}
  return {rel: v for rel, v in files.items() if not os.path.basename(rel).startswith(MANIFEST)}


def step_files(step_dir):
  """Paths relative to `step_dir` of all its files but the manifest."""
  return sorted(step_listing(step_dir))


def write_manifest(step_dir):
  """Record {file: [size, checksum]} of a complete step directory, atomically: locally the
  CRC-32 of each file (read back), on Cloud Storage the server's CRC-32C (listed)."""
  try:
    listing = step_listing(step_dir)
    if paths.is_gcs(step_dir):
      files, kind = {rel: [size, crc] for rel, (size, crc) in listing.items()}, "crc32c"
    else:
      files = {rel: [size, file_crc32(paths.join(step_dir, rel))]
               for rel, (size, _) in listing.items()}
      kind = "crc32"
    paths.write_atomic(paths.join(step_dir, MANIFEST), json.dumps({"checksum": kind,
                                                                   "files": files}))
  except FileNotFoundError:
    pass  # Orbax deleted the step meanwhile (keep-N)


def write_missing_manifests(directory):
  """Write the manifest of each complete step of `directory` that has none."""
  for step in complete_steps(directory):
    step_dir = paths.join(directory, str(step))
    if not paths.exists(paths.join(step_dir, MANIFEST)):
      write_manifest(step_dir)


def read_manifest(step_dir, step, hint):
  """(checksum kind, {file: [size, checksum]}) of a step, or None where it has none."""
  path = paths.join(step_dir, MANIFEST)
  if not paths.exists(path):
    return None  # written before manifests, or killed between finishing and manifesting
  try:
    manifest = json.loads(paths.read_text(path))
    return manifest.get("checksum", "crc32"), dict(manifest["files"])
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"checkpoint step {step} is damaged: {path}: unreadable manifest "
                          f"({e}); {hint}") from None


def verify(step_dir, step, hint, full=False):
  """Raise CheckpointError naming the first file of `step_dir` that is missing, truncated
  or changed since its manifest was written; returns whether there was a manifest.

  Sizes come from one listing. Checksums: a local file is re-read (a restore reads it
  anyway); a Cloud Storage object's CRC-32C is the server's, listed, unless `full`, which
  downloads the object and recomputes it.
  """
  manifest = read_manifest(step_dir, step, hint)
  if manifest is None:
    return False
  kind, files = manifest
  listing = step_listing(step_dir)
  for rel, (size, crc) in sorted(files.items()):
    file = paths.join(step_dir, rel)
    if rel not in listing:
      problem = "is missing"
    elif (actual := listing[rel][0]) != size:
      problem = f"is truncated ({actual} of {size} bytes)" if actual < size else (
          f"has {actual} bytes, not the {size} written")
    elif not checksum_matches(kind, file, crc, listing[rel][1], full):
      problem = f"is corrupted (its {'CRC-32C' if kind == 'crc32c' else 'CRC-32'} differs " \
                "from the one written)"
    else:
      continue
    raise CheckpointError(f"checkpoint step {step} is damaged: {file} {problem}; {hint}")
  return True


def checksum_matches(kind, file, recorded, listed, full):
  if kind == "crc32c":
    return listed == recorded and (not full or file_crc32c(file) == recorded)
  return file_crc32(file) == recorded


def short_reason(error, limit=300):
  """A long Orbax/TensorStore error in a phrase: the file it names, if any, and the cause.

  The cause is the OS error named by TensorStore's `[os_error_code=N]`, as os.strerror
  words it: the text before the code varies with where the write failed.
  """
  text = " ".join(str(error).split()) or type(error).__name__
  files = re.findall(r'(?:local file|Failed writing:|Metadata file:?)\s*"?(/[^"\s,]+)', text)
  code = re.search(r"\[os_error_code='?(\d+)", text)
  if files and code:
    return f"{files[-1]}: {os.strerror(int(code.group(1)))}"
  return text[:limit] + ("..." if len(text) > limit else "")


CONFIG_HISTORY = "configs"  # WORKDIR/configs/launch-NNN-step-S.json, one per launch


def launch_configs(workdir):
  """Paths of WORKDIR/configs/launch-*.json in launch order."""
  directory = paths.join(workdir, CONFIG_HISTORY)
  if not paths.isdir(directory):
    return []
  found = [(int(m.group(1)), name) for name in paths.listdir(directory)
           if (m := re.fullmatch(r"launch-(\d+)-step-\d+\.json", name))]
  return [paths.join(directory, name) for _, name in sorted(found)]


def save_config(config, workdir, start_step=0, job="pretrain"):
  """Record this launch's config (process 0 only): WORKDIR/config.json is the first
  launch's and is never overwritten; each launch adds configs/launch-NNN-step-S.json
  (S: the step it started from). `job` (the kind of job, mae_jax.loop.KINDS) is recorded
  with it as "job"."""
  if jax.process_index() != 0:
    return
  text = json.dumps({**json.loads(config.to_json_best_effort()), "job": job}, indent=2,
                    sort_keys=True)
  paths.makedirs(paths.join(workdir, CONFIG_HISTORY))
  path = paths.join(workdir, "config.json")
  if not paths.exists(path):
    paths.write_atomic(path, text)
  number = len(launch_configs(workdir)) + 1
  paths.write_atomic(paths.join(workdir, CONFIG_HISTORY,
                                f"launch-{number:03d}-step-{start_step}.json"), text)


def load_config_dict(workdir):
  """The config of a workdir's latest launch as a plain dict (config.json where it keeps
  no history), or None where it has none."""
  history = launch_configs(workdir)
  path = history[-1] if history else paths.join(workdir, "config.json")
  try:
    saved = json.loads(paths.read_text(path))
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read the saved config ({e})") from None
  if not isinstance(saved, dict):
    raise CheckpointError(f"{path}: expected a JSON object (train.py's config), found "
                          f"{type(saved).__name__}")
  return saved


# ---------------------------------------------------------------------------
# One run per workdir.

LOCK_FILE = "run.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _holder_of(text):
  """'pid P on host H, started T' of a lock file's contents (or what is there)."""
  try:
    h = json.loads(text)
    return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
  except (ValueError, KeyError, TypeError):
    return f"an unreadable holder ({text[:80]!r})"


class WorkdirLock:
  """WORKDIR/run.lock, held by one run (process 0 of it) from start-up to exit.

  The file names its holder (host, pid, start time). It is held with a POSIX record lock
  (fcntl.lockf), which the kernel (or the NFS server) drops when the holder dies however
  it dies: a lock file left by a killed run is stale by construction and is taken over,
  with a note naming the run it was left by. A file system without POSIX locks falls back
  to the file's contents: a holder that is alive on this host, or that runs on another
  host (which cannot be checked from here), keeps the workdir.
  """

  def __init__(self, workdir):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.fd = None
    self.note = None  # what was taken over, for the run's log

  def acquire(self):
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    while self.fd is None:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        held = e.errno in (errno.EAGAIN, errno.EACCES)
        previous = _read_fd(fd)
        os.close(fd)
        if held:
          raise self._in_use(previous) from None
        if e.errno not in _NO_LOCKS:
          raise
        self._check_by_contents(previous)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      if not _same_file(fd, self.path):  # the previous holder removed it meanwhile
        os.close(fd)
        continue
      previous = _read_fd(fd)
      if previous.strip():
        self.note = (f"took over {self.path}, left by a run that is no longer running "
                     f"({_holder_of(previous)})")
      os.ftruncate(fd, 0)
      os.pwrite(fd, me.encode(), 0)
      os.fsync(fd)
      self.fd = fd
    return self

  def _in_use(self, contents):
    return CheckpointError(
        f"{os.path.dirname(self.path)} is in use by another run ({_holder_of(contents)}; "
        f"lock {self.path}): wait for it to finish, stop it, or choose another --workdir")

  def _check_by_contents(self, contents):
    """Without POSIX locks: refuse a holder that lives, or that cannot be checked."""
    try:
      holder = json.loads(contents)
      host, pid = holder["host"], int(holder["pid"])
    except (ValueError, KeyError, TypeError):
      return  # empty or unreadable: no holder
    if host != socket.gethostname() or _alive(pid):
      raise self._in_use(contents)

  def release(self):
    if self.fd is None:
      return
    with contextlib.suppress(OSError):
      if _same_file(self.fd, self.path):
        os.remove(self.path)
    os.close(self.fd)  # drops the record lock
    self.fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _read_fd(fd):
  try:
    return os.pread(fd, 4096, 0).decode(errors="replace")
  except OSError:
    return ""


def _same_file(fd, path):
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class GcsWorkdirLock(WorkdirLock):
  """WORKDIR/run.lock on Cloud Storage, which has no record locks: the object names its
  holder, and a launch finding one refuses unless the holder ran on this host and is gone
  (a run restarted on the same VM after a crash). A holder on another host cannot be
  checked from here: the refusal names it, and the lock object is removed by hand once
  that run is known to be over (a preempted VM)."""

  def __init__(self, workdir):  # pylint: disable=super-init-not-called
    self.path = paths.join(workdir, LOCK_FILE)
    self.fd = None
    self.note = None

  def acquire(self):
    """Create the lock object only where none exists, or replace a lock left by a dead run
    of this host only while it is the generation read: each is one request with a
    precondition (ifGenerationMatch=0, or the stale lock's generation), so of launches
    racing for a free workdir or for the same stale lock, one wins and the others find
    the winner's lock."""
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    while not paths.create_new(self.path, me):
      try:
        previous, generation = paths.read_generation(self.path)
      except FileNotFoundError:
        continue  # its holder released it meanwhile
      previous = previous.decode(errors="replace")
      self._check_by_contents(previous)  # raises unless the holder is gone
      if paths.replace_generation(self.path, me, generation):
        self.note = (f"took over {self.path}, left by a run that is no longer running "
                     f"({_holder_of(previous)})")
        break
      # replaced or removed meanwhile (another launch took it over): look again
    self.fd = me
    return self

  def _in_use(self, contents):
    return CheckpointError(
        f"{self.path.rsplit('/', 1)[0]} is in use by another run ({_holder_of(contents)}; lock "
        f"{self.path}): wait for it to finish or stop it; if it ran on a machine that is "
        "gone, remove that lock object")

  def release(self):
    if self.fd is None:
      return
    with contextlib.suppress(OSError, FileNotFoundError):
      if paths.read_text(self.path) == self.fd:
        paths.remove(self.path)
    self.fd = None


def lock_workdir(workdir):
  """Take WORKDIR's lock on process 0 (None elsewhere); every process learns whether it
  was free, so all of a multi-process run stop together when it was not."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = (GcsWorkdirLock if paths.is_gcs(workdir) else WorkdirLock)(workdir).acquire()
    except CheckpointError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    taken = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if taken and error is None:
      error = CheckpointError(f"{paths.absolute(workdir)} is in use by another run "
                              "(process 0 names it)")
  if error is not None:
    raise error
  return lock


# ---------------------------------------------------------------------------
# Parameter directories: mae_jax's format for weights without a training state (imported
# official / Hugging Face weights, exports of a run): DIR/params/ (Orbax
# StandardCheckpointer, the params pytree) + DIR/model.json ({"model": MaskedAutoencoder
# fields, ...}).

PARAMS_DIR = "params"
META_FILE = "model.json"


class ParamsError(ValueError):
  """A parameter directory that is missing, already taken, or does not fit its target."""


def is_params_dir(path):
  return paths.isfile(paths.join(path, META_FILE))


def save_params(directory, params, meta):
  """Write DIR/params and DIR/model.json (meta); never overwrites an existing DIR."""
  directory = paths.absolute(directory)
  if paths.exists(directory):
    raise ParamsError(f"{directory} already exists; choose a new output directory")
  paths.makedirs(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(paths.join(directory, PARAMS_DIR), params)
  paths.write_atomic(paths.join(directory, META_FILE), json.dumps(meta, indent=2))
  return directory


def read_meta(directory):
  """The model.json of a parameter directory, as a dict."""
  if not is_params_dir(directory):
    raise ParamsError(f"{directory}: no {META_FILE}; expected a parameter directory "
                      "(`python -m mae_jax.convert import` writes one)")
  path = paths.join(directory, META_FILE)
  try:
    meta = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise ParamsError(f"{path}: unreadable ({' '.join(str(e).split())})") from None
  if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
    raise ParamsError(f"{path}: expected a JSON object with the model's fields under "
                      "'model'")
  return meta


def shape_mismatches(tree, reference, complete=True):
  """'path (shape) vs (reference shape)' for each leaf of `tree` that differs from
  `reference`, plus the reference's leaves `tree` lacks when `complete`."""
  got = {p: tuple(np.shape(v)) for p, v in flax.traverse_util.flatten_dict(tree).items()}
  want = {p: tuple(np.shape(v))
          for p, v in flax.traverse_util.flatten_dict(reference).items()}
  bad = [f"{'/'.join(p)} {s} vs {want.get(p, 'absent')}" for p, s in got.items()
         if want.get(p) != s]
  return bad + ([f"{'/'.join(p)} absent vs {s}" for p, s in want.items() if p not in got]
                if complete else [])


def load_params(path, target=None):
  """(params, model fields) of a parameter directory; MaskedAutoencoder(**fields) is the
  model they belong to.

  target: optional pytree of arrays / jax.ShapeDtypeStruct (with shardings) to restore
  onto, e.g. jax.eval_shape of the model's init with the trainer's shardings; stored
  shapes that differ from it are listed in the error.
  """
  meta = read_meta(path)
  params_path = paths.absolute(paths.join(path, PARAMS_DIR))
  with ocp.StandardCheckpointer() as checkpointer:
    if target is not None:
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      stored = _params_metadata(checkpointer, params_path)
      bad = shape_mismatches(stored, target)
      if bad:
        shown = "; ".join(bad[:20]) + (f"; ... ({len(bad)} in all)" if len(bad) > 20 else "")
        raise ParamsError(f"{path} holds params of {meta['model']}, which do not fit the "
                          f"target (stored vs target): {shown}")
    try:
      params = checkpointer.restore(params_path, target)
    except Exception as e:  # Orbax / TensorStore on missing or damaged files
      raise ParamsError(f"{params_path}: damaged or incomplete parameters, cannot be "
                        f"restored ({short_reason(e, 200)})") from None
  check_finite_tree(params, f"{params_path}: damaged parameters", ParamsError)
  return params, meta["model"]


def _params_metadata(checkpointer, params_path):
  try:
    return checkpointer.metadata(params_path).item_metadata.tree
  except Exception as e:  # a missing or damaged params/ directory
    raise ParamsError(f"{params_path}: missing or damaged parameters ("
                      f"{short_reason(e, 200)})") from None


def nonfinite_leaves(tree):
  """'/'-joined paths of the floating-point leaves of `tree` holding NaN or infinity."""
  leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  finite = jax.device_get(_all_finite([leaf for _, leaf in leaves]))  # one program
  return [jax.tree_util.keystr(path, simple=True, separator="/")
          for (path, _), ok in zip(leaves, finite) if not ok]


@jax.jit
def _all_finite(leaves):
  return [jnp.isfinite(x).all() for x in leaves]


def check_finite_tree(tree, what, error=None, hint=None):
  """Raise `error` (CheckpointError by default) naming the non-finite leaves of `tree`:
  a bit flip in a stored float restores without complaint from Orbax."""
  bad = nonfinite_leaves(tree)
  if bad:
    shown = ", ".join(bad[:5]) + (f" ... ({len(bad)} in all)" if len(bad) > 5 else "")
    raise (error or CheckpointError)(f"{what}: NaN or infinite values in {shown}"
                                     + (f"; {hint}" if hint else ""))


def verify_all(directory):
  """Fully verify every complete step of a checkpoints directory: (step, problem or None)."""
  results = []
  for step in complete_steps(directory):
    step_dir = paths.join(directory, str(step))
    try:
      had = verify(step_dir, step, "restore another step", full=True)
      results.append((step, None if had else "no manifest: not verifiable"))
    except CheckpointError as e:
      results.append((step, str(e)))
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.checkpoint",
      description="verify DIR: re-read every file of every checkpoint step in DIR (a "
                  "train.py workdir or its checkpoints/, local or gs://) against its manifest")
  parser.add_argument("command", choices=["verify"])
  parser.add_argument("directory")
  args = parser.parse_args(argv)
  try:
    directory = args.directory
    if paths.isdir(paths.join(directory, "checkpoints")):
      directory = paths.join(directory, "checkpoints")
    if not complete_steps(directory):
      print(f"error: {paths.absolute(directory)}: no complete checkpoint step", file=sys.stderr)
      return 2
    results = verify_all(directory)
  except (paths.PathError, OSError) as e:
    print(f"error: {args.directory}: {gcs_reason(e)}", file=sys.stderr)
    return 2
  for step, problem in results:
    print(f"step {step}: {problem or 'ok'}")
  return 1 if any(p and not p.startswith("no manifest") for _, p in results) else 0


if __name__ == "__main__":
  sys.exit(main())
