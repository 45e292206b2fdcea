"""Several processes, one run: `initialize` joins JAX's distributed runtime (before anything
touches a device) and `GracefulStop` turns SIGTERM / SIGINT into a stop at a step every
process agrees on. JAX's cluster detection finds the coordinator and ids; `launch_kind` only
decides whether to ask it, where JAX's answer would be wrong
(test_multihost.py::test_where_jax_cluster_detection_falls_short)."""
import dataclasses
import os
import signal
import sys
import threading
from typing import Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from mae_jax import checks

class DistributedError(ValueError):
  """Flags for the distributed runtime that cannot work; one line naming the flag."""


@dataclasses.dataclass(frozen=True)
class Options:
  """How to join the distributed runtime (train.py's flags of the same names)."""
  mode: str = "auto"  # auto: detect (flags, SLURM, Open MPI, Cloud TPU); on: always; off: never
  coordinator_address: str | None = None  # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: Sequence[int] | None = None  # devices this process drives (GPU ids)
  init_timeout: int = 300  # seconds to wait for every process to connect
  heartbeat_timeout: int = 100  # seconds without a heartbeat after which a process is dead
  shutdown_timeout: int = 300  # seconds a finished process waits for the others at exit


def _int_env(env, name, default=0):
  try:
    return int(env.get(name, default))
  except ValueError:
    return default


def _in_cloud_tpu_vm(env):
  """A host with TPU chips (JAX asks the VM's metadata for the rest), or a TPU pod's
  environment (more than one worker: TPU_WORKER_HOSTNAMES=localhost is a single host,
  mae_jax.tools.cli.NO_TPU_HOST_ENV)."""
  workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return bool(checks.has_tpu_chips() or len(workers) > 1 or env.get("TPU_PROCESS_ADDRESSES")
              or env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def launch_kind(opts: Options, env: Mapping[str, str] = os.environ) -> str | None:
  """Why this process is one of several ("flags", "slurm", "ompi" or "tpu", tried in that
  order), or None for a lone process."""
  if opts.mode == "off":
    return None
  if any(v is not None for v in (opts.coordinator_address, opts.num_processes, opts.process_id)):
    return "flags"
  slurm_step = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
  if _int_env(env, "SLURM_NTASKS") > 1 and all(name in env for name in slurm_step):
    return "slurm"  # srun started several tasks (not just a batch script with ntasks > 1)
  if _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "ompi"
  if _in_cloud_tpu_vm(env):
    return "tpu"
  return "flags" if opts.mode == "on" else None


def check(opts: Options):
  """One clear line for flags that cannot work, before anything starts."""
  n, i = opts.num_processes, opts.process_id
  if n is not None and n < 1:
    raise DistributedError(f"--num_processes={n}: must be >= 1")
  if i is not None and not 0 <= i < (n if n is not None else i + 1):
    raise DistributedError(f"--process_id={i}: must be in [0, --num_processes={n})")
  if opts.coordinator_address is not None and ":" not in opts.coordinator_address:
    raise DistributedError(f"--coordinator_address={opts.coordinator_address}: expected host:port")
  for name in ("init_timeout", "heartbeat_timeout", "shutdown_timeout"):
    if getattr(opts, name) < 1:
      raise DistributedError(f"--{name}={getattr(opts, name)}: must be >= 1 second")


def initialize(opts: Options, env: Mapping[str, str] = os.environ) -> str | None:
  """Join the distributed runtime if this is one of several processes; returns the kind.
  Arguments left None are JAX's cluster detection's; CPU collectives go over gloo."""
  check(opts)
  kind = launch_kind(opts, env)
  if kind is None:
    return None
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  ids = None if opts.local_device_ids is None else [int(d) for d in opts.local_device_ids]
  try:
    jax.distributed.initialize(
        coordinator_address=opts.coordinator_address, num_processes=opts.num_processes,
        process_id=opts.process_id, local_device_ids=ids, initialization_timeout=opts.init_timeout,
        heartbeat_timeout_seconds=opts.heartbeat_timeout,
        shutdown_timeout_seconds=opts.shutdown_timeout)
  except (ValueError, TypeError) as e:  # arguments neither given nor detectable
    raise DistributedError(f"jax.distributed.initialize ({kind}): {e}") from None
  return kind


PEER_ERRORS = (jax.errors.JaxRuntimeError,)  # what a collective raises when a peer is gone


def failed_on_process_0(failed: bool) -> bool:
  """Process 0's `failed`, on every process (a collective: every process calls it), so
  that all of a run stop together where only process 0 can tell (its lock, W&B)."""
  if jax.process_count() == 1:
    return failed
  return bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))


def is_multiprocess():
  return jax.distributed.is_initialized() and jax.process_count() > 1


def peer_failure(error) -> str:
  """One line for a runtime error in a multi-process run: most likely a peer died."""
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return (f"process {jax.process_index()} of {jax.process_count()}: a step failed, most "
          f"likely because another process died or lost its connection ({first})")


def _say(message):
  """Write from a signal handler: os.write never re-enters a buffered stream."""
  os.write(sys.stderr.fileno(), (message + "\n").encode())


class GracefulStop:
  """SIGTERM / SIGINT -> stop after a step all processes agree on (a context manager).
  Alone, a signal sets a flag read at the next step; with the distributed runtime JAX's
  preemption service takes SIGTERM (SIGINT is passed on as one) and `reached(step)` is
  True on every process at the same step. A second Ctrl-C ends the process at once."""

  def __init__(self):
    self.signal_name = None  # the first signal received, e.g. "SIGTERM"
    self._previous = {}
    self._shared = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # Python lets only the main thread handle signals
    # with the preemption service, SIGTERM belongs to JAX's handler
    for signum in [signal.SIGINT] + ([] if self._shared else [signal.SIGTERM]):
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    self.signal_name = self.signal_name or name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process
      _say(f"{name}: saving a checkpoint at the next step all processes reach, then "
           "stopping (Ctrl-C again to quit at once)")
      if self._shared:
        os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service
    else:
      _say(f"{name}: saving a checkpoint at the next step, then stopping")

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop; called once per step, on every process."""
    if self._shared and multihost_utils.reached_preemption_sync_point(step):
      self.signal_name = self.signal_name or "SIGTERM"
      return True
    return not self._shared and self.signal_name is not None
