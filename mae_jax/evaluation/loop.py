"""The step loop shared by the linear probe and fine-tuning, and test accuracy."""
import jax
import numpy as np

from mae_jax import sharding


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite."""


def run_steps(step_fn, state, batches, *, total_steps, base_rng, logger, log_every,
              images_per_step, every_steps=None, callback=None):
  """Steps 1..total_steps of `step_fn(state, batch, base_rng) -> (state, metrics)`.

  Metrics of step N are read after step N + 1 is dispatched, logged every `log_every` steps
  (a progress line and TensorBoard scalars); a non-finite loss stops the run. Every
  `every_steps` steps (and after the last), `callback(step, state)` runs.
  Returns (state, the last step's metrics).
  """
  pending, last = None, None
  for step in range(1, total_steps + 1):
    state, metrics = step_fn(state, next(batches), base_rng)
    if pending is not None:
      last = report(pending, logger, log_every, total_steps, images_per_step)
    pending = (step, metrics)
    if step == total_steps or (every_steps and step % every_steps == 0):
      last = report(pending, logger, log_every, total_steps, images_per_step)
      pending = None
      if callback is not None:
        callback(step, state)
  return state, last


def report(pending, logger, log_every, total_steps, images_per_step):
  step, metrics = pending
  metrics = jax.device_get(metrics)
  if not np.isfinite(float(metrics["loss"])):
    raise NonFiniteLossError(f"non-finite loss ({float(metrics['loss'])}) at step {step}")
  if step % log_every == 0 or step == total_steps:
    logger.scalars(step, metrics)
    logger.progress(step, metrics, images_per_step)
  return metrics


def epoch_batches(arrays, batch_size, seed):
  """Endless host batches {name: rows} of the same rows of every array in `arrays`
  (a dict of (N, ...) numpy arrays): a new permutation seeded by (seed, epoch) each
  epoch, the remainder dropped; this process's part of each global batch."""
  n = len(next(iter(arrays.values())))
  part = process_slice(batch_size)
  epoch = 0
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for b in range(n // batch_size):
      rows = order[b * batch_size:(b + 1) * batch_size][part]
      yield {name: array[rows] for name, array in arrays.items()}
    epoch += 1


def process_slice(global_size):
  size = global_size // jax.process_count()
  return slice(jax.process_index() * size, (jax.process_index() + 1) * size)


def device_batches(host_batches, mesh):
  """Host batches as global arrays split over the mesh, one batch ahead."""
  pending = None
  for batch in host_batches:
    current = sharding.global_batch(batch, mesh)
    if pending is not None:
      yield pending
    pending = current


def count_correct(logits_BC, labels_B, valid_B):
  """Correctly classified valid examples of a batch (int32 scalar)."""
  return ((logits_BC.argmax(-1) == labels_B) & valid_B).sum()
