"""Random-access sources: one split, `source[i] -> {'image': uint8 (H, W, C), 'label': int}`
(-1: no label), with `num_classes` and per-channel `mean`, `std` on [0, 1] pixels."""
from typing import Callable

import numpy as np

from mae_jax.data import augment as augment_lib, decode as decode_lib, device_resize
from mae_jax.data.errors import DatasetError  # pylint: disable=unused-import (re-exported)

# Normalisation stats in each dataset's own channels, on [0, 1] pixels: (mean, std).
KNOWN_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
STATS_EXAMPLES = 2000  # images averaged where a dataset's stats are not known
SPLITS = ("train", "test")
# A dataset with no test split holds out every 10th training example (at most 10,000).
HOLDOUT_EVERY = 10
HOLDOUT_MAX = 10_000


class Source:
  """Base of all sources: subclasses define __len__ and get(i) -> (image_HWC, label). Stats
  are `known_stats`, else estimated on first use from `stats_source()` (the training split;
  None: this source). `note`: how the split was made, e.g. a held-out test split."""

  def __init__(self, *, channels: int, num_classes: int | None, known_stats: tuple | None = None,
               stats_source: Callable[[], "Source"] | None = None, note: str | None = None):
    self.channels, self.num_classes = channels, num_classes
    self._stats = known_stats
    self._stats_source = stats_source
    self.note = note

  def __len__(self) -> int:
    raise NotImplementedError

  def get(self, index: int) -> tuple[np.ndarray, int]:
    raise NotImplementedError

  def batch(self, indices) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray]:
    """Images of `indices` (a list of uint8 (H, W, C), or one array) and labels int32 (B,)."""
    examples = [self.get(int(i)) for i in indices]
    labels = np.array([label for _, label in examples], np.int32).reshape(len(examples))
    return [image for image, _ in examples], labels

  def crop_batch(self, indices, draws_BD, augment, image_size: int, crop_scale) -> np.ndarray:
    """Training crops uint8 (B, S, S, C) of `indices`, row k cropped by draws_BD[k]."""
    images, labels = self.batch(indices)
    return augment_lib.augment_batch(images, draws_BD, augment, image_size, crop_scale), labels

  def decoded(self, index: int, draws_KD, augment, image_size, crop_scale):
    """(image uint8 (h, w, C), boxes (K, 4) in its pixels, label) of example `index`, K crops."""
    image, label = self.get(index)
    boxes = decode_lib.crop_boxes(*image.shape[:2], draws_KD, augment, image_size, crop_scale)
    return image, boxes, label

  def decoded_runs(self, indices, draws_BD, augment, image_size, crop_scale):
    """(rows, image, boxes, label) per run of equal indices (repeated samples): one decode."""
    for start, stop in decode_lib.runs(indices):
      draws = None if draws_BD is None else draws_BD[start:stop]
      yield (slice(start, stop),
             *self.decoded(int(indices[start]), draws, augment, image_size, crop_scale))

  def region_batch(self, indices, draws_BD, augment, image_size: int, crop_scale):
    """data.resize='device': crop_batch's crops as device_resize regions, labels int32 (B,)."""
    indices = np.asarray(indices, np.int64)
    out = device_resize.regions_batch(len(indices), image_size, self.channels)
    labels = np.zeros(len(indices), np.int32)
    for rows, image, boxes, label in self.decoded_runs(indices, draws_BD, augment, image_size,
                                                       crop_scale):
      labels[rows] = label
      out["box"][rows], out["extent"][rows] = device_resize.cut_regions(
          image, boxes, image_size, out["region"][rows])
    out["flip"] = augment_lib.flips(draws_BD, augment, len(indices))
    return out, labels

  def __getitem__(self, index: int) -> dict:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for a source of {len(self)} examples")
    image, label = self.get(int(index) % len(self))
    return {"image": image, "label": label}

  mean = property(lambda self: self.stats()[0])
  std = property(lambda self: self.stats()[1])

  def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel, estimated once on first use where not known."""
    if self._stats is None:
      self._stats = estimate_stats(self._stats_source() if self._stats_source else self)
    return self._stats


class ArraySource(Source):
  """An in-memory split: images uint8 (N, H, W, C) already in the output channels."""

  def __init__(self, images_NHWC: np.ndarray, labels_N: np.ndarray, **kwargs):
    super().__init__(**kwargs)
    if images_NHWC.dtype != np.uint8 or images_NHWC.ndim != 4:
      raise DatasetError(f"in-memory images must be uint8 (N, H, W, C), got "
                         f"{images_NHWC.dtype} {images_NHWC.shape}")
    if len(labels_N) != len(images_NHWC):
      raise DatasetError(f"{len(images_NHWC)} images but {len(labels_N)} labels")
    self.images, self.labels = images_NHWC, np.asarray(labels_N, np.int64)

  def __len__(self) -> int:
    return len(self.images)

  def get(self, index):
    return self.images[index], int(self.labels[index])

  def batch(self, indices):
    indices = np.asarray(indices, np.int64)
    return self.images[indices], self.labels[indices].astype(np.int32)


class Subset(Source):
  """`count` evenly spaced examples of `base`, or those at `indices`, with the base's stats."""

  def __init__(self, base: Source, count: int | None = None, indices=None, note: str | None = None):
    super().__init__(channels=base.channels, num_classes=base.num_classes, known_stats=base._stats,
                     stats_source=lambda: base, note=note or base.note)
    self.base = base
    self.indices = evenly_spaced(len(base), count) if indices is None else np.asarray(
        indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def get(self, index):
    return self.base.get(int(self.indices[index]))

  def batch(self, indices):
    return self.base.batch(self.indices[np.asarray(indices, np.int64)])

  def crop_batch(self, indices, *args):
    return self.base.crop_batch(self.indices[np.asarray(indices, np.int64)], *args)

  def region_batch(self, indices, *args):
    return self.base.region_batch(self.indices[np.asarray(indices, np.int64)], *args)


class EncodedSource(Source):
  """Encoded images: subclasses define __len__ and encoded(i) -> (path or bytes, label, name
  for messages). Crops decode only what they need; `draft` allows JPEG DCT downscaling."""

  def __init__(self, *, draft: bool = True, **kwargs):
    super().__init__(**kwargs)
    self.draft = draft

  def encoded(self, index: int):
    raise NotImplementedError

  def get(self, index):
    encoded, label, name = self.encoded(index)
    return decode_lib.decode(encoded, self.channels, name), label

  def decoded(self, index, draws_KD, augment, image_size, crop_scale):
    encoded, label, name = self.encoded(index)
    array, boxes = decode_lib.decode_for_boxes(encoded, draws_KD, augment, image_size,
                                               crop_scale, self.channels, self.draft, name)
    return array, boxes, label

  def crop_batch(self, indices, draws_BD, augment, image_size, crop_scale):
    indices = np.asarray(indices, np.int64)
    out = np.zeros((len(indices), image_size, image_size, self.channels), np.uint8)
    labels = np.zeros(len(indices), np.int32)
    for rows, array, boxes, label in self.decoded_runs(indices, draws_BD, augment, image_size,
                                                       crop_scale):
      out[rows], labels[rows] = augment_lib.resize_boxes(array, boxes, image_size), label
    return augment_lib.mirror(out, draws_BD, augment), labels


def read_error(where: str, error: Exception, width: int = 300) -> DatasetError:
  """One line instead of a traceback for data on gs:// that cannot be read."""
  reason = " ".join(str(error).split())[:width]
  return DatasetError(f"{where}: cannot read it ({type(error).__name__}: {reason}); check "
                      "the bucket, the credentials and the network")


def read_record(records, index: int, where: str, remote: bool):
  """records[index]; on gs:// (`remote`), a record ArrayRecord could not read after its own
  retries (up to 15 minutes, not MAE_JAX_GCS_TIMEOUT_S) is one DatasetError naming it."""
  try:
    return records[index]
  except RuntimeError as e:  # how ArrayRecord's reader reports every failure
    if not remote:
      raise
    raise read_error(f"{where} record {index}", e) from None


def convert_channels(image_HWC: np.ndarray, channels: int) -> np.ndarray:
  """uint8 (..., H, W, c) -> (..., H, W, channels): alpha dropped, gray <-> RGB as PIL does."""
  c = image_HWC.shape[-1]
  if c in (2, 4):  # LA / RGBA: drop alpha, as PIL's convert does
    image_HWC, c = image_HWC[..., :c - 1], c - 1
  if c == channels:
    return image_HWC
  if c == 1 and channels == 3:
    return np.repeat(image_HWC, 3, axis=-1)
  if c == 3 and channels == 1:  # ITU-R 601-2 luma, PIL's fixed-point formula
    rgb = image_HWC.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]
  raise DatasetError(f"cannot convert {image_HWC.shape[-1]}-channel images to {channels} "
                     "channels (data.channels must be 1 or 3)")


