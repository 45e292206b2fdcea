"""`load_source(data_config, split)`: data.name -> the loader of that kind of source."""
from mae_jax.data import folder, idx, prepared, synthetic, tfds_source
from mae_jax.data.source import DatasetError, SPLITS, Source, Subset

# data.name -> loader(data_config, split); every other name is looked up in TFDS.
LOADERS = {
    "fashion_mnist": idx.load_fashion_mnist,
    "synthetic": synthetic.load_synthetic,
    "folder": folder.load_folder,
    "prepared": prepared.load_prepared,
}
CHANNELS = (1, 3)


def load_source(data_config, split: str) -> Source:
  """The `split` ('train' or 'test') of the dataset data.name, as a random-access Source;
  data.train_examples (None: all) keeps that many evenly spaced training examples."""
  if split not in SPLITS:
    raise DatasetError(f"split={split!r}: expected one of {list(SPLITS)}")
  if data_config.channels not in CHANNELS:
    raise DatasetError(f"data.channels={data_config.channels!r}: expected one of {CHANNELS}")
  name = data_config.name
  loader = LOADERS.get(name, tfds_source.load_tfds)
  limit = data_config.get("train_examples") if split == "train" else None
  if limit is not None and (not isinstance(limit, int) or limit < 1):
    raise DatasetError(f"data.train_examples={limit!r}: expected a positive integer or None")
  try:
    source = loader(data_config, split)
  except tfds_source.UnknownDatasetError as e:
    raise DatasetError(f"data.name={name!r}: unknown dataset; valid: {', '.join(LOADERS)}, "
                       f"or a TFDS dataset name (none of that name is registered or prepared "
                       f"in data.data_dir={data_config.data_dir})") from e
  return source if limit is None else Subset(source, limit)
