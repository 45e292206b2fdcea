"""Orbax checkpoints of the train state: async, keep-N, atomic, verified, resumable.

Orbax writes step N into `N.orbax-checkpoint-tmp` and renames it to `N` once every file is
written, so a step directory that exists is whole and `latest_step` only sees complete
ones; a temporary directory that a killed run left behind is noted (`notes`) and removed.
Once a step is complete, process 0 writes a manifest of its files' sizes and CRC-32s into
it (MANIFEST), and restore checks it first: a truncated or corrupted file is named instead
of being read as garbage. Write failures (a full or unwritable disk) surface as one
CheckpointError naming the directory; the previous complete checkpoint is never touched.
The data position needs no saving: batches are a pure function of (seed, step).
"""
import contextlib
import errno
import fcntl
import json
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

MANIFEST = "mae_manifest.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step still being written
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
  """A checkpoint or workdir that cannot be written, read or trusted (one line naming it)."""


class Checkpointer:
  """A CheckpointManager over `directory` holding TrainState pytrees."""

  def __init__(self, directory, *, keep, every_steps, async_save=True):
    self.directory = os.path.abspath(directory)
    check_writable(self.directory)
    self.interrupted = interrupted_steps(self.directory)  # before Orbax removes them
    self.notes = []  # what restore_latest skipped, for the run's log
    ignore_late_callbacks()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def step_dir(self, step):
    return os.path.join(self.directory, str(step))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, force=False):
    """Start saving `state` at `step` (if due, or `force`); returns whether it saves.

    Raises CheckpointError if this save, or an earlier asynchronous one, cannot be written.
    """
    try:
      saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # Orbax and TensorStore raise ValueError, OSError, ...
      raise self._write_error(e) from e
    self.write_manifests()  # the save above waited for the previous one to finish
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
    """Raise CheckpointError if the disk cannot hold one checkpoint of `target`."""
    check_space(self.directory, sum(x.nbytes for x in jax.tree.leaves(target)))

  def write_manifests(self):
    """Write the manifest of every complete step that has none (process 0 only)."""
    if jax.process_index() != 0:
      return
    for step in complete_steps(self.directory):
      if not os.path.exists(os.path.join(self.step_dir(step), MANIFEST)):
        write_manifest(self.step_dir(step))

  def wait(self):
    """Block until pending saves are on disk; CheckpointError if one could not be written."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(e) from e
    self.write_manifests()

  def close(self):
    self.wait()
    self.manager.close()

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


def complete_steps(directory):
  """Sorted steps whose directory Orbax finished (renamed from its temporary name)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def interrupted_steps(directory):
  """Sorted (step, path) of the temporary directories of saves that never finished."""
  found = []
  for name in os.listdir(directory):
    match = re.fullmatch(r"(\d+)" + re.escape(TMP_SUFFIX) + r".*", name)
    if match:
      found.append((int(match.group(1)), os.path.join(directory, name)))
  return sorted(found)


def check_workdir(workdir, flag="--workdir"):
  """Raise CheckpointError for an empty workdir (it would mean the current directory)."""
  if not isinstance(workdir, (str, os.PathLike)) or not str(workdir).strip():
    raise CheckpointError(f"{flag}: empty; expected a directory for the run's checkpoints "
                          "and logs")


def check_writable(directory):
  """Raise CheckpointError unless `directory` exists (or can be made) and takes a file."""
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
    with contextlib.suppress(OSError):
      os.remove(probe)


def check_space(directory, need_bytes):
  """Raise CheckpointError if `directory`'s file system has less than `need_bytes` free."""
  free = shutil.disk_usage(directory).free
  if free < need_bytes:
    raise CheckpointError(
        f"{directory}: {free / 2**20:.1f} MiB free, but one checkpoint of this run needs "
        f"{need_bytes / 2**20:.1f} MiB; free some space or choose another --workdir")


def file_crc32(path):
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def step_files(step_dir):
  """Paths relative to `step_dir` of all its files but the manifest."""
  return sorted(os.path.relpath(os.path.join(d, name), step_dir)
                for d, _, names in os.walk(step_dir) for name in names
                if not name.startswith(MANIFEST))


