"""A folder of images: root/<split>/<class>/*, root/<class>/*, or flat files (label -1);
without a test folder a test split is held out. Bad files (docs/reliability.md): unopenable
ones are left out when listed, one that fails to decode is replaced by the next that decodes
(a batch stays a function of its step); both counted in `skipped`, unless data.strict."""
import functools
import os
import threading

from absl import logging

from mae_jax import paths as paths_lib
from mae_jax.data import source as source_lib
from mae_jax.data.source import DatasetError, EncodedSource

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "validation")}


class FolderSource(EncodedSource):
  """Image files decoded with PIL: paths (N,) and labels (N,)."""

  def __init__(self, paths: list[str], labels: list[int], *, strict: bool = False,
               skipped: dict | None = None, **kwargs):
    super().__init__(**kwargs)
    self.paths, self.labels, self.strict = paths, labels, strict
    self.skipped = dict(skipped or {})  # path -> why; grows as files fail to decode
    self.listed_unreadable = len(self.skipped)  # left out of `paths` while listing
    self._lock = threading.Lock()

  def __getstate__(self):  # worker processes get a copy without the lock
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def __len__(self) -> int:
    return len(self.paths)

  def encoded(self, index):
    path = self.paths[index]  # PIL opens a local path itself; an object on gs:// is read whole
    return (paths_lib.resolve(path).read_bytes() if paths_lib.is_gcs(path) else path,
            self.labels[index], path)

  def get(self, index):
    """Image `index` as uint8 (H, W, channels), or the next one that decodes."""
    return self.first_decodable(index, super().get)

  def decoded(self, index, *args):
    """Image `index` decoded for its crops, or the next one that decodes."""
    return self.first_decodable(index, lambda i: super(FolderSource, self).decoded(i, *args))

  def first_decodable(self, index, read):
    """read(i) for the first i from `index` on (wrapping) whose file decodes."""
    for offset in range(len(self)):
      i = (index + offset) % len(self)
      if self.paths[i] in self.skipped:
        continue
      try:
        return read(i)
      except DatasetError as e:
        if self.strict:
          raise DatasetError(f"{e} (data.strict=True)") from e
        self.skip(self.paths[i], str(e).split(": ", 1)[-1])
    raise DatasetError(f"none of the {len(self)} images ({self.paths[0]}, ...) can be decoded")

  def skip(self, path: str, reason: str) -> None:
    with self._lock:
      if path in self.skipped:
        return
      self.skipped[path] = reason
      count = len(self.skipped)
    logging.warning("%s: skipped (%s); %d unreadable image(s) skipped so far", path, reason, count)


def unreadable(path: str) -> str | None:
  """Why the file at `path` cannot be an image without decoding it (None: it may be)."""
  if paths_lib.is_gcs(path):
    return None  # not stat'ed object by object: a bad one fails to decode instead
  try:
    if os.stat(path).st_size == 0:
      return "empty file (0 bytes)"
  except OSError as e:
    return e.strerror or type(e).__name__  # e.g. a broken symbolic link
  if not os.access(path, os.R_OK):
    return "permission denied"
  return None


def is_image(name: str) -> bool:
  return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def images_under(directory: str) -> list[str]:
  """All image files below `directory` (recursively), sorted for a stable order."""
  if paths_lib.is_gcs(directory):
    return sorted(paths_lib.join(directory, rel) for rel in paths_lib.walk_files(directory)
                  if is_image(os.path.basename(rel)))
  return sorted(os.path.join(d, f) for d, _, files in os.walk(directory, followlinks=True)
                for f in files if is_image(f))


def split_dir(root: str, split: str) -> tuple[str, bool]:
  """(the folder that holds `split`, whether the split is a hold-out of it): root/test (or
  val, validation) for test, else root/train or, without split folders, root, held out."""
  test_folders = [d for d in SPLIT_DIRS["test"] if paths_lib.isdir(paths_lib.join(root, d))]
  if split == "test" and test_folders:
    return paths_lib.join(root, test_folders[0]), False
  if paths_lib.isdir(paths_lib.join(root, "train")):
    return paths_lib.join(root, "train"), not test_folders
  if not test_folders:
    return root, True
  raise DatasetError(f"data.data_dir={root}: has split folders {test_folders} but none "
                     f"for {split!r} (expected one of {list(SPLIT_DIRS[split])})")


def list_examples(directory: str) -> tuple[list[str], list[int], int | None]:
  """(paths, labels, num_classes): class folders where there are any, else flat files."""
  subdirs = sorted(d for d in paths_lib.listdir(directory)
                   if paths_lib.isdir(paths_lib.join(directory, d)))
  per_class = [files for files in (images_under(paths_lib.join(directory, d)) for d in subdirs)
               if files]  # class folders holding no image are not classes
  if not per_class:
    paths = sorted(paths_lib.join(directory, f) for f in paths_lib.listdir(directory)
                   if is_image(f))
    return paths, [-1] * len(paths), None
  labels = [label for label, files in enumerate(per_class) for _ in files]
  return [p for files in per_class for p in files], labels, len(per_class)


def load_folder(data_config, split: str) -> FolderSource:
  """The images of `split` under data.data_dir."""
  root = data_config.data_dir
  try:
    is_dir = bool(root) and paths_lib.isdir(root)
  except paths_lib.PathError as e:
    raise DatasetError(f"data.data_dir={root}: {str(e).split(': ', 1)[-1]}") from None
  if not is_dir:
    raise DatasetError(f"data.data_dir={root}: not a directory (data.name='folder' needs the "
                       "root of an image folder: root/<split>/<class>/*.jpg or root/<class>/*)")
  directory, held_out = split_dir(root, split)
  paths, labels, num_classes = list_examples(directory)
  if not paths:
    raise DatasetError(f"data.data_dir={root}: no images ({', '.join(EXTENSIONS)}) in "
                       f"{directory} or its class folders")
  note = None
  if held_out:
    keep, note = source_lib.holdout(len(paths), split, directory)
    paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
  strict = bool(data_config.get("strict", False))
  paths, labels, skipped = drop_unreadable(paths, labels, strict)
  if not paths:
    raise DatasetError(f"data.data_dir={root}: none of the {len(skipped)} image files in "
                       f"{directory} can be read (e.g. {next(iter(skipped.items()))})")
  train = None if split == "train" else functools.partial(load_folder, data_config, "train")
  return FolderSource(paths, labels, strict=strict, skipped=skipped, note=note,
                      channels=data_config.channels, num_classes=num_classes,
                      stats_source=train, draft=bool(data_config.get("jpeg_draft", True)))


def drop_unreadable(paths, labels, strict):
  """(paths, labels, {path: reason}) without the files that cannot be opened."""
  reasons = {p: r for p in paths if (r := unreadable(p)) is not None}
  if reasons and strict:
    path, reason = next(iter(reasons.items()))
    raise DatasetError(f"{path}: cannot read image: {reason} (data.strict=True)")
  if reasons:
    logging.warning("skipping %d of %d image files that cannot be read, e.g. %s (%s)",
                    len(reasons), len(paths), *next(iter(reasons.items())))
  kept = [(p, label) for p, label in zip(paths, labels) if p not in reasons]
  return [p for p, _ in kept], [label for _, label in kept], reasons
