"""Orbax checkpoints of the train state, local or gs://: async, keep-N, atomic (Orbax's
own commit), and verified: a background thread of process 0 writes each complete step's
manifest (size and CRC-32 of each file; on Cloud Storage the server's CRC-32C, listed), and
a restore names a missing, truncated or corrupted file instead of reading garbage. Every
failure is one CheckpointError naming the directory (docs/reliability.md). Batches are a
function of (seed, step): the data position needs no saving.
"""
import base64
import concurrent.futures
import json
import logging
import os
import re
import shutil
import sys
import zlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mae_jax import paths

# Seconds the background writes of a gs:// save may take (Orbax's AsyncOptions.timeout_secs;
# the next save or wait raises): a server that stops answering mid-save fails the run after
# this long instead of after TensorStore's retries (up to 32, backing off to 32 s each).
GCS_SAVE_TIMEOUT_S = int(os.environ.get("MAE_JAX_CHECKPOINT_TIMEOUT_S", "1800"))
MANIFEST = "mae_manifest.json"
TMP_SUFFIX = ocp.path.step.TMP_DIR_SUFFIX  # Orbax's name for a local step still being written
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
    bounded = ocp.AsyncOptions(timeout_secs=GCS_SAVE_TIMEOUT_S) if self._timeout() else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps, async_options=bounded,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._manifests = concurrent.futures.ThreadPoolExecutor(1, "mae_manifest")
    self._pending = None  # the Future of the manifest task last submitted
    self._started = self._complete = self.manager.latest_step()  # steps known to Orbax

  def step_dir(self, step):
    return paths.join(self.directory, str(step))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, force=False):
    """Start saving `state` at `step` (if due, or `force`); returns whether it saves.
    CheckpointError if this save or an earlier asynchronous one cannot be written."""
    try:
      saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # Orbax and TensorStore raise ValueError, OSError, ...
      raise self._write_error(e) from e
    self._complete = self._started  # the save above waited for the previous one to finish
    self._started = step if saved else self._started
    self.write_manifests()
    return saved

  def restore(self, step, target, unfit_hint=None):
    """Restore `step` onto the shapes, dtypes and shardings of `target` (arrays or
    ShapeDtypeStructs), its files checked against the manifest first. unfit_hint: the
    advice where Orbax cannot restore files that passed (another config, not damage)."""
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
    """(state, step) of the latest complete checkpoint, or (target, None); each newer
    step whose writing was interrupted is noted in `notes`."""
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
    """CheckpointError if the local disk cannot hold one checkpoint of `target`."""
    if not paths.is_gcs(self.directory):
      check_space(self.directory, sum(x.nbytes for x in jax.tree.leaves(target)))

  def write_manifests(self):
    """Queue the manifests of complete steps without one (process 0, one task at a time)."""
    if jax.process_index() != 0:
      return
    if self._pending is not None and not self._pending.done():
      return  # the running task lists the steps again when it is done
    self._raise_manifest_error()
    self._pending = self._manifests.submit(write_missing_manifests, self.directory)

  def wait(self):
    """Block until pending saves are on disk; CheckpointError if one could not be written."""
    try:
      self.manager.wait_until_finished()
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

  def _raise_manifest_error(self):
    error = self._pending.exception() if self._pending and self._pending.done() else None
    self._pending = None if error else self._pending
    if error is not None:
      raise CheckpointError(f"cannot write a checkpoint manifest in {self.directory}: "
                            f"{short_reason(error)}") from error

  def _write_error(self, error):
    timeout = isinstance(error, TimeoutError)  # Orbax's AsyncOptions.timeout_secs (gs://)
    last = self._complete if timeout else (complete_steps(self.directory) or [None])[-1]
    kept = (f"the last complete checkpoint, step {last}, is intact" if last is not None
            else "no checkpoint was completed")
    why = (f"not finished after {GCS_SAVE_TIMEOUT_S} s (MAE_JAX_CHECKPOINT_TIMEOUT_S): the "
           "storage stopped answering" if timeout else short_reason(error))
    return CheckpointError(f"cannot write a checkpoint in {self.directory}: {why}; {kept}")

  def _fallback(self, step):
    earlier = [s for s in complete_steps(self.directory) if s < step]
    after = f"resume from step {earlier[-1]}" if earlier else "start afresh"
    return f"delete {self.step_dir(step)} to {after}"


