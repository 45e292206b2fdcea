"""Device mesh (axes `data`, `fsdp`), parameter partitioning and global batches.

The batch is split over both axes; with fsdp > 1 every state leaf is also split over
`fsdp` along one dimension (fsdp_spec, ZeRO-3 style). The model's activations carry logical
axis names; LOGICAL_RULES maps them to mesh axes while mae_jax.train.program traces.
"""
import collections
import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
# Logical activation axis -> mesh axes. "batch": split over every device, so that under FSDP
# XLA gathers a sharded kernel and reduce-scatters its gradient instead of splitting the
# activations by feature along that kernel's sharded dimension (all-to-alls, and weight
# gradients all-reduced whole). Names without a rule stay unconstrained.
LOGICAL_RULES = (("batch", BATCH_AXES),)


def mesh_shape(data, fsdp, num_devices):
  """(data, fsdp) axis sizes over `num_devices`; one of them may be -1 = the devices the
  other leaves. A size that cannot work raises ValueError("mesh[.axis]: why")."""
  if data == -1 and fsdp == -1:
    raise ValueError("mesh: at most one axis may be -1")
  if data == -1:
    if not (isinstance(fsdp, int) and fsdp >= 1 and num_devices % fsdp == 0):
      raise ValueError(f"mesh.fsdp: {fsdp} does not divide the {num_devices} devices")
    data = num_devices // fsdp
  if fsdp == -1:
    if not (isinstance(data, int) and data >= 1 and num_devices % data == 0):
      raise ValueError(f"mesh.data: {data} does not divide the {num_devices} devices")
    fsdp = num_devices // data
  if data * fsdp != num_devices:
    raise ValueError(f"mesh: data={data} x fsdp={fsdp} does not cover the {num_devices} "
                     "devices")
  return data, fsdp


def make_mesh(mesh_config, devices=None):
  """A ("data", "fsdp") Mesh over all (or the given) devices; mesh_config has the axis
  sizes `data` and `fsdp` (-1: the rest)."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config.data, mesh_config.fsdp, devices.size)
  return Mesh(devices.reshape(shape), ("data", "fsdp"))


def platform(mesh):
  """The platform of the mesh's devices ("cpu", "gpu", "tpu"): what its programs are
  compiled for, and what picks the model's platform-specific kernels."""
  return mesh.devices.flat[0].platform


def batch_sharding(mesh):
  """Leading (batch) dimension over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size, min_size=2**12):
  """Shard one dimension divisible by fsdp_size: the second-to-last first (a Dense
  kernel's input features, also in a scanned stack's (layers, in, out)), else the largest;
  small leaves stay replicated.

  Not the output features: split that way, the fused qkv kernel's 3 * width outputs do
  not split evenly into q, k and v, and the TPU compile (python -m mae_jax.aot) showed its
  gradient all-reduced whole over the fsdp axis instead of reduce-scattered."""
  if fsdp_size == 1 or np.prod(shape, dtype=np.int64) < min_size:
    return P()
  first = [len(shape) - 2] if len(shape) >= 2 else []
  for dim in first + sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      return P(*([None] * dim + ["fsdp"]))
  return P()


def state_shardings(abstract_state, mesh):
  """NamedShardings for a pytree of ShapeDtypeStructs (params and optimizer state)."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size)), abstract_state)


@contextlib.contextmanager
def activation_rules(mesh):
  """The context a program traces in: `mesh` (abstract) and LOGICAL_RULES."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def global_batch(local_batch, mesh):
  """This process's numpy batch -> a global jax.Array sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def to_host(x):
  """The whole of a global array as numpy on every process (a collective when the array
  spans several processes, so every process must call it)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def device_batches(host_batches, mesh, ahead=2, finish=None):
  """This process's host batches as global arrays on the mesh, `ahead` batches in flight
  (their transfers overlap the steps before them); `finish`, if given, maps each global
  batch on device (a jitted function, e.g. the device-side crop resize)."""
  queue = collections.deque()
  for batch in host_batches:
    batch = global_batch(batch, mesh)
    queue.append(finish(batch) if finish else batch)
    if len(queue) == ahead:
      yield queue.popleft()
  yield from queue
