"""Orbax checkpoints of the train state: async, keep-N, atomic, resumable.

Orbax writes each step into a temporary directory and renames it when complete, so a
step directory that exists is whole; `latest_step` only ever sees complete ones. The
data position needs no saving: batches are a pure function of (seed, step).
"""
import json
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A CheckpointManager over `directory` holding TrainState pytrees."""

  def __init__(self, directory, *, keep, every_steps, async_save=True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, force=False):
    """Start saving `state` at `step` (if due, or `force`); returns whether it saves."""
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, step, target):
    """Restore `step` onto the shapes, dtypes and shardings of `target` (a state pytree
    of arrays or jax.ShapeDtypeStructs)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_latest(self, target):
    """(state, step) from the latest complete checkpoint, or (target, None) if none."""
    step = self.latest_step()
    if step is None:
      return target, None
    return self.restore(step, target), step

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def save_config(config, workdir):
  """Write the run's config as JSON beside the checkpoints (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)


def load_config_dict(workdir):
  """The saved config of a workdir as a plain dict."""
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)
