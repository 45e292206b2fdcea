"""Host batches: training (infinite, resumable, augmented) and evaluation (one padded pass).

The global batch of step s is a pure function of (seed, s): slice b of epoch e's permutation
(seeded by (seed, e)), row k augmented by draws seeded by (seed, s), process p taking rows
[p*L, (p+1)*L); so a resumed run, or any process or worker count, gives the same batches.
repeat_samples = r: G // r examples, each on r neighbouring rows with their own draws."""
import dataclasses
import functools
import sys
from typing import Iterator

from absl import flags
import grain
import numpy as np

from mae_jax.data import augment as augment_lib
from mae_jax.data.source import DatasetError, Source, evenly_spaced

ORDER_STREAM, AUGMENT_STREAM = 0, 1  # keep the two seed streams apart
PAD_LABEL = -1  # label of eval padding (its 'valid' is False)
RESIZE = ("host", "device")  # data.resize: crops resized by Pillow here, or by device_resize


@dataclasses.dataclass(frozen=True)
class ProcessSlice:
  """This process's contiguous part of every global batch of global_batch_size."""
  global_batch_size: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    g, p, n = self.global_batch_size, self.process_index, self.process_count
    if not (isinstance(g, int) and g > 0 and n > 0 and g % n == 0):
      raise ValueError(f"batch size {g} must be a positive multiple of process_count={n}")
    if not 0 <= p < n:
      raise ValueError(f"process_index={p} must be in [0, process_count={n})")

  @property
  def local(self) -> slice:
    size = self.global_batch_size // self.process_count
    return slice(self.process_index * size, (self.process_index + 1) * size)

  @classmethod
  def of_this_process(cls, global_batch_size: int) -> "ProcessSlice":
    """The part of the running JAX process (jax.process_index of jax.process_count)."""
    import jax  # pylint: disable=import-outside-toplevel (the pipeline itself needs no JAX)
    return cls(global_batch_size, jax.process_index(), jax.process_count())


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order (num_examples,) of the examples in `epoch`: a permutation seeded by it."""
  return np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(num_examples)


def global_indices(seed: int, step: int, num_examples: int, global_batch_size: int,
                   repeat_samples: int = 1):
  """The example indices (G,) of the global batch of `step` (the epoch's remainder dropped):
  G // repeat_samples distinct examples, each repeated on repeat_samples neighbouring rows."""
  distinct = global_batch_size // repeat_samples
  epoch, b = divmod(step, num_examples // distinct)
  order = epoch_order(seed, epoch, num_examples)[b * distinct:(b + 1) * distinct]
  return np.repeat(order, repeat_samples)


def augment_draws(seed: int, step: int, global_batch_size: int) -> np.ndarray:
  """Uniform draws (G, NUM_DRAWS) for step `step`; row k augments global example k."""
  rng = np.random.default_rng([seed, AUGMENT_STREAM, step])
  return rng.random((global_batch_size, augment_lib.NUM_DRAWS))


def train_batch(step: int, *, source: Source, part: ProcessSlice, seed: int, image_size: int,
                augment: augment_lib.Augment, crop_scale, repeat_samples: int = 1,
                resize: str = "host") -> dict:
  """This process's part of the global batch of `step`: image uint8 (L, S, S, C), label (L,);
  resize='device': the crops' regions (device_resize.KEYS) instead of 'image'."""
  g = part.global_batch_size
  indices = global_indices(seed, step, len(source), g, repeat_samples)[part.local]
  draws = augment_draws(seed, step, g)[part.local]
  if resize == "device":
    regions, labels = source.region_batch(indices, draws, augment, image_size, crop_scale)
    return {**regions, "label": labels}
  images, labels = source.crop_batch(indices, draws, augment, image_size, crop_scale)
  return {"image": images, "label": labels}


def check_train_args(source, image_size, global_batch_size, augment, crop_scale, start_step,
                     num_workers, repeat_samples=1, worker_processes=0, resize="host") -> None:
  """One clear line for each bad argument, before any work starts."""
  if augment not in augment_lib.AUGMENTS:
    raise DatasetError(f"data.augment={augment!r}: expected one of "
                       f"{', '.join(augment_lib.AUGMENTS)}")
  if resize not in RESIZE:
    raise DatasetError(f"data.resize={resize!r}: expected one of {', '.join(RESIZE)}")
  lo, hi = crop_scale
  if not 0 < lo <= hi <= 1:
    raise DatasetError(f"data.crop_scale={tuple(crop_scale)}: must satisfy 0 < min <= max <= 1")
  if not (isinstance(image_size, int) and image_size > 0):
    raise DatasetError(f"data.image_size={image_size!r}: must be a positive int")
  if not (isinstance(repeat_samples, int) and repeat_samples >= 1
          and global_batch_size % repeat_samples == 0):
    raise DatasetError(f"data.repeat_samples={repeat_samples!r}: must be a positive int "
                       f"dividing batch_size={global_batch_size}")
  if len(source) < global_batch_size // repeat_samples:
    raise DatasetError(f"batch_size={global_batch_size} is larger than the {len(source)} "
                       "training examples (an epoch would have no full batch)")
  if min(start_step, num_workers, worker_processes) < 0:
    raise ValueError(f"start_step={start_step}, num_workers={num_workers} and "
                     f"worker_processes={worker_processes} must be >= 0")


def iterate(steps: grain.MapDataset, num_workers: int, worker_processes: int = 0) -> Iterator[dict]:
  """Iterate in order: num_workers threads make batches ahead (PIL decodes without the GIL;
  0: in the calling thread), in worker_processes processes each (0: in this one)."""
  options = grain.ReadOptions(num_threads=num_workers, prefetch_buffer_size=2 * num_workers)
  dataset = steps.to_iter_dataset(options)
  if worker_processes > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults will do)
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_processes,
                                                               per_worker_buffer_size=2))
  return iter(dataset)


