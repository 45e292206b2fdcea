"""Prepare a dataset for fast decoding: an image folder or a TFDS dataset -> sharded
ArrayRecord files of JPEGs at a maximum side (read with --config.data.name=prepared).

  python -m mae_jax.prepare --folder ROOT --out DIR [--max_side 320] [--processes N]
  python -m mae_jax.prepare --tfds NAME [--tfds_data_dir D] --out DIR
  python -m mae_jax.prepare --verify DIR

DIR may be gs://BUCKET/PATH: each shard is then written to a local temporary file and
uploaded whole when complete (an object appears entirely or not at all), its `.done.json`
after it. ROOT is ILSVRC-style (train/<class>/*.JPEG, val|test/<class>/...), or <class>/* (train
only). Each image becomes one record: label, original size, stored size and the JPEG,
re-encoded (at --quality) only where it is not already an RGB or gray JPEG within
--max_side. Images that cannot be decoded are skipped and counted.

Shards are written by --processes worker processes, each to a temporary file renamed when
complete, with a `.done.json` beside it (record count, bytes, sha256, skipped images): a
killed run, rerun with the same arguments, redoes only the unfinished shards. manifest.json
(counts, per-shard checksums, pixel stats) is written last.
"""
import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from mae_jax import paths
from mae_jax.data import decode, folder, prepared
from mae_jax.data.errors import DatasetError
from mae_jax.tools import cli

MAX_SIDE = 384  # default: detail vs decode speed measured in docs/benchmarks.md
QUALITY = 90
SHARD_SIZE = 1024  # images per shard
SETTINGS = "prepare.json"
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def parse_args(argv):
  p = cli.ArgumentParser(prog="python -m mae_jax.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--folder", help="image folder root")
  src.add_argument("--tfds", help="TFDS dataset name (prepared, read with tfds.data_source)")
  src.add_argument("--verify", metavar="DIR", help="check a prepared dataset's checksums")
  p.add_argument("--tfds_data_dir", help="TFDS data_dir")
  p.add_argument("--out", help="output directory, local or gs://BUCKET/PATH (created; rerun "
                 "on it to resume)")
  p.add_argument("--max_side", type=int, default=MAX_SIDE,
                 help="longer side of stored images at most (larger ones are shrunk)")
  p.add_argument("--quality", type=int, default=QUALITY, help="JPEG quality of re-encoded images")
  p.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="images per shard")
  p.add_argument("--processes", type=int, default=os.cpu_count(), help="worker processes")
  return p.parse_args(argv)


def check_args(args) -> None:
  """One line naming the bad flag, before any work."""
  if args.verify:
    return
  if not args.out:
    raise DatasetError("--out: required (the directory to write the prepared dataset to)")
  for name, lo, hi in (("max_side", 16, 1 << 16), ("quality", 1, 100),
                       ("shard_size", 1, 1 << 30), ("processes", 1, 1024)):
    if not lo <= getattr(args, name) <= hi:
      raise DatasetError(f"--{name}={getattr(args, name)}: expected {lo} to {hi}")
  if args.folder and not os.path.isdir(args.folder):
    raise DatasetError(f"--folder={args.folder}: not a directory")
  check_out(args.out)


def check_out(out) -> None:
  """--out is a directory to resume or one that can be made: neither a file nor below one,
  and writable."""
  if paths.is_gcs(out):
    return check_gcs_out(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise DatasetError(f"--out={out}: is a file; expected a directory (a new one, or one "
                       "to resume)")
  existing = os.path.abspath(out)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise DatasetError(f"--out={out}: {existing} is a file, so the directory cannot be made")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise DatasetError(f"--out={out}: {existing} is not writable (permission denied)")


def check_gcs_out(out) -> None:
  """A gs:// --out names a bucket that exists and takes an object, and is not an object."""
  with gcs_errors("--out", out):
    if paths.isfile(out):
      raise DatasetError(f"--out={out}: is an object; expected a directory (a new one, or "
                         "one to resume)")
    try:
      paths.write_probe(out)
    except FileNotFoundError:
      raise DatasetError(f"--out={out}: bucket {paths.bucket(out)} does not exist (or these "
                         "credentials cannot see it)") from None


@contextlib.contextmanager
def gcs_errors(flag, path):
  """On a gs:// `path`, a bad path or a client error (credentials, network, server)
  becomes one DatasetError naming `flag` instead of a traceback from gcsfs or aiohttp."""
  try:
    yield
  except DatasetError:
    raise
  except paths.PathError as e:
    raise DatasetError(f"{flag}={e}") from None
  except Exception as e:  # gcsfs, aiohttp, google-auth and ArrayRecord errors
    if not paths.is_gcs(path):
      raise
    reason = " ".join(str(e).split())[:200]
    raise DatasetError(f"{flag}={path}: cannot reach it ({type(e).__name__}: {reason}); "
                       "check the bucket, the credentials and the network") from None


# --- Inputs: per split, the examples to write ----------------------------------------------


def folder_inputs(root: str) -> tuple[dict, list[str] | None, dict]:
  """({split: [(path, label)]}, class names, {split: {path: reason}} of unreadable files)."""
  has_splits = any(os.path.isdir(os.path.join(root, d))
                   for names in folder.SPLIT_DIRS.values() for d in names)
  splits = [s for s in ("train", "val", "validation", "test")
            if os.path.isdir(os.path.join(root, s))] if has_splits else ["train"]
  inputs, skipped, classes = {}, {}, None
  for split in splits:
    directory = os.path.join(root, split) if has_splits else root
    paths, labels, _ = folder.list_examples(directory)
    paths, labels, skipped[split] = folder.drop_unreadable(paths, labels, strict=False)
    inputs[split] = list(zip(paths, labels))
    if split == "train" or classes is None:
      names = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d))
                     and folder.images_under(os.path.join(directory, d)))
      classes = names or None
  if not any(inputs.values()):
    raise DatasetError(f"--folder={root}: no images ({', '.join(folder.EXTENSIONS)}) found")
  return inputs, classes, skipped


