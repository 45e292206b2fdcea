"""Any TFDS image dataset read through `tfds.data_source` (array_record files). Reading
needs no TensorFlow; preparing does (`tfds build NAME --file_format=array_record`, once)."""
import functools

import numpy as np

from mae_jax import paths
from mae_jax.data.source import DatasetError, Source, convert_channels, read_record, stats_for

# Our split name -> TFDS split names to try in order (imagenet2012 has no 'test').
SPLIT_CANDIDATES = {"train": ("train",), "test": ("test", "validation")}


class UnknownDatasetError(DatasetError):
  """The name is neither a registered TFDS builder nor a dataset found in data_dir."""


class TfdsSource(Source):
  """One split of a prepared TFDS dataset: examples decoded lazily with PIL."""

  def __init__(self, data_source, image_key: str, label_key: str | None, where: str = "",
               remote: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.data_source, self.image_key, self.label_key = data_source, image_key, label_key
    self.where = where  # names the split in errors
    self.remote = remote  # on gs://: a failed read is one DatasetError

  def __len__(self) -> int:
    return len(self.data_source)

  def get(self, index):
    example = read_record(self.data_source, index, self.where, self.remote)
    image = np.atleast_3d(np.asarray(example[self.image_key], np.uint8))  # (H, W) -> (H, W, 1)
    label = int(example[self.label_key]) if self.label_key else -1
    return convert_channels(image, self.channels), label


def open_builder(name: str, data_dir: str | None):
  """tfds.builder, with one-line errors for unknown names."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UnknownDatasetError(
        f"data.name={name!r}: unknown dataset; no TFDS builder of that name is registered "
        f"or prepared in data.data_dir={data_dir}") from None


def ensure_prepared(builder, name: str, manual_dir: str | None) -> None:
  """Prepare from data.manual_dir where the files are not there yet; else a clear error."""
  if builder.is_prepared():
    return
  where = f"data.data_dir={builder.data_dir_root}"
  if not manual_dir:
    raise DatasetError(
        f"data.name={name!r}: TFDS dataset not prepared in {where}; prepare it with "
        f"`tfds build {name} --file_format=array_record --data_dir=DIR` (needs tensorflow; "
        f"datasets such as imagenet2012 also --manual_dir=DIR) and set data.data_dir=DIR")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(f"data.name={name!r}: preparing in {where} from "
                       f"data.manual_dir={manual_dir} failed: {type(e).__name__}: {e}") from e


def resolve_split(builder, name: str, split: str) -> str:
  """Our 'train'/'test' -> the TFDS split holding it."""
  available = list(builder.info.splits.keys())
  for candidate in SPLIT_CANDIDATES[split]:
    if candidate in available:
      return candidate
  raise DatasetError(f"data.name={name!r}: no split for {split!r} (tried "
                     f"{list(SPLIT_CANDIDATES[split])}); the dataset has {available}")


def feature_keys(features, name: str) -> tuple[str, str | None]:
  """(image key, label key or None): 'image'/'label' where present, else the first of each."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  def first(kind, preferred):
    keys = [k for k, f in features.items() if isinstance(f, kind)]
    return preferred if preferred in keys else (keys[0] if keys else None)
  image_key = first(tfds.features.Image, "image")
  if image_key is None:
    raise DatasetError(f"data.name={name!r}: not an image dataset (features: {list(features)})")
  return image_key, first(tfds.features.ClassLabel, "label")


def load_tfds(data_config, split: str, name: str | None = None) -> TfdsSource:
  """Split `split` of TFDS dataset `name` (default data.name), read with tfds.data_source."""
  name = name or data_config.name
  builder = open_builder(name, data_config.data_dir)
  ensure_prepared(builder, name, data_config.get("manual_dir"))
  tfds_split = resolve_split(builder, name, split)
  image_key, label_key = feature_keys(builder.info.features, name)
  try:
    data_source = builder.as_data_source(split=tfds_split)
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(f"data.name={name!r}: cannot read split {tfds_split!r} with "
                       f"tfds.data_source (is it prepared with --file_format=array_record?): "
                       f"{type(e).__name__}: {e}") from e
  stats = stats_for(name, data_config.channels)
  train = None if stats or split == "train" else functools.partial(
      load_tfds, data_config, "train", name=name)
  num_classes = builder.info.features[label_key].num_classes if label_key else None
  return TfdsSource(data_source, image_key, label_key, known_stats=stats, stats_source=train,
                    where=f"data.name={name!r} split {tfds_split!r} in {data_config.data_dir}",
                    remote=paths.is_gcs(data_config.data_dir or ""),
                    channels=data_config.channels, num_classes=num_classes)
