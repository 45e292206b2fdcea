"""What a prepared dataset's --max_side costs and buys: decode speed of 224 px training crops
against the detail lost, on photographs (benchmarks/photos.py).

  python benchmarks/max_side.py [--sides 160 224 256 288 320 384 448 500] [--num_images 64]

For each max side, every photograph (500 x 375) is stored as `python -m mae_jax.prepare`
stores it (shrunk with Lanczos, JPEG quality 90; kept as is at 500), then `--crops` training
crops per image (RandomResizedCrop scale 0.2-1, 224 px, flip, JPEG draft on) are decoded one
at a time on one thread, with JPEG draft and without. Columns: ms/crop, the median CPU time of this thread per crop
(time.thread_time: on a shared machine, wall time also counts other jobs' turns), and
wall ms/crop beside it; crops/s per core = 1 / CPU time; PSNR of each crop
against the same crop taken from the full-size original (decoded whole, no draft); and
detail, the mean over crops of min(stored crop side, 224) / min(original crop side, 224):
the share of the 224 px output's linear resolution that the stored pixels still carry.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import photos  # pylint: disable=wrong-import-position

from mae_jax.tools import prepare  # pylint: disable=wrong-import-position
from mae_jax.data import augment, decode  # pylint: disable=wrong-import-position


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sides", type=int, nargs="+", default=[160, 224, 256, 288, 320, 384, 448, 500])
  p.add_argument("--num_images", type=int, default=64)
  p.add_argument("--crops", type=int, default=8, help="crops per image")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--jpeg_size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"),
                 help="size of the photographs (the originals)")
  return p.parse_args(argv)


def psnr(a, b) -> float:
  mse = np.mean((a.astype(np.float64) - b) ** 2)
  return float(10 * np.log10(255**2 / max(mse, 1e-10)))


def measure(originals, side, args):
  """(median CPU seconds per crop, median wall seconds, mean PSNR, mean detail, median CPU
  seconds per crop without JPEG draft)."""
  rng = np.random.default_rng(0)
  crop_flip = augment.AUGMENTS["crop_flip"]
  seconds, walls, psnrs, details, no_draft = [], [], [], [], []
  for raw in originals:
    stored, (h0, w0), (h, w), _ = prepare.encode(raw, side, prepare.QUALITY, "photo")
    full = decode.decode(raw, 3)
    for _ in range(args.crops):
      draws = rng.random((1, augment.NUM_DRAWS))
      t0, c0 = time.perf_counter(), time.thread_time()
      crop = decode.decode_crops(stored, draws, crop_flip, args.image_size, (0.2, 1.0), 3,
                                 draft=True)
      seconds.append(time.thread_time() - c0)
      walls.append(time.perf_counter() - t0)
      c0 = time.thread_time()
      decode.decode_crops(stored, draws, crop_flip, args.image_size, (0.2, 1.0), 3, draft=False)
      no_draft.append(time.thread_time() - c0)
      box = decode.crop_boxes(h, w, draws, crop_flip, args.image_size, (0.2, 1.0))[0]
      box0 = box * np.array([h0 / h, w0 / w] * 2)  # the same region in the original
      reference = augment.crop_resize(full, box0, args.image_size)
      if draws[0, augment.FLIP] < 0.5:
        reference = reference[:, ::-1]
      psnrs.append(psnr(crop[0], reference))
      details.append(min(min(box[2:]), args.image_size) / min(min(box0[2:]), args.image_size))
  return (float(np.median(seconds)), float(np.median(walls)), float(np.mean(psnrs)),
          float(np.mean(details)), float(np.median(no_draft)))


def main(argv=None):
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    photos.write_photo_folder(tmp, args.num_images, tuple(args.jpeg_size))
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(tmp) for f in files)
    originals = [open(p, "rb").read() for p in paths]
  rows = []
  for side in args.sides:
    seconds, wall, quality, detail, no_draft = measure(originals, side, args)
    rows.append({"max_side": side, "crops_per_s_per_core": round(1 / seconds, 1),
                 "cpu_ms_per_crop": round(1000 * seconds, 3),
                 "wall_ms_per_crop": round(1000 * wall, 3),
                 "cpu_ms_per_crop_no_draft": round(1000 * no_draft, 3),
                 "psnr_db": round(quality, 2), "image_size": args.image_size,
                 "load_1min": round(os.getloadavg()[0], 2),
                 "detail": round(detail, 4), "images": len(originals), "crops": args.crops})
  print(f"{'max_side':>8}{'cpu ms':>8}{'no draft':>9}{'wall ms':>8}{'crops/s/core':>13}"
        f"{'PSNR dB':>9}{'detail':>8}{'load':>6}")
  for r in rows:
    print(f"{r['max_side']:>8}{r['cpu_ms_per_crop']:>8.2f}{r['cpu_ms_per_crop_no_draft']:>9.2f}"
          f"{r['wall_ms_per_crop']:>8.2f}{r['crops_per_s_per_core']:>13.0f}"
          f"{r['psnr_db']:>9.2f}{r['detail']:>8.3f}{r['load_1min']:>6.1f}")
  for r in rows:
    print(json.dumps(r))
  return rows


if __name__ == "__main__":
  main()