def stats_for(name: str, channels: int) -> tuple | None:
  """Known (mean, std) of `name` in `channels` channels, or None (to be estimated)."""
  if name not in KNOWN_STATS:
    return None
  mean, std = KNOWN_STATS[name]
  if len(mean) == channels:
    return mean, std
  if len(mean) == 1:  # a gray image repeated to RGB has the same stats in every channel
    return mean * channels, std * channels
  return None  # RGB -> gray: the std is not a function of the RGB stats; estimate it


def holdout(n: int, split: str, where: str) -> tuple[np.ndarray, str]:
  """(indices of `split`, a note saying so) where the test split is held out of n training
  examples: every HOLDOUT_EVERY-th (at most HOLDOUT_MAX) is test; `where` names the data."""
  if n < 2:
    raise DatasetError(f"{where}: {n} image(s); a dataset without a test split needs at "
                       "least 2, one to hold out for the test split")
  test = evenly_spaced(n, min(max(1, n // HOLDOUT_EVERY), HOLDOUT_MAX))
  indices = test if split == "test" else np.setdiff1d(np.arange(n), test)
  note = (f"{where} has no test split: {len(test)} of its {n} images (evenly spaced) are "
          "held out as the test split (test MSE, reconstructions) and not trained on")
  return indices, note


def evenly_spaced(n: int, count: int | None) -> np.ndarray:
  """min(n, count) indices spread evenly over range(n) (all of them where count is None)."""
  count = n if count is None else min(n, count)
  return np.arange(count, dtype=np.int64) * n // max(count, 1)


def estimate_stats(source: Source, count: int = STATS_EXAMPLES):
  """Per-channel mean and std over all pixels of up to `count` evenly spaced images."""
  if len(source) == 0:
    raise DatasetError("cannot estimate normalisation stats of an empty split")
  sums, squares, pixels = np.zeros(source.channels), np.zeros(source.channels), 0
  for i in evenly_spaced(len(source), count):
    image = source[int(i)]["image"].reshape(-1, source.channels).astype(np.float64) / 255.0
    sums += image.sum(0)
    squares += np.square(image).sum(0)
    pixels += len(image)
  mean = sums / pixels
  std = np.sqrt(np.maximum(squares / pixels - mean**2, 0.0))
  std = np.maximum(std, 1 / 255)  # a constant channel must not divide by zero
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)
