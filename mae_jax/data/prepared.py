"""A prepared dataset (`python -m mae_jax.prepare`; docs/reliability.md 6b): ArrayRecord
shards of HEADER + JPEG records in the input's order and `manifest.json`, written last; each
process reads only its records (on gs://, by ArrayRecord's own Cloud Storage reader)."""
import functools
import json
import os
import struct

from mae_jax import paths
from mae_jax.data.source import (DatasetError, EncodedSource, Source, Subset, holdout,
                                 read_error, read_record)

MANIFEST = "manifest.json"
FORMAT = "mae_jax.prepared/1"
# label int32 (-1: none), original (height, width), stored (height, width); then the JPEG.
HEADER = struct.Struct("<iIIII")


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def pack(label: int, original_hw, stored_hw, jpeg: bytes) -> bytes:
  return HEADER.pack(label, *original_hw, *stored_hw) + jpeg


def unpack(record: bytes) -> tuple[int, tuple[int, int], tuple[int, int], bytes]:
  """(label, original (h, w), stored (h, w), JPEG bytes) of one record."""
  label, oh, ow, h, w = HEADER.unpack_from(record)
  return label, (oh, ow), (h, w), record[HEADER.size:]


def read_manifest(root: str) -> dict:
  """The manifest of a complete prepared dataset; DatasetError (one line) otherwise."""
  path = paths.join(root, MANIFEST)
  if not paths.isfile(path):
    started = paths.isdir(root) and any(n.endswith((".array_record", ".done.json"))
                                        for n in paths.listdir(root))
    why = ("half-written prepared dataset (no manifest.json); rerun `python -m mae_jax.prepare`"
           " with the same arguments to finish it" if started else "not a prepared dataset (no "
           "manifest.json); make one with `python -m mae_jax.prepare --out DIR ...`")
    raise DatasetError(f"data.data_dir={root}: {why}")
  try:
    manifest = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise DatasetError(f"{path}: unreadable manifest: {type(e).__name__}: {e}") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise DatasetError(f"{path}: not a {FORMAT} manifest")
  return manifest


def check_shards(root: str, split: str, entry: dict) -> list[str]:
  """The shard paths of `split`, each checked against the manifest's size and record count
  (checksums: `python -m mae_jax.prepare --verify DIR`)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  found, sizes = [], shard_sizes(root)
  for shard in entry["shards"]:
    path = paths.join(root, shard["file"])
    size = sizes(shard["file"])
    if size is None:
      raise DatasetError(f"{path}: shard listed in {MANIFEST} is missing")
    if size != shard["bytes"]:
      raise DatasetError(f"{path}: {size} bytes but {MANIFEST} says {shard['bytes']} "
                         "(shard and manifest do not match)")
    reader = array_record_module.ArrayRecordReader(path)
    count = reader.num_records()
    reader.close()
    if count != shard["num_records"]:
      raise DatasetError(f"{path}: {count} records but {MANIFEST} says "
                         f"{shard['num_records']} (shard and manifest do not match)")
    found.append(path)
  if sum(s["num_records"] for s in entry["shards"]) != entry["num_examples"]:
    raise DatasetError(f"{paths.join(root, MANIFEST)}: split {split!r}: shard record "
                       f"counts do not add up to num_examples={entry['num_examples']}")
  return found


def shard_sizes(root):
  """file name -> its size in bytes, or None where it is missing: on Cloud Storage from one
  listing of `root` (not a request per shard), locally from os.stat."""
  if paths.is_gcs(root):
    return paths.walk_files(root).get
  return lambda name: (os.path.getsize(os.path.join(root, name))
                       if os.path.isfile(os.path.join(root, name)) else None)


class PreparedSource(EncodedSource):
  """One split of a prepared dataset: records read by random access, decoded lazily."""

  def __init__(self, paths: list[str], num_examples: int, name: str, **kwargs):
    super().__init__(**kwargs)
    self.paths, self.num_examples, self.name = paths, num_examples, name
    self._records = None  # opened on first use, so worker processes open their own

  def __getstate__(self):
    return dict(self.__dict__, _records=None)

  def __len__(self) -> int:
    return self.num_examples

  def records(self):
    if self._records is None:
      from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
      self._records = array_record_data_source.ArrayRecordDataSource(self.paths)
    return self._records

  def encoded(self, index):
    record = read_record(self.records(), index, self.name, paths.is_gcs(self.name))
    label, _, _, jpeg = unpack(record)
    return jpeg, label, f"{self.name} record {index}"


def load_prepared(data_config, split: str) -> Source:
  """`split` of the prepared dataset in data.data_dir (test: test/val/validation, else held out)."""
  root = data_config.data_dir
  try:  # on gs://: a prefix with objects below it
    is_dir = bool(root) and _on_gcs_errors(root, paths.isdir, root)
  except paths.PathError as e:
    raise DatasetError(f"data.data_dir={e}") from None
  if not is_dir:
    raise DatasetError(f"data.data_dir={root}: not a directory (data.name='prepared' needs "
                       "the output of `python -m mae_jax.prepare`)")
  manifest = _on_gcs_errors(root, read_manifest, root)
  splits = manifest["splits"]
  test_names = [s for s in ("test", "val", "validation") if s in splits]
  name = test_names[0] if split == "test" and test_names else "train"
  if name not in splits:
    raise DatasetError(f"data.data_dir={root}: no {split!r} split in {MANIFEST} (it has "
                       f"{sorted(splits)})")
  entry = splits[name]
  shard_paths = _on_gcs_errors(root, check_shards, root, name, entry)
  stats = manifest.get("stats") if data_config.channels == 3 else None
  known = (tuple(stats["mean"]), tuple(stats["std"])) if stats else None
  train = None if known or name == "train" else functools.partial(load_prepared, data_config,
                                                                   "train")
  source = PreparedSource(shard_paths, entry["num_examples"], f"{root}/{name}",
                          channels=data_config.channels,
                          num_classes=manifest.get("num_classes"), known_stats=known,
                          stats_source=train, draft=bool(data_config.get("jpeg_draft", True)))
  if test_names:
    return source
  indices, note = holdout(len(source), split, f"data.data_dir={root}")
  return Subset(source, indices=indices, note=note)


def _on_gcs_errors(root, fn, *args):
  """fn(*args); on gs://, a client error (credentials, network, server) becomes one
  DatasetError naming data.data_dir instead of a traceback from gcsfs or aiohttp."""
  try:
    return fn(*args)
  except (DatasetError, paths.PathError):
    raise
  except Exception as e:  # gcsfs, aiohttp, google-auth and ArrayRecord errors
    if not paths.is_gcs(root):
      raise
    raise read_error(f"data.data_dir={root}", e, 200) from None