def tfds_inputs(name: str, data_dir: str | None) -> tuple[dict, list[str] | None, dict]:
  """({split: [(index, None)]}, class names, {}) of a prepared TFDS dataset."""
  from mae_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  builder = tfds_source.open_builder(name, data_dir)
  tfds_source.ensure_prepared(builder, name, None)
  _, label_key = tfds_source.feature_keys(builder.info.features, name)
  inputs = {split: [(i, None) for i in range(info.num_examples)]
            for split, info in builder.info.splits.items()}
  names = builder.info.features[label_key].names if label_key else None
  return inputs, names, {}


class TfdsReader:
  """Raw image bytes and labels of one TFDS split (opened once per worker process)."""
  _open = {}

  @classmethod
  def get(cls, name, data_dir, split, index):
    key = (name, data_dir, split)
    if key not in cls._open:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      from mae_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
      builder = tfds_source.open_builder(name, data_dir)
      image_key, label_key = tfds_source.feature_keys(builder.info.features, name)
      source = builder.as_data_source(split=split,
                                      decoders={image_key: tfds.decode.SkipDecoding()})
      cls._open[key] = (source, image_key, label_key)
    source, image_key, label_key = cls._open[key]
    example = source[index]
    return bytes(example[image_key]), int(example[label_key]) if label_key else -1


# --- One image, one shard -----------------------------------------------------------------


def encode(raw, max_side: int, quality: int, name: str):
  """(JPEG bytes, original (h, w), stored (h, w), uint8 image) of one input image (a path or
  bytes): the original bytes where it is an RGB/gray JPEG within max_side, else decoded,
  shrunk to max_side (Lanczos) and re-encoded. DatasetError if it cannot be decoded."""
  try:
    with decode.open_image(raw) as image:
      width, height = image.size
      keep = image.format == "JPEG" and image.mode in ("RGB", "L") and max(width, height) <= max_side
      scale = min(1.0, max_side / max(width, height))
      size = (max(1, round(width * scale)), max(1, round(height * scale)))
      if image.format == "JPEG" and scale < 0.5:
        image.draft(image.mode if image.mode in ("RGB", "L") else "RGB", size)
      image.load()
      array = decode.to_array(image, 1 if image.mode in GRAY_MODES else 3)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
    raise DatasetError(f"{name}: cannot decode image: {type(e).__name__}: {e}") from e
  if keep:
    if not isinstance(raw, bytes):
      with open(raw, "rb") as f:
        raw = f.read()
    jpeg = raw
    return jpeg, (height, width), (height, width), array
  pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  if pil.size != size:
    pil = pil.resize(size, Image.Resampling.LANCZOS)
  out = io.BytesIO()
  pil.save(out, format="JPEG", quality=quality)
  return out.getvalue(), (height, width), (size[1], size[0]), np.asarray(pil)


def pixel_sums(array) -> np.ndarray:
  """(3, 3): per RGB channel [sum, sum of squares, count] of pixels on [0, 1]."""
  x = array.reshape(-1, array.shape[-1]).astype(np.float64) / 255.0
  if x.shape[1] == 1:
    x = np.repeat(x, 3, 1)
  return np.stack([x.sum(0), np.square(x).sum(0), np.full(3, len(x), np.float64)], 1)


def read_input(task, item):
  """(raw image: path or bytes, label, name) of one input example."""
  key, label = item
  if task["kind"] == "folder":
    return key, label, key
  raw, label = TfdsReader.get(task["name"], task["data_dir"], task["split"], key)
  return raw, label, f"{task['name']}/{task['split']}[{key}]"


