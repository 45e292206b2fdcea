"""Frozen features of a whole split, computed once in deterministic eval batches: 'cls'
(the cls token after the final norm), 'avg' (the mean patch token) or 'pixels' (the
normalized image: the no-learning baseline), from the whole unmasked image.
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import data
from mae_jax.train import pretrained, program, sharding

KINDS = ("cls", "avg", "pixels")


def features_of(params, images_BHWC, *, model, kind, mean, std):
  """uint8 images (B, H, W, C) -> float32 features (B, D)."""
  x = data.normalize(images_BHWC, mean, std)
  if kind == "pixels":
    return x.reshape(x.shape[0], -1)
  tokens_BTD = model.apply({"params": params}, x, method=model.encode).astype(jnp.float32)
  return tokens_BTD[:, 0] if kind == "cls" else tokens_BTD[:, 1:].mean(axis=1)


@functools.lru_cache(maxsize=32)
def compile_features(model, kind, mean, std, mesh):
  """features_of jitted once per (model, kind, stats, mesh) for both splits and every kNN
  monitor call: the params in their training layout, the batch split over the mesh."""
  fn = functools.partial(features_of, model=model, kind=kind, mean=mean, std=std)
  params_sharding = jax.tree.map(lambda a: a.sharding, pretrained.abstract_params(model, mesh))
  return program.jit(fn, mesh, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                     out_shardings=sharding.batch_sharding(mesh))


def extract(params, source, *, model, kind, mesh, image_size, batch_size, log=print,
            what="features", log_every=20):
  """(features float32 (N, D), labels int32 (N,)) of every example of `source`, in order,
  in global batches of `batch_size`; params in their training layout on `mesh` (as
  pretrained.load(..., mesh) and the trainer give them)."""
  fn = compile_features(model, kind, tuple(source.mean), tuple(source.std), mesh)
  batches = data.make_eval_batches(source, image_size=image_size, batch_size=batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  num_batches = -(-len(source) // batch_size)
  fetched, pending = [], None  # host (features, labels, valid) per batch; one batch behind
  t0 = time.perf_counter()
  for i, batch in enumerate(batches):
    b = sharding.global_batch(batch, mesh)
    previous, pending = pending, (fn(params, b["image"]), b["label"], b["valid"])
    if previous is not None:
      fetched.append(tuple(map(sharding.to_host, previous)))
    if (i + 1) % log_every == 0 or i + 1 == num_batches:
      rate = (i + 1) * batch_size / (time.perf_counter() - t0)
      log(f"{what}: batch {i + 1}/{num_batches}  {rate:.0f} img/s")
  fetched.append(tuple(map(sharding.to_host, pending)))
  feats, labels, valid = (np.concatenate(x) for x in zip(*fetched))
  return feats[valid], labels[valid].astype(np.int32)


def row_batches(arrays, batch_size, mesh):
  """Global batches of `batch_size` rows of `arrays` ({name: (M, ...)}, the same on every
  process) in order, split over the mesh; 'valid' marks real rows (padding repeats row 0)."""
  n = len(next(iter(arrays.values())))
  part = data.ProcessSlice.of_this_process(batch_size).local
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    valid = rows < n
    rows = np.where(valid, rows, 0)[part]
    yield sharding.global_batch({**{k: a[rows] for k, a in arrays.items()},
                                 "valid": valid[part]}, mesh)