def write_manifest(step_dir):
  """Record {file: [size, crc32]} of a complete step directory, atomically."""
  path = os.path.join(step_dir, MANIFEST)
  try:
    files = {rel: [os.path.getsize(os.path.join(step_dir, rel)),
                   file_crc32(os.path.join(step_dir, rel))] for rel in step_files(step_dir)}
    with open(path + ".tmp", "w") as f:
      json.dump({"files": files}, f)
    os.replace(path + ".tmp", path)
  except FileNotFoundError:
    pass  # Orbax deleted the step meanwhile (keep-N)


def verify(step_dir, step, hint):
  """Raise CheckpointError naming the first file of `step_dir` that is missing, truncated
  or changed since its manifest was written; returns whether there was a manifest."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return False  # written before manifests, or killed between finishing and manifesting
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"checkpoint step {step} is damaged: {path}: unreadable manifest "
                          f"({e}); {hint}") from None
  for rel, (size, crc) in sorted(files.items()):
    file = os.path.join(step_dir, rel)
    if not os.path.isfile(file):
      problem = "is missing"
    elif (actual := os.path.getsize(file)) != size:
      problem = f"is truncated ({actual} of {size} bytes)" if actual < size else (
          f"has {actual} bytes, not the {size} written")
    elif file_crc32(file) != crc:
      problem = "is corrupted (its CRC-32 differs from the one written)"
    else:
      continue
    raise CheckpointError(f"checkpoint step {step} is damaged: {file} {problem}; {hint}")
  return True


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


def _write_json_atomically(path, text):
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def launch_configs(workdir):
  """Paths of WORKDIR/configs/launch-*.json in launch order."""
  directory = os.path.join(workdir, CONFIG_HISTORY)
  if not os.path.isdir(directory):
    return []
  found = [(int(m.group(1)), name) for name in os.listdir(directory)
           if (m := re.fullmatch(r"launch-(\d+)-step-\d+\.json", name))]
  return [os.path.join(directory, name) for _, name in sorted(found)]


def save_config(config, workdir, start_step=0):
  """Record this launch's config (process 0 only): WORKDIR/config.json is the first
  launch's and is never overwritten; each launch adds configs/launch-NNN-step-S.json
  (S: the step it started from)."""
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  os.makedirs(os.path.join(workdir, CONFIG_HISTORY), exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    _write_json_atomically(path, text)
  number = len(launch_configs(workdir)) + 1
  _write_json_atomically(os.path.join(workdir, CONFIG_HISTORY,
                                      f"launch-{number:03d}-step-{start_step}.json"), text)


def load_config_dict(workdir):
  """The config of a workdir's latest launch as a plain dict (config.json where it keeps
  no history), or None where it has none."""
  history = launch_configs(workdir)
  path = history[-1] if history else os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
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


def lock_workdir(workdir):
  """Take WORKDIR's lock on process 0 (None elsewhere); every process learns whether it
  was free, so all of a multi-process run stop together when it was not."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except CheckpointError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    taken = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if taken and error is None:
      error = CheckpointError(f"{os.path.abspath(workdir)} is in use by another run "
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
  return os.path.isfile(os.path.join(path, META_FILE))


def save_params(directory, params, meta):
  """Write DIR/params and DIR/model.json (meta); never overwrites an existing DIR."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise ParamsError(f"{directory} already exists; choose a new output directory")
  os.makedirs(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params)
  with open(os.path.join(directory, META_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  return directory


def read_meta(directory):
  """The model.json of a parameter directory, as a dict."""
  if not is_params_dir(directory):
    raise ParamsError(f"{directory}: no {META_FILE}; expected a parameter directory "
                      "(`python -m mae_jax.convert import` writes one)")
  path = os.path.join(directory, META_FILE)
  try:
    with open(path) as f:
      meta = json.load(f)
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
  params_path = os.path.join(os.path.abspath(path), PARAMS_DIR)
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