def write_shard(task) -> dict:
  """Write one shard (to a temporary file, renamed or, on gs://, uploaded when complete)
  and then its .done.json; returns the done record."""
  path = paths.join(task["out"], task["file"])
  if not paths.is_gcs(path):
    tmp = f"{path}.tmp.{os.getpid()}"
    stats = write_records(task, tmp)
    os.replace(tmp, path)
  else:
    staging = tempfile.mkdtemp(prefix="mae_jax_prepare_")
    try:
      tmp = os.path.join(staging, task["file"])
      stats = write_records(task, tmp)
      paths.upload(tmp, path)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  done = dict(file=task["file"], **stats)
  write_json(path[:-len(".array_record")] + ".done.json", done)
  return done


def write_records(task, tmp: str) -> dict:
  """Write the shard's records to the local file `tmp`; its count, size, sha256, skipped
  images and pixel sums."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  skipped, sums, count = {}, np.zeros((3, 3)), 0
  for item in task["items"]:
    raw, label, name = read_input(task, item)
    try:
      jpeg, original, stored, array = encode(raw, task["max_side"], task["quality"], name)
    except DatasetError as e:
      skipped[name] = str(e).split(": ", 1)[-1]
      continue
    writer.write(prepared.pack(label, original, stored, jpeg))
    sums += pixel_sums(array)
    count += 1
  writer.close()
  return {"num_records": count, "bytes": os.path.getsize(tmp), "sha256": sha256(tmp),
          "skipped": skipped, "pixel_sums": sums.tolist()}


def remove_partial_files(out: str) -> None:
  """Delete the temporary files a killed run left (one run per output at a time; on
  gs:// there are none: shards are written locally and uploaded whole)."""
  if paths.is_gcs(out):
    return
  for name in os.listdir(out):
    if ".tmp." in name or ".tmp-" in name:
      os.remove(os.path.join(out, name))


def sha256(path: str) -> str:
  """The sha256 of a local or gs:// file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with paths.resolve(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_json(path: str, obj) -> None:
  """Atomically: a reader sees the old file or the whole new one."""
  paths.write_atomic(path, json.dumps(obj, indent=1))


def finished_shards(out: str, tasks) -> dict:
  """{file: done record} of the complete shards: a done record whose shard is present at
  the recorded size (sizes from one listing on gs://)."""
  sizes = prepared.shard_sizes(out)
  finished = {}
  for task in tasks:
    file = task["file"]
    done_name = file[:-len(".array_record")] + ".done.json"
    if sizes(done_name) is None:
      continue
    try:
      done = json.loads(paths.read_text(paths.join(out, done_name)))
      if sizes(file) == done["bytes"]:
        finished[file] = done
    except (OSError, ValueError, KeyError):
      pass
  return finished


# --- The run: plan, resume, progress, manifest ----------------------------------------------


def plan(args, inputs) -> list[dict]:
  """One task per shard: contiguous runs of shard_size examples of each split, in order."""
  base = {"out": args.out, "max_side": args.max_side, "quality": args.quality,
          "kind": "folder" if args.folder else "tfds", "name": args.tfds,
          "data_dir": args.tfds_data_dir}
  tasks = []
  for split, items in inputs.items():
    count = max(1, -(-len(items) // args.shard_size))
    for i in range(count):
      chunk = items[i * args.shard_size:(i + 1) * args.shard_size]
      tasks.append(dict(base, split=split, items=chunk,
                        file=prepared.shard_name(split, i, count)))
  return tasks


def check_settings(args, inputs) -> None:
  """Record this run's settings in the output; a rerun with other settings stops there."""
  settings = {"source": os.path.abspath(args.folder) if args.folder else f"tfds:{args.tfds}",
              "max_side": args.max_side, "quality": args.quality,
              "shard_size": args.shard_size,
              "num_inputs": {split: len(items) for split, items in inputs.items()}}
  path = paths.join(args.out, SETTINGS)
  if paths.exists(path):
    before = json.loads(paths.read_text(path))
    if before != settings:
      differ = sorted(k for k in settings if before.get(k) != settings[k])
      raise DatasetError(f"--out={args.out}: was started with other settings ({', '.join(differ)}: "
                         f"{[before.get(k) for k in differ]}); use another --out or delete it")
  paths.makedirs(args.out)
  write_json(path, settings)


class Progress:
  """A bar redrawn on a terminal, one line per shard otherwise (stderr)."""

  def __init__(self, total_images: int, done_images: int):
    self.total, self.done, self.start_done = total_images, done_images, done_images
    self.t0 = time.perf_counter()
    self.tty = sys.stderr.isatty()

  def update(self, images: int, shard: str) -> None:
    self.done += images
    rate = (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)
    eta = (self.total - self.done) / rate if rate else 0
    filled = int(24 * self.done / max(self.total, 1))
    text = (f"[{'#' * filled}{'.' * (24 - filled)}] {self.done:,}/{self.total:,} images "
            f"{rate:,.0f} img/s ETA {eta:.0f} s ({shard})")
    sys.stderr.write(("\r" + text) if self.tty else text + "\n")
    sys.stderr.flush()


def run_tasks(tasks, processes: int, progress: Progress) -> list[dict]:
  """Write the shards (in worker processes where processes > 1)."""
  results = []
  if processes == 1:
    for task in tasks:
      results.append(write_shard(task))
      progress.update(len(task["items"]), task["file"])
    return results
  with multiprocessing.get_context("spawn").Pool(processes) as pool:
    for task, done in zip(tasks, pool.imap(write_shard, tasks)):
      results.append(done)
      progress.update(len(task["items"]), task["file"])
  return results


def manifest_for(args, tasks, dones, classes, listing_skipped) -> dict:
  """Counts, per-shard checksums, skipped images and RGB pixel stats of the whole output."""
  splits, sums = {}, np.zeros((3, 3))
  for task, done in zip(tasks, dones):
    entry = splits.setdefault(task["split"], {"num_examples": 0, "shards": [], "skipped": {}})
    entry["num_examples"] += done["num_records"]
    entry["shards"].append({k: done[k] for k in ("file", "num_records", "bytes", "sha256")})
    entry["skipped"].update(done["skipped"])
    if task["split"] == "train":
      sums += np.array(done["pixel_sums"])
  for split, reasons in listing_skipped.items():
    if split in splits:
      splits[split]["skipped"].update(reasons)
  for entry in splits.values():
    entry["num_skipped"] = len(entry["skipped"])
  mean = sums[:, 0] / np.maximum(sums[:, 2], 1)
  std = np.sqrt(np.maximum(sums[:, 1] / np.maximum(sums[:, 2], 1) - mean**2, 0))
  stats = ({"mean": mean.tolist(), "std": np.maximum(std, 1 / 255).tolist()}
           if sums[0, 2] else None)
  return {"format": prepared.FORMAT, "max_side": args.max_side, "quality": args.quality,
          "num_classes": len(classes) if classes else None, "class_names": classes,
          "splits": splits, "stats": stats}


def prepare(args) -> dict:
  """Write (or finish) the prepared dataset in args.out; returns its manifest."""
  inputs, classes, listing_skipped = (folder_inputs(args.folder) if args.folder
                                      else tfds_inputs(args.tfds, args.tfds_data_dir))
  check_settings(args, inputs)
  remove_partial_files(args.out)
  tasks = plan(args, inputs)
  finished = finished_shards(args.out, tasks)
  todo = [t for t in tasks if t["file"] not in finished]
  total = sum(len(items) for items in inputs.values())
  done_images = sum(len(t["items"]) for t in tasks if t["file"] in finished)
  print(f"prepare: {total:,} images in {len(tasks)} shards -> {args.out}"
        + (f"; resuming, {len(finished)} shards already done" if finished else ""),
        file=sys.stderr)
  progress = Progress(total, done_images)
  for task, done in zip(todo, run_tasks(todo, min(args.processes, max(len(todo), 1)), progress)):
    finished[task["file"]] = done
  manifest = manifest_for(args, tasks, [finished[t["file"]] for t in tasks], classes,
                          listing_skipped)
  write_json(paths.join(args.out, prepared.MANIFEST), manifest)
  if progress.tty:
    sys.stderr.write("\n")
  return manifest


def verify(root: str) -> int:
  """Check every shard's sha256 against the manifest; the number of mismatches."""
  manifest = prepared.read_manifest(root)
  bad = 0
  for split, entry in manifest["splits"].items():
    prepared.check_shards(root, split, entry)
    for shard in entry["shards"]:
      if sha256(paths.join(root, shard["file"])) != shard["sha256"]:
        print(f"{paths.join(root, shard['file'])}: checksum differs from {prepared.MANIFEST}",
              file=sys.stderr)
        bad += 1
  return bad


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    check_args(args)
    if args.verify:
      with gcs_errors("--verify", args.verify):
        bad = verify(args.verify)
      print(f"{args.verify}: " + (f"{bad} shard(s) corrupt" if bad else "all shards match"))
      return 2 if bad else 0
    with gcs_errors("--out", args.out):
      manifest = prepare(args)
  except DatasetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for split, entry in manifest["splits"].items():
    print(f"{split}: {entry['num_examples']:,} images in {len(entry['shards'])} shards, "
          f"{entry['num_skipped']} skipped")
  return 0


def run():
  """The console script `mae-prepare`."""
  sys.exit(main())


if __name__ == "__main__":
  run()
