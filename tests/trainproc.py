"""train.py as real subprocesses: launch one or several, watch their output, signal them.

Every wait has a deadline, so a hang fails the test instead of blocking the suite.
"""
import glob
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


def scalars(workdir, tag="train/loss"):
  """{step: value} of one scalar in the workdir's TensorBoard event files (read directly:
  TFRecord framing around Event protos)."""
  from tensorboardX.proto import event_pb2
  values = {}
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
          values[event.step] = value.simple_value
  return values


def checkpoint_steps(workdir):
  path = os.path.join(str(workdir), "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
