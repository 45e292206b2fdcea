"""train.py as real subprocesses: launch one or several, watch their output, signal them.

Every wait has a deadline, so a hang fails the test instead of blocking the suite.
"""
import dataclasses
import glob
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

from helpers import ROOT, TINY  # TINY: a model of a few thousand parameters, 16 px


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


STARTED = []  # every TrainProcess, so that a failed test can end those it left running


def kill_started():
  """SIGKILL every TrainProcess still running (a test's teardown)."""
  while STARTED:
    STARTED.pop().kill()


class TrainProcess:
  """One `python train.py` with its stdout and stderr in files under `logdir`."""

  def __init__(self, workdir, logdir, name, *, devices, overrides, flags=()):
    self.name = name
    self.out_path = os.path.join(logdir, f"{name}.out")
    self.err_path = os.path.join(logdir, f"{name}.err")
    config = {**TINY, **overrides}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           "--config", os.path.join(ROOT, "configs/default.py"), "--workdir", str(workdir),
           *[f"--config.{k}={v}" for k, v in config.items()], *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
    STARTED.append(self)

  @property
  def stdout(self):
    with open(self.out_path) as f:
      return f.read()

  @property
  def stderr(self):
    with open(self.err_path) as f:
      return f.read()

  def describe(self):
    return (f"--- {self.name}: returncode {self.proc.poll()}\n--- stdout:\n{self.stdout[-3000:]}"
            f"\n--- stderr:\n{self.stderr[-5000:]}")

  def wait_for(self, pattern, timeout, stream="stdout"):
    """The first match of `pattern` in the output, waiting up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
      match = re.search(pattern, getattr(self, stream))
      if match:
        return match
      if self.proc.poll() is not None or time.monotonic() > deadline:
        raise AssertionError(f"no {pattern!r} in {self.name}'s {stream}\n{self.describe()}")
      time.sleep(0.01)

  def wait(self, timeout):
    """The return code, killing the process if it runs past `timeout` seconds."""
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"{self.name} still running after {timeout} s\n{self.describe()}")

  def signal(self, signum):
    self.proc.send_signal(signum)

  def kill(self):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
      self.proc.wait(timeout=30)


def launch_group(workdir, logdir, num_processes, devices_per_process, overrides, flags=(),
                 tag="p"):
  """`num_processes` train.py processes on localhost forming one run (gloo collectives)."""
  address = f"localhost:{free_port()}"
  return [TrainProcess(workdir, logdir, f"{tag}{i}", devices=devices_per_process,
                       overrides=overrides,
                       flags=(f"--coordinator_address={address}",
                              f"--num_processes={num_processes}", f"--process_id={i}", *flags))
          for i in range(num_processes)]


def wait_all(procs, timeout):
  """Return codes of all of `procs`, within one shared deadline; kills them all on failure."""
  deadline = time.monotonic() + timeout
  try:
    return [p.wait(max(1.0, deadline - time.monotonic())) for p in procs]
  finally:
    for p in procs:
      p.kill()


def summary_values(workdir, tag):
  """(step, Summary.Value) of one tag in the workdir's TensorBoard event files, read
  directly: TFRecord framing around Event protos."""
  from tensorboardX.proto import event_pb2
  for path in sorted(glob.glob(os.path.join(str(workdir), "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for value in event.summary.value:
        if value.tag == tag:
          yield event.step, value


def scalars(workdir, tag="train/loss"):
  """{step: value} of one scalar in the workdir's TensorBoard event files."""
  return {step: value.simple_value for step, value in summary_values(workdir, tag)}


