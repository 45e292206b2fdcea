"""Deterministic random images, for throughput benchmarks (nothing to learn in them)."""
import numpy as np

from mae_jax.data.source import DatasetError, Source

SPLIT_SEEDS = {"train": 0, "test": 1}  # fixed: the same config always gives the same data
NUM_CLASSES = 10
DEFAULT_SIZE = 32  # image side where the config has no data.image_size


class SyntheticSource(Source):
  """`size` uint8 images (side, side, channels), each generated from (split seed, index)."""

  def __init__(self, size: int, side: int, split_seed: int, **kwargs):
    super().__init__(**kwargs)
    self.size, self.side, self.split_seed = size, side, split_seed

  def __len__(self) -> int:
    return self.size

  def get(self, index):
    rng = np.random.default_rng([self.split_seed, index])
    label = int(rng.integers(NUM_CLASSES))
    image = rng.integers(0, 256, (self.side, self.side, self.channels), np.uint8)
    return image, label


def load_synthetic(data_config, split: str) -> SyntheticSource:
  """data.synthetic_size images of data.image_size (so no resize is needed)."""
  size = data_config.get("synthetic_size", 0)
  if not isinstance(size, int) or size <= 0:
    raise DatasetError(f"data.synthetic_size={size!r}: must be a positive int")
  side = data_config.get("image_size") or DEFAULT_SIZE
  return SyntheticSource(size, side, SPLIT_SEEDS[split], channels=data_config.channels,
                         num_classes=NUM_CLASSES)
