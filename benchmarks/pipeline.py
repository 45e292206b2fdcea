"""Host input pipeline alone: training batches per second, per core, no model, no device.

  python benchmarks/pipeline.py [--path folder --path prepared] [--workers 0 --workers t2
      --workers p2] [--repeat 1 --repeat 2 --repeat 4] [--decode full --decode crop]
      [--resize host --resize device] [--batch_size 64] [--batches 10] [--num_images 512]

The images are photographs (benchmarks/photos.py: scikit-image's bundled photos cut to an
ImageNet-like folder of --num_images JPEGs of 500 x 375). Every batch is RandomResizedCrop
(scale 0.2-1) to --image_size plus flip, as training makes it.

  path      folder: the JPEG folder (data.name=folder); prepared: the same images after
            `python -m mae_jax.prepare --max_side M` (timed too); fashion_mnist: in memory
  decode    full: decode every pixel, then crop (the pipeline before crop-aware decoding);
            crop: JPEG draft as far as the crop allows, crop before resize
  workers   0: in the calling thread; tN: N decode threads (data.num_workers=N);
            pN: N worker processes (data.worker_processes=N)
  repeat    data.repeat_samples: crops per decoded image
  resize    data.resize. host: each crop resized to --image_size by Pillow here; device: the
            host only cuts each crop's region into a bucket (mae_jax.data.device_resize)
            and the accelerator resizes it. Only the host's part is timed; the device's
            part is printed as XLA's FLOP count per sample.

Before the table, the JPEG decoders alone (--decoders, on by default): median CPU ms to decode
one whole image to a numpy array with PIL (open, load, asarray) and with libjpeg-turbo through
simplejpeg (what the crop path uses for RGB and gray JPEGs), on the folder's and the prepared
dataset's JPEGs.

Columns: samples/s (training rows per second of wall time); per core (that divided by the
cores this process may use); per CPU-s (rows per CPU-second used by this process and its
worker processes: what one fully used core makes, less sensitive to other jobs sharing
the machine); images/s decoded (samples / repeat). Prints a table and one JSON line per case.
"""
import argparse
import functools
import io
import json
import os
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
import psutil
import simplejpeg
from absl import logging
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import photos  # pylint: disable=wrong-import-position

from mae_jax import data  # pylint: disable=wrong-import-position
from mae_jax.tools import prepare
from mae_jax.data import decode, device_resize  # pylint: disable=wrong-import-position
from mae_jax.data.source import Source  # pylint: disable=wrong-import-position


