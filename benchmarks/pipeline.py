"""Host input pipeline alone: training batches per second, no model, no device.

  python benchmarks/pipeline.py [--dataset fashion_mnist --dataset jpeg_folder]
      [--workers 0 --workers 2] [--batch_size 256] [--batches 20]

fashion_mnist: the default dataset (IDX files in memory, 28 px), RandomResizedCrop + flip.
jpeg_folder: an ImageNet-style folder of full-size JPEGs that this script generates
(--num_images of --jpeg_size, quality 90, smooth random content so they compress like
photos), decoded with PIL, RandomResizedCrop (scale 0.2-1) to --image_size and flipped:
the work of an ImageNet epoch. Workers are the pipeline's decode threads
(config.data.num_workers; 0 = in the calling thread). images/s per core divides by the
cores the process may use.

Prints a table and one JSON line per case.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import ml_collections
from absl import logging
import numpy as np
from PIL import Image

from mae_jax import data


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", action="append", choices=["fashion_mnist", "jpeg_folder"],
                 help="repeatable; default: both")
  p.add_argument("--workers", action="append", type=int,
                 help="decode threads, repeatable; default: 0 and the core count")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--batches", type=int, default=20, help="timed batches per case")
  p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
  p.add_argument("--image_size", type=int, default=224, help="jpeg_folder output size")
  p.add_argument("--num_images", type=int, default=512, help="JPEGs generated")
  p.add_argument("--jpeg_size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"),
                 help="generated JPEG size (ImageNet's mean is about 400 x 350)")
  p.add_argument("--folder", help="an existing image folder to read instead of generating")
  return p.parse_args(argv)


def write_jpegs(root, num_images, size, seed=0):
  """`num_images` RGB JPEGs of `size` (W, H) in root/train/class_{0,1}/: low-frequency
  random colour fields with noise, which JPEG compresses about as it does photographs."""
  rng = np.random.default_rng(seed)
  w, h = size
  for i in range(num_images):
    directory = os.path.join(root, "train", f"class_{i % 2}")
    os.makedirs(directory, exist_ok=True)
    coarse = rng.integers(0, 256, (h // 25 + 2, w // 25 + 2, 3), np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
    pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(directory, f"{i:05d}.jpg"), quality=90)


def source_for(name, args, folder):
  if name == "fashion_mnist":
    cfg = dict(name="fashion_mnist", data_dir=None, channels=1)
    image_size = 28
  else:
    cfg = dict(name="folder", data_dir=folder, channels=3, strict=False)
    image_size = args.image_size
  cfg = ml_collections.ConfigDict(dict(cfg, manual_dir=None))
  return data.load_source(cfg, "train"), image_size


def time_case(source, image_size, workers, args):
  """Seconds for `args.batches` batches after warm-up. Total time, not a per-batch median:
  with decode threads, batches made ahead during the warm-up would look free."""
  batches = data.make_train_batches(source, image_size=image_size,
                                    global_batch_size=args.batch_size, seed=0,
                                    num_workers=workers)
  for _ in range(args.warmup):
    next(batches)
  t0 = time.perf_counter()
  for _ in range(args.batches):
    batch = next(batches)
  seconds = time.perf_counter() - t0
  assert batch["image"].shape == (args.batch_size, image_size, image_size, source.channels)
  return seconds


def cores():
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv=None):
  args = parse_args(argv)
  # Decode threads still prefetching when the generated folder is removed at the end would
  # log every file as skipped; a bad file during timing fails the shape check instead.
  logging.set_verbosity(logging.ERROR)
  datasets = args.dataset or ["fashion_mnist", "jpeg_folder"]
  workers = args.workers or [0, cores()]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    folder = args.folder
    if "jpeg_folder" in datasets and folder is None:
      folder = tmp
      t0 = time.perf_counter()
      write_jpegs(folder, args.num_images, args.jpeg_size)
      print(f"wrote {args.num_images} JPEGs of {args.jpeg_size[0]}x{args.jpeg_size[1]} in "
            f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for name in datasets:
      source, image_size = source_for(name, args, folder)
      for w in workers:
        seconds = time_case(source, image_size, w, args)
        rate = args.batches * args.batch_size / seconds
        rows.append({"dataset": name, "image_size": image_size, "workers": w,
                     "batch_size": args.batch_size, "batch_s": round(seconds / args.batches, 4),
                     "images_per_s": round(rate, 1), "cores": cores(),
                     "images_per_s_per_core": round(rate / cores(), 1)})
  print(f"{'dataset':<14}{'size':>5}{'workers':>8}{'batch':>6}{'s/batch':>9}{'img/s':>9}"
        f"{'img/s/core':>11}")
  for r in rows:
    print(f"{r['dataset']:<14}{r['image_size']:>5}{r['workers']:>8}{r['batch_size']:>6}"
          f"{r['batch_s']:>9.3f}{r['images_per_s']:>9.0f}"
          f"{r['images_per_s_per_core']:>11.0f}")
  for r in rows:
    print(json.dumps(r))
  return rows


if __name__ == "__main__":
  main()
