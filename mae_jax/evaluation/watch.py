"""Reconstructions of fixed test images (masked the same way each time) in TensorBoard every
`vis_every_steps` steps, drawn on a background thread so that training never waits for a
picture; a failed picture is a line in the log.
"""
import concurrent.futures
import time

import jax
import numpy as np

from mae_jax.data import augment as augment_lib
from mae_jax.evaluation import features, knn, pictures
from mae_jax.train import sharding

VIS_STREAM = 2**31 - 2  # fold_in data of the pictures' masks: apart from steps and the eval


def fixed_images(source, count, seed, image_size):
  """uint8 (n, S, S, C): `count` test images (all where the split has fewer) chosen from
  `seed`, in index order, at the model's size."""
  chosen = knn.seeded_subset(source, count, seed, VIS_STREAM)
  images, _ = chosen.batch(np.arange(len(chosen)))
  return augment_lib.augment_batch(images, None, augment_lib.AUGMENTS["none"], image_size,
                                   None)


class ReconstructionMonitor:
  """Reconstructions of fixed test images, every `every_steps` steps, in TensorBoard."""

  def __init__(self, run, every_steps):
    cfg = run.config
    self.run, self.every_steps = run, every_steps
    self.images = fixed_images(run.test_src, cfg.num_vis_images, cfg.seed,
                               cfg.data.image_size)
    size = -(-len(self.images) // run.mesh.devices.size) * run.mesh.devices.size  # padded
    self.batch = next(features.row_batches({"image": self.images}, size, run.mesh))
    self.fn = run.eval_step(np.zeros(self.images.shape[1:], np.float32))
    self.rng = None  # made at the first picture: nothing runs before the run's checks
    self.note = pictures.target_note(cfg.model.norm_pix_loss)
    self.pool = concurrent.futures.ThreadPoolExecutor(1, "mae_pictures")
    self.pending = []
    self.seconds = 0.0  # spent on the training thread
    self.drawn = 0

  @classmethod
  def for_run(cls, run):
    """A monitor where config.vis_every_steps is set, else None (no cost at all)."""
    every = run.config.get("vis_every_steps")
    return cls(run, every) if every else None

  def __call__(self, step, state, logger):
    t0 = time.perf_counter()
    if self.rng is None:
      self.rng = jax.random.fold_in(jax.random.key(self.run.config.seed), VIS_STREAM)
    out = self.fn(state.params, self.batch, self.rng)  # dispatched; runs before the next step
    pred, mask = out["pred"], out["mask"]
    if jax.process_count() > 1:  # gathering is a collective: every process, this thread
      pred, mask = sharding.to_host(pred), sharding.to_host(mask)
    if jax.process_index() == 0:
      self.pending = [f for f in self.pending if not f.done()]  # only those in flight
      self.pending.append(self.pool.submit(self.draw, step, pred, mask, logger))
    self.seconds += time.perf_counter() - t0

  def draw(self, step, pred, mask, logger):
    n = len(self.images)
    try:
      picture = pictures.reconstruction_picture(
          self.images, np.asarray(pred)[:n], np.asarray(mask)[:n], self.run.model.patch_size,
          title=f"step {step} - {self.note}")
      pixels = np.asarray(picture)
      logger.image(step, "reconstructions", pixels[..., None] if pixels.ndim == 2 else pixels)
      self.drawn += 1
    except Exception as e:  # pylint: disable=broad-except (a picture never stops the run)
      logger.info(f"reconstruction picture at step {step} failed ({type(e).__name__}: "
                  f"{e}); training goes on")

  def close(self, logger=None, wall_seconds=None):
    """Wait for the pictures in flight; log what they cost the training thread."""
    for future in self.pending:
      future.result()
    self.pending.clear()
    self.pool.shutdown()
    if logger is not None and wall_seconds:
      where = "TensorBoard and W&B" if getattr(logger, "wandb", None) else "TensorBoard"
      logger.info(f"reconstruction pictures: {self.drawn} in {where} "
                  f"(tag reconstructions), {self.seconds:.2f} s on the training thread "
                  f"({self.seconds / wall_seconds:.2%} of {wall_seconds:.0f} s)")