def cores():
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--path", action="append", choices=["folder", "prepared", "fashion_mnist"],
                 help="repeatable; default: folder and prepared")
  p.add_argument("--workers", action="append",
                 help=f"0, tN or pN, repeatable; default: 0, t{cores()}, p{cores()}")
  p.add_argument("--repeat", action="append", type=int, help="default: 1, 2, 4")
  p.add_argument("--decode", action="append", choices=["full", "crop"],
                 help="default: both (full only with 0 or thread workers)")
  p.add_argument("--resize", action="append", choices=["host", "device"],
                 help="default: both (device only with crop decoding)")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--batches", type=int, default=10, help="timed batches per case")
  p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--num_images", type=int, default=512, help="photographs in the folder")
  p.add_argument("--jpeg_size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
  p.add_argument("--max_side", type=int, default=prepare.MAX_SIDE, help="prepared max side")
  p.add_argument("--folder", help="an existing image folder to read instead of the photos")
  p.add_argument("--decoders", action=argparse.BooleanOptionalAction, default=True,
                 help="time the JPEG decoders alone first")
  return p.parse_args(argv)


def workers_of(spec: str) -> tuple[int, int]:
  """'0' | 'tN' | 'pN' -> (threads, processes)."""
  if spec == "0":
    return 0, 0
  if spec[:1] in ("t", "p") and spec[1:].isdigit() and int(spec[1:]) > 0:
    return (int(spec[1:]), 0) if spec[0] == "t" else (0, int(spec[1:]))
  raise SystemExit(f"error: --workers={spec!r}: expected 0, tN or pN")


def load(path, folder, out, how):
  """(source, image_size or None) of one path; decode 'full' swaps in the base class's
  decode-everything crops."""
  if path == "fashion_mnist":
    cfg = dict(name="fashion_mnist", data_dir=None, channels=1)
  else:
    cfg = dict(name=path, data_dir=folder if path == "folder" else out, channels=3)
  source = data.load_source(ml_collections.ConfigDict(dict(cfg, manual_dir=None)), "train")
  if how == "full" and path != "fashion_mnist":
    source.crop_batch = functools.partial(Source.crop_batch, source)
  return source


def cpu_seconds(process) -> float:
  """CPU time of this process and its live children (grain's worker processes)."""
  total = sum(process.cpu_times()[:2])
  for child in process.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return total


def time_case(source, image_size, threads, processes, repeat, resize, args):
  """(wall seconds, CPU seconds) for args.batches batches after the warm-up. Totals, not a
  per-batch median: with workers, batches made ahead during the warm-up would look free."""
  batches = data.make_train_batches(source, image_size=image_size,
                                    global_batch_size=args.batch_size, seed=0,
                                    num_workers=threads, worker_processes=processes,
                                    repeat_samples=repeat, resize=resize)
  for _ in range(args.warmup):
    next(batches)
  me = psutil.Process()
  t0, c0 = time.perf_counter(), cpu_seconds(me)
  for _ in range(args.batches):
    batch = next(batches)
  seconds, cpu = time.perf_counter() - t0, cpu_seconds(me) - c0
  key, side = ("image", image_size) if resize == "host" else (
      "region", device_resize.bucket_side(image_size))
  assert batch[key].shape == (args.batch_size, side, side, source.channels)
  del batches  # stops worker processes
  return seconds, cpu


def run_case(path, decode, spec, repeat, resize, source, args):
  threads, processes = workers_of(spec)
  image_size = 28 if path == "fashion_mnist" else args.image_size
  seconds, cpu = time_case(source, image_size, threads, processes, repeat, resize, args)
  rows = args.batches * args.batch_size
  return {"path": path, "decode": decode, "workers": spec, "repeat": repeat, "resize": resize,
          "image_size": image_size, "batch_size": args.batch_size,
          "samples_per_s": round(rows / seconds, 1),
          "samples_per_s_per_core": round(rows / seconds / cores(), 1),
          "samples_per_cpu_s": round(rows / max(cpu, 1e-9), 1),
          "images_per_s": round(rows / seconds / repeat, 1), "cores": cores(),
          "load_1min": round(os.getloadavg()[0], 2)}


def decode_times(jpegs, repeats=3):
  """{decoder: median CPU ms per image} over the encoded JPEGs."""
  def pil(jpeg):
    with Image.open(io.BytesIO(jpeg)) as image:
      image.load()
      return np.asarray(image.convert("RGB"))

  def turbo(jpeg):
    return simplejpeg.decode_jpeg(jpeg, "RGB")

  times = {}
  for name, fn in (("pil", pil), ("libjpeg-turbo", turbo)):
    samples = []
    for _ in range(repeats):
      for jpeg in jpegs:
        t0 = time.thread_time()
        fn(jpeg)
        samples.append(time.thread_time() - t0)
    times[name] = round(1e3 * float(np.median(samples)), 3)
  return times


def print_decoders(sources, count=64):
  """The decoders alone on the first `count` JPEGs of each loaded source."""
  for path, source in sources.items():
    if not hasattr(source, "encoded") and hasattr(source, "base"):
      source = source.base
    jpegs = [decode.jpeg_bytes(source.encoded(i)[0]) for i in range(min(count, len(source)))]
    jpegs = [j for j in jpegs if j is not None]
    if jpegs:
      sizes = simplejpeg.decode_jpeg_header(jpegs[0])[:2]
      print(json.dumps({"decoders_cpu_ms": decode_times(jpegs), "path": path,
                        "first_image_hw": list(sizes), "load_1min": round(os.getloadavg()[0], 2)}))


def make_prepared(folder, out, args):
  t0 = time.perf_counter()
  shard_size = max(1, -(-args.num_images // (4 * cores())))  # work for every process
  prepare.main(["--folder", folder, "--out", out, "--max_side", str(args.max_side),
                "--processes", str(cores()), "--shard_size", str(shard_size)])
  seconds = time.perf_counter() - t0
  print(f"prepared {args.num_images} images at max side {args.max_side} in {seconds:.1f} s "
        f"({args.num_images / seconds:.0f} images/s on {cores()} processes)", file=sys.stderr)


def cases(args):
  """(path, decode, workers, repeat, resize) to run, in table order."""
  spec = args.workers or ["0", f"t{cores()}", f"p{cores()}"]
  for path in args.path or ["folder", "prepared"]:
    for decode in (["crop"] if path == "fashion_mnist" else args.decode or ["full", "crop"]):
      for resize in args.resize or ["host", "device"]:
        if decode == "full" and resize == "device":
          continue  # the device path always decodes crop-aware
        for w in spec:
          if decode == "full" and w.startswith("p"):
            continue  # the swapped-in method does not travel to worker processes
          for repeat in args.repeat or [1, 2, 4]:
            yield path, decode, w, repeat, resize


def print_table(rows):
  print(f"{'path':<14}{'decode':>7}{'resize':>7}{'workers':>8}{'repeat':>7}{'samples/s':>10}"
        f"{'per core':>9}{'per CPU-s':>10}{'images/s':>9}{'load':>6}")
  for r in rows:
    print(f"{r['path']:<14}{r['decode']:>7}{r['resize']:>7}{r['workers']:>8}{r['repeat']:>7}"
          f"{r['samples_per_s']:>10.0f}{r['samples_per_s_per_core']:>9.0f}"
          f"{r['samples_per_cpu_s']:>10.0f}{r['images_per_s']:>9.0f}{r['load_1min']:>6.1f}")
  for r in rows:
    print(json.dumps(r))


def main(argv=None):
  args = parse_args(argv)
  logging.set_verbosity(logging.ERROR)
  todo = list(cases(args))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    folder = args.folder or os.path.join(tmp, "photos")
    if args.folder is None and any(c[0] != "fashion_mnist" for c in todo):
      photos.write_photo_folder(folder, args.num_images, tuple(args.jpeg_size))
    out = os.path.join(tmp, "prepared")
    if any(c[0] == "prepared" for c in todo):
      make_prepared(folder, out, args)
    sources = {}
    if args.decoders:
      print_decoders({path: load(path, folder, out, "crop") for path in {c[0] for c in todo}
                      if path != "fashion_mnist"})
    for path, how, spec, repeat, resize in todo:
      if (path, how) not in sources:
        sources[path, how] = load(path, folder, out, how)
      rows.append(run_case(path, how, spec, repeat, resize, sources[path, how], args))
    print_table(rows)
    if any(r["resize"] == "device" for r in rows):
      print_device_cost(args.image_size, 3)
      for path, how in sources:
        if how == "crop" and path != "fashion_mnist":
          print_parity(path, sources[path, how], args)
  return rows


def print_parity(path, source, args, steps=2):
  """How far data.resize='device' is from 'host' on this data: the first `steps` batches
  made both ways (the device part run on the local backend), pixels compared."""
  kwargs = dict(image_size=args.image_size, global_batch_size=args.batch_size, seed=0)
  host = data.make_train_batches(source, **kwargs)
  dev = data.make_train_batches(source, resize="device", **kwargs)
  crops = jax.jit(functools.partial(device_resize.crops_of, image_size=args.image_size))
  diffs = [np.abs(np.asarray(crops(next(dev))["image"]).astype(int) - next(host)["image"])
           for _ in range(steps)]
  diff = np.stack(diffs)
  print(json.dumps({"parity_path": path, "samples": int(diff.shape[0] * diff.shape[1]),
                    "max_level_diff": int(diff.max()), "mean_level_diff": float(diff.mean()),
                    "share_of_pixels_differing": float((diff > 0).mean())}))


def print_device_cost(image_size, channels, batch=8):
  """The accelerator's share of data.resize='device': XLA's FLOP count per sample of the
  jitted resize (the same program on any backend), and its CPU time per sample where the
  "accelerator" is this machine's CPU (why data.resize='auto' is 'host' on CPU)."""
  side = device_resize.bucket_side(image_size)
  host = {"region": np.zeros((batch, side, side, channels), np.uint8),
          "box": np.tile(np.float32([[0, 0, side, side]]), (batch, 1)),
          "extent": np.full((batch, 2), side, np.int32), "flip": np.zeros(batch, bool),
          "label": np.zeros(batch, np.int32)}
  crops = jax.jit(functools.partial(device_resize.crops_of, image_size=image_size))
  compiled = crops.lower(host).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  jax.block_until_ready(compiled(host))
  cpu = []
  for _ in range(3):
    t0 = time.process_time()
    jax.block_until_ready(compiled(host))
    cpu.append(time.process_time() - t0)
  print(json.dumps({"device_resize_flops_per_sample": round(cost["flops"] / batch),
                    "bucket": side, "image_size": image_size,
                    "upload_bytes_per_sample": side * side * channels,
                    f"{jax.default_backend()}_ms_per_sample": round(
                        1e3 * float(np.median(cpu)) / batch, 2)}))


if __name__ == "__main__":
  main()
