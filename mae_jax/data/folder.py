"""A folder of images: root/<split>/<class>/*, root/<class>/*, or flat files.

Labels are the index of the class folder in sorted order (-1 for flat files). Images are
decoded with PIL lazily, one per `source[i]`, so worker threads decode in parallel.
"""
import functools
import os

import numpy as np
from PIL import Image

from mae_jax.data.source import DatasetError, Source

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "validation")}
PIL_MODES = {1: "L", 3: "RGB"}  # data.channels -> PIL mode decoded to


class FolderSource(Source):
  """Image files decoded with PIL: paths (N,) and labels (N,)."""

  def __init__(self, paths: list[str], labels: list[int], **kwargs):
    super().__init__(**kwargs)
    self.paths = paths
    self.labels = labels

  def __len__(self) -> int:
    return len(self.paths)

  def get(self, index):
    path = self.paths[index]
    try:
      with Image.open(path) as image:
        array = np.asarray(image.convert(PIL_MODES[self.channels]))
    except OSError as e:
      raise DatasetError(f"{path}: cannot decode image: {e}") from e
    return (array[..., None] if array.ndim == 2 else array), self.labels[index]


def is_image(name: str) -> bool:
  return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def images_under(directory: str) -> list[str]:
  """All image files below `directory` (recursively), sorted for a stable order."""
  found = [os.path.join(d, f) for d, _, files in os.walk(directory, followlinks=True)
           for f in files if is_image(f)]
  return sorted(found)


def split_dir(root: str, split: str) -> str:
  """root/<split> (test: test, val or validation) where the root has split folders, else root."""
  split_folders = [d for names in SPLIT_DIRS.values() for d in names
                   if os.path.isdir(os.path.join(root, d))]
  if not split_folders:
    return root  # no split folders: train and test are the same images
  for name in SPLIT_DIRS[split]:
    if name in split_folders:
      return os.path.join(root, name)
  raise DatasetError(f"data.data_dir={root}: has split folders {split_folders} but none "
                     f"for {split!r} (expected one of {list(SPLIT_DIRS[split])})")


def list_examples(directory: str) -> tuple[list[str], list[int], int | None]:
  """(paths, labels, num_classes): class folders where there are any, else flat files."""
  subdirs = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
  per_class = [files for files in (images_under(os.path.join(directory, d)) for d in subdirs)
               if files]  # class folders holding no image are not classes
  if not per_class:
    paths = sorted(os.path.join(directory, f) for f in os.listdir(directory) if is_image(f))
    return paths, [-1] * len(paths), None
  pairs = [(p, label) for label, files in enumerate(per_class) for p in files]
  return [p for p, _ in pairs], [label for _, label in pairs], len(per_class)


def load_folder(data_config, split: str) -> FolderSource:
  """The images of `split` under data.data_dir."""
  root = data_config.data_dir
  if not root or not os.path.isdir(root):
    raise DatasetError(f"data.data_dir={root}: not a directory (data.name='folder' needs the "
                       "root of an image folder: root/<split>/<class>/*.jpg or root/<class>/*)")
  directory = split_dir(root, split)
  paths, labels, num_classes = list_examples(directory)
  if not paths:
    raise DatasetError(f"data.data_dir={root}: no images ({', '.join(EXTENSIONS)}) in "
                       f"{directory} or its class folders")
  train = None if split == "train" else functools.partial(load_folder, data_config, "train")
  return FolderSource(paths, labels, channels=data_config.channels, num_classes=num_classes,
                      stats_source=train)
