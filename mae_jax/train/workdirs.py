"""A run's workdir: one run at a time (its lock, local or on Cloud Storage), and each
launch's config (config.json, configs/launch-NNN-step-S.json). Every job that trains takes
the lock (mae_jax.train.loop) before touching the workdir: Orbax's clean-up of temporary
directories would otherwise delete a live run's checkpoint in progress."""
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import time

import jax

from mae_jax import paths
from mae_jax.train import distributed
from mae_jax.train.checkpoints import CheckpointError

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
  """Record this launch's config with its `job` kind (process 0): config.json is the first
  launch's, never overwritten; each adds configs/launch-NNN-step-S.json (S: its start step)."""
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
  except (FileNotFoundError, NotADirectoryError):  # a path under a file: named when written
    return None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read the saved config ({e})") from None
  if not isinstance(saved, dict):
    raise CheckpointError(f"{path}: expected a JSON object (train.py's config), found "
                          f"{type(saved).__name__}")
  return saved


LOCK_FILE = "run.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _holder_of(text):
  """'pid P on host H, started T' of a lock file's contents (or what is there)."""
  try:
    h = json.loads(text)
    return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
  except (ValueError, KeyError, TypeError):
    return f"an unreadable holder ({text[:80]!r})"


def _me():
  return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})


class WorkdirLock:
  """WORKDIR/run.lock, naming its holder (host, pid, start), held by one run's process 0
  with a POSIX record lock, which the kernel (or NFS server) drops however the holder dies:
  a file left by a killed run is taken over, with a note. Without POSIX locks, a holder
  alive on this host, or on another (not checkable), keeps the workdir."""
  ADVICE = "wait for it to finish, stop it, or choose another --workdir"

  def __init__(self, workdir):
    self.path = paths.join(paths.absolute(workdir), LOCK_FILE)
    self.fd = None  # the open lock file (GcsWorkdirLock: the contents it wrote)
    self.note = None  # what was taken over, for the run's log

  def acquire(self):
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
      self.note = self._took_over(previous) if previous.strip() else None
      os.ftruncate(fd, 0)
      os.pwrite(fd, _me().encode(), 0)
      os.fsync(fd)
      self.fd = fd
    return self

  def _took_over(self, previous):
    return (f"took over {self.path}, left by a run that is no longer running "
            f"({_holder_of(previous)})")

  def _in_use(self, contents):
    return CheckpointError(
        f"{os.path.dirname(self.path)} is in use by another run ({_holder_of(contents)}; "
        f"lock {self.path}): {self.ADVICE}")

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
  except OSError as e:  # signal 0 fails with ESRCH (no such process) or EPERM (alive)
    return e.errno != errno.ESRCH
  return True


class GcsWorkdirLock(WorkdirLock):
  """WORKDIR/run.lock on Cloud Storage (no record locks): a launch finding one refuses
  unless its holder ran on this host and is gone; one of another host is named, to be
  removed by hand once that run is known to be over."""
  ADVICE = ("wait for it to finish or stop it; if it ran on a machine that is gone, remove "
            "that lock object")

  def acquire(self):
    """Create the lock object where none exists, or replace a dead holder's lock while it
    is the generation read: one request with a precondition each, so of racing launches
    one wins and the others find its lock."""
    me = _me()
    while not paths.create_new(self.path, me):
      try:
        previous, generation = paths.read_generation(self.path)
      except FileNotFoundError:
        continue  # its holder released it meanwhile
      previous = previous.decode(errors="replace")
      self._check_by_contents(previous)  # raises unless the holder is gone
      if paths.replace_generation(self.path, me, generation):
        self.note = self._took_over(previous)
        break
      # replaced or removed meanwhile (another launch took it over): look again
    self.fd = me
    return self

  def release(self):
    with contextlib.suppress(OSError):  # FileNotFoundError included
      if self.fd is not None and paths.read_text(self.path) == self.fd:
        paths.resolve(self.path).unlink()
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
  if distributed.failed_on_process_0(error is not None) and error is None:
    error = CheckpointError(f"{paths.absolute(workdir)} is in use by another run "
                            "(process 0 names it)")
  if error is not None:
    raise error
  return lock
