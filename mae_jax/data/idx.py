"""Fashion-MNIST from IDX files (Debian package dataset-fashion-mnist), else TFDS."""
import gzip
import os

import numpy as np

from mae_jax.data import tfds_source
from mae_jax.data.source import ArraySource, DatasetError, convert_channels, stats_for

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {  # split -> (images, labels) IDX file names, each possibly gzipped
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """An IDX file (plain or gzipped) as a numpy array of the shape its header gives."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES:
    raise DatasetError(f"{path}: not an IDX file (header {raw[:4]!r}; expected 00 00 "
                       f"<type code in {sorted(IDX_DTYPES)}> <ndim>)")
  dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  offset = 4 + 4 * ndim
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - offset != expected:
    raise DatasetError(f"{path}: header says shape {shape} ({expected} bytes of data), "
                       f"file has {len(raw) - offset}")
  return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx(directory: str, name: str) -> str | None:
  """directory/name or directory/name.gz, whichever exists."""
  path = os.path.join(directory, name)
  return next((p for p in (path, path + ".gz") if os.path.isfile(p)), None)


def load_idx_split(directory: str, split: str, channels: int) -> ArraySource:
  """One Fashion-MNIST split from IDX files: images (N, 28, 28, channels) and labels."""
  image_path, label_path = (find_idx(directory, name) for name in FILES[split])
  images, labels = read_idx(image_path), read_idx(label_path)
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise DatasetError(f"{image_path}, {label_path}: expected images (N, H, W) and labels (N,), "
                       f"got {images.shape} and {labels.shape}")
  return ArraySource(convert_channels(images.astype(np.uint8)[..., None], channels), labels,
                     channels=channels, num_classes=10,
                     known_stats=stats_for("fashion_mnist", channels))


def has_idx_files(directory: str) -> bool:
  return all(find_idx(directory, n) for names in FILES.values() for n in names)


def load_fashion_mnist(data_config, split: str) -> ArraySource:
  """IDX files in data.data_dir (default the Debian package's), else TFDS fashion_mnist."""
  directory = data_config.data_dir or DEFAULT_DIR
  if has_idx_files(directory):
    return load_idx_split(directory, split, data_config.channels)
  try:
    return tfds_source.load_tfds(data_config, split, name="fashion_mnist")
  except DatasetError as tfds_error:
    names = ", ".join(n + "[.gz]" for pair in FILES.values() for n in pair)
    raise DatasetError(
        f"data.data_dir={directory}: no Fashion-MNIST IDX files ({names}); install the Debian "
        f"package (apt-get install dataset-fashion-mnist), point data.data_dir at a directory "
        f"holding them, or prepare TFDS fashion_mnist (`tfds build fashion_mnist "
        f"--file_format=array_record`). TFDS said: {tfds_error}") from None