def make_train_batches(source: Source, *, image_size: int, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1,
                       augment: str = "crop_flip", crop_scale=(0.2, 1.0), start_step: int = 0,
                       num_workers: int = 0, repeat_samples: int = 1,
                       worker_processes: int = 0, resize: str = "host") -> Iterator[dict]:
  """Infinite iterator of this process's batches from step start_step on: {'image': uint8
  (G // process_count, S, S, C), 'label': int32 (G // process_count,)}; resize='device':
  regions instead of 'image', which device_resize.crops_of makes on the accelerator."""
  check_train_args(source, image_size, global_batch_size, augment, crop_scale, start_step,
                   num_workers, repeat_samples, worker_processes, resize)
  part = ProcessSlice(global_batch_size, process_index, process_count)
  make = functools.partial(train_batch, source=source, part=part, seed=int(seed) % 2**64,
                           image_size=image_size, augment=augment_lib.AUGMENTS[augment],
                           crop_scale=tuple(crop_scale), repeat_samples=repeat_samples,
                           resize=resize)
  return iterate(grain.MapDataset.range(start_step, sys.maxsize).map(make), num_workers,
                 worker_processes)


def array_batches(arrays: dict, global_batch_size: int, seed: int, start_step: int = 0
                  ) -> Iterator[dict]:
  """Batches {name: rows} of in-memory arrays (a dict of (N, ...) numpy arrays, the same
  rows of each) for steps start_step + 1, ...: epoch e takes a permutation seeded by
  (seed, e), the remainder dropped; this process's part of each global batch."""
  n = len(next(iter(arrays.values())))
  part = ProcessSlice.of_this_process(global_batch_size).local
  for index in range(start_step, sys.maxsize):  # batch `index` feeds step index + 1
    epoch, b = divmod(index, n // global_batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    rows = order[b * global_batch_size:(b + 1) * global_batch_size][part]
    yield {name: array[rows] for name, array in arrays.items()}


def eval_batch(b: int, *, source: Source, part: ProcessSlice, image_size: int) -> dict:
  """Global batch b = examples [b*G, (b+1)*G), padded past the end; this process's part."""
  g = part.global_batch_size
  positions = np.arange(b * g, (b + 1) * g)[part.local]
  valid = positions < len(source)
  images, labels = source.batch(positions[valid])
  out = {"image": np.zeros((len(positions), image_size, image_size, source.channels), np.uint8),
         "label": np.full(len(positions), PAD_LABEL, np.int32), "valid": valid}
  if len(images):
    out["image"][valid] = augment_lib.augment_batch(images, None, augment_lib.AUGMENTS["none"],
                                                    image_size, None)
    out["label"][valid] = labels
  return out


def make_eval_batches(source: Source, *, image_size: int, batch_size: int, process_index: int = 0,
                      process_count: int = 1, num_workers: int = 0) -> Iterator[dict]:
  """One in-order pass: {'image': uint8 (B, S, S, C), 'label': int32 (B,), 'valid': bool (B,)},
  B = batch_size // process_count; the last global batch padded (valid False there)."""
  part = ProcessSlice(batch_size, process_index, process_count)
  num_batches = -(-len(source) // batch_size)
  make = functools.partial(eval_batch, source=source, part=part, image_size=image_size)
  return iterate(grain.MapDataset.range(num_batches).map(make), num_workers)


def per_pixel_mean(source: Source, image_size: int, max_examples: int | None = None,
                   chunk: int = 1024) -> np.ndarray:
  """The mean image float32 (S, S, C) on [0, 1] over (up to max_examples evenly spaced)
  deterministically resized examples: the reconstruction baseline that ignores the input."""
  indices = evenly_spaced(len(source), max_examples)
  if len(indices) == 0:
    raise DatasetError("per_pixel_mean of an empty split")
  total = np.zeros((image_size, image_size, source.channels), np.float64)
  for start in range(0, len(indices), chunk):
    images, _ = source.batch(indices[start:start + chunk])
    total += augment_lib.augment_batch(images, None, augment_lib.AUGMENTS["none"], image_size,
                                       None).sum(0, dtype=np.float64)
  return (total / (255.0 * len(indices))).astype(np.float32)