def checkpoint_steps(workdir):
  path = os.path.join(str(workdir), "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


# --- Watching a job's workdir and killing it at a chosen moment --------------------------


def train_records(workdir):
  """The whole lines of a workdir's metrics.jsonl that are training records, in order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f.read().splitlines(keepends=True) if line.endswith("\n")]
  timing = ("train/input_wait",)  # a wall-clock share, not a computed value
  return [{k: v for k, v in r.items() if k not in timing}
          for r in map(json.loads, lines) if "train/loss" in r]


@dataclasses.dataclass
class Snapshot:
  complete: list  # finished checkpoint steps
  writing: list  # steps whose checkpoint directory is still temporary (being written)
  logged: int  # last step this run logged (0: none yet)


def snapshot(workdir, first_record):
  """The workdir now, read with one directory listing: the watcher polls it every few
  milliseconds, and a slower read (Orbax's own listing takes ~25x as long) can miss the
  short moments between a loaded machine's checkpoint writes. Local checkpoints only: a
  finished step's directory is its number, a save in flight has Orbax's temporary name."""
  from mae_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  ckpts = os.path.join(workdir, "checkpoints")
  names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
  complete = sorted(int(n) for n in names if n.isdigit())
  writing = sorted(int(n.split(".")[0]) for n in names if checkpoints.TMP_SUFFIX in n)
  logged = max((r["step"] for r in train_records(workdir)[first_record:]), default=0)
  return Snapshot(complete, writing, logged)


def wait_stopped(pid, timeout=30):
  """Until every thread of `pid` is stopped, so that nothing it writes changes any more."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
      try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
          states.append(f.read().rsplit(")", 1)[1].split()[0])
      except FileNotFoundError:
        pass
    if all(s in "TtZX" for s in states):
      return
    time.sleep(0.001)
  raise AssertionError(f"process {pid} did not stop")


def start_watched(cmd, workdir, env, log_path):
  """(`cmd` started with its output in `log_path`, the number of train records its job's
  `workdir` already held)."""
  first = len(train_records(workdir))
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
  return proc, first


def run_and_kill(cmd, workdir, env, log_path, when, what, timeout=300):
  """Start `cmd` (a job in `workdir`) and SIGKILL it at the first moment `when(snapshot)`
  holds.

  Each candidate moment is frozen with SIGSTOP and checked again before the kill (else the
  run continues with SIGCONT), so the kill lands exactly in a state the test has seen.
  Returns (that snapshot, the run's output so far).
  """
  proc, first = start_watched(cmd, workdir, env, log_path)
  deadline = time.monotonic() + timeout
  try:
    while time.monotonic() < deadline:
      if proc.poll() is not None:
        break
      if when(snapshot(workdir, first)):
        proc.send_signal(signal.SIGSTOP)
        wait_stopped(proc.pid)
        snap = snapshot(workdir, first)
        if when(snap):
          proc.send_signal(signal.SIGKILL)
          assert proc.wait() == -signal.SIGKILL
          return snap, open(log_path).read()
        proc.send_signal(signal.SIGCONT)
      time.sleep(0.002)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  raise AssertionError(f"kill point not reached ({what}); exit {proc.returncode}:\n"
                       f"{open(log_path).read()[-3000:]}")


def run_and_stop(cmd, workdir, env, log_path, after_step, signum, timeout=300):
  """Start `cmd` (a job in `workdir`); once it has logged `after_step` (counting from its
  start), freeze it, send `signum`, let it go on, and wait. Freezing first means the
  signal lands while the run is between the steps the test has seen, not after it has
  finished. Returns (return code, its output)."""
  proc, first = start_watched(cmd, workdir, env, log_path)
  deadline = time.monotonic() + timeout
  try:
    while snapshot(workdir, first).logged < after_step:
      assert proc.poll() is None and time.monotonic() < deadline, open(log_path).read()[-3000:]
      time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)
    wait_stopped(proc.pid)
    proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)
    return proc.wait(timeout=120), open(log_path).read()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def load_state(workdir, step):
  """A saved state (of any job) as a pytree of numpy arrays, independent of devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def assert_trees_equal(a, b):
  """Bitwise equality of two pytrees of arrays, leaf by leaf (the path named on failure)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def wait_until(predicate, proc, timeout=300):
  """Until predicate() holds, failing if `proc` ends or `timeout` seconds pass first."""
  deadline = time.monotonic() + timeout
  while not predicate():
    assert proc.poll() is None, f"ended first (exit {proc.returncode})"
    assert time.monotonic() < deadline, f"not reached in {timeout} s"
    time.sleep(0.01)


def images(workdir, tag):
  """{step: PNG bytes} of one image summary in the workdir's TensorBoard event files."""
  return {step: value.image.encoded_image_string for step, value in summary_values(workdir, tag)
          if value.HasField("image")}