class _DropClosedLoopErrors:
  """sys.unraisablehook that drops "Event loop is closed", passing on everything else."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      self.previous(unraisable)


def ignore_late_callbacks():
  """After a failed save TensorStore calls back into the event loop Orbax has closed, each
  call a traceback around the one-line error (test_full_disk_mid_run_..., timing-dependent):
  drop them (process-wide, once)."""
  if not isinstance(sys.unraisablehook, _DropClosedLoopErrors):
    sys.unraisablehook = _DropClosedLoopErrors(sys.unraisablehook)


class _OneLineOrbaxErrors(logging.Filter):
  """Orbax logs a failed background save with its traceback before the run's one-line
  error (no option turns that off: test_full_disk_mid_run_...): keep it to one line."""

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
  """Sorted steps whose directory Orbax finished, as Orbax itself tells them."""
  return sorted(_listed(ocp.path.step.checkpoint_steps, directory))


def interrupted_steps(directory):
  """Sorted (step, path) of saves that never finished (Orbax's temporary paths)."""
  found = [p.get() for p in _listed(ocp.path.step.all_temporary_paths, directory)]
  return sorted((ocp.path.step.step_from_checkpoint_name(p.name), os.fspath(p)) for p in found)


def _listed(orbax_listing, directory):
  """orbax_listing(directory); nothing where it does not exist (a gs:// "directory" of
  another process's write probe may vanish between Orbax's exists() and its listing)."""
  try:
    return orbax_listing(paths.resolve(directory))
  except (FileNotFoundError, NotADirectoryError):
    return []


def check_workdir(workdir, flag="--workdir"):
  """CheckpointError for an empty workdir (the current directory) or a file."""
  if not isinstance(workdir, (str, os.PathLike)) or not str(workdir).strip():
    raise CheckpointError(f"{flag}: empty; expected a directory for the run's checkpoints "
                          "and logs")
  if paths.is_gcs(workdir):
    return  # checked by writing a probe (check_writable), one line for any storage error
  if os.path.isfile(workdir):
    raise CheckpointError(f"{flag} {workdir}: is a file; expected a directory for the run's "
                          "checkpoints and logs")


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
  """A probe object written and deleted: a missing bucket or credentials, or an unreachable
  server, is one CheckpointError before any work starts."""
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
  for chunk in _chunks(path):
    crc = zlib.crc32(chunk, crc)
  return crc


def file_crc32c(path):
  """Base64 CRC-32C of a file's bytes, as Cloud Storage reports it."""
  import google_crc32c
  crc = google_crc32c.Checksum()
  for chunk in _chunks(path):
    crc.update(chunk)
  return base64.b64encode(crc.digest()).decode()


def _chunks(path):
  with paths.resolve(path).open("rb") as f:
    while chunk := f.read(_CHUNK):
      yield chunk


def step_listing(step_dir):
  """{relative path: (size, server's CRC-32C or None locally)} of a step's files but the
  manifest: one listing, nothing read."""
  crcs = paths.gcs_checksums(step_dir) if paths.is_gcs(step_dir) else {}
  return {rel: (size, crcs.get(rel)) for rel, size in paths.walk_files(step_dir).items()
          if not os.path.basename(rel).startswith(MANIFEST)}


def write_manifest(step_dir):
  """Write a complete step's manifest {file: [size, checksum]} atomically."""
  gcs = paths.is_gcs(step_dir)
  try:
    files = {rel: [size, crc if gcs else file_crc32(paths.join(step_dir, rel))]
             for rel, (size, crc) in step_listing(step_dir).items()}
    manifest = {"checksum": "crc32c" if gcs else "crc32", "files": files}
    paths.write_atomic(paths.join(step_dir, MANIFEST), json.dumps(manifest))
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
  """CheckpointError naming the first file of `step_dir` missing, truncated or changed
  since its manifest; returns whether there was one. A local file is re-read; a gs://
  object's CRC-32C is the server's, listed (`full`: downloaded and recomputed)."""
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
  """A long Orbax/TensorStore error in a phrase: the file it names and the OS error of
  its `[os_error_code=N]` (the text before the code varies with where a write failed)."""
  text = " ".join(str(error).split()) or type(error).__name__
  files = re.findall(r'(?:local file|Failed writing:|Metadata file:?)\s*"?(/[^"\s,]+)', text)
  code = re.search(r"\[os_error_code='?(\d+)", text)
  if files and code:
    return f"{files[-1]}: {os.strerror(int(code.group(1)))}"
  return text[:limit] + ("..." if len(text) > limit else "")


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
  """Raise `error` (default CheckpointError) naming the non-finite leaves of `tree` (a bit
  flip in a stored float restores without complaint from Orbax)."""
  bad = nonfinite_leaves(tree)
  if bad:
    shown = ", ".join(bad[:5]) + (f" ... ({len(bad)} in all)" if len(bad) > 5 else "")
    raise (error or CheckpointError)(f"{what}: NaN or infinite values in {shown}"
                                     + (f"; {hint}" if hint else ""))


def verify_all(directory):
  """[(step, problem or None)] of every complete step, fully verified."""
  results = []
  for step in complete_steps(directory):
    step_dir = paths.join(directory, str(step))
    try:
      had = verify(step_dir, step, "restore another step", full=True)
      results.append((step, None if had else "no manifest: not verifiable"))
    except CheckpointError as e:
      results.append((step, str(e)))
  return results
