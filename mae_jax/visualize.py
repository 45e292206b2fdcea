"""Reconstruction grids: rows = original, masked input, reconstruction, reconstruction
with the visible patches pasted back (the paper's Figure 2 layout).

  python -m mae_jax.visualize workdirs/demo --out recon.png             # its test images
  python -m mae_jax.visualize out/mae_vis_large --images photos/ --out recon.png

The model comes from a train.py workdir or a converted checkpoint (mae_jax.pretrained);
images from files or folders given with --images (resized on the short side and centre
cropped to the model's size), or, for a workdir, the first test images of its dataset.
The mask is drawn with --seed; --mask_ratio overrides the model's.
"""
import argparse
import functools
import io
import sys

import numpy as np
from PIL import Image

from mae_jax import cli
from mae_jax import paths as paths_lib
from mae_jax.patches import unpatchify


def reconstruction_rows(images_BHWC, pred_BHWC, mask_BHW1):
  """Four (B, H, W, C) float [0, 1] rows; mask is 1 on masked pixels."""
  masked_input = images_BHWC * (1 - mask_BHW1) + 0.5 * mask_BHW1  # grey holes
  pasted = images_BHWC * (1 - mask_BHW1) + pred_BHWC * mask_BHW1
  return [images_BHWC, masked_input, np.clip(pred_BHWC, 0, 1), np.clip(pasted, 0, 1)]


def save_grid(rows, path, scale=4, pad=2):
  """Tile rows of (B, H, W, C) [0, 1] images into one PNG, upscaled for viewing."""
  b, h, w, c = rows[0].shape
  canvas = np.ones((len(rows) * (h + pad) + pad, b * (w + pad) + pad, c), np.float32)
  for r, row in enumerate(rows):
    for i, img in enumerate(row):
      y, x = pad + r * (h + pad), pad + i * (w + pad)
      canvas[y:y + h, x:x + w] = img
  pixels = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
  image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
  image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
  png = io.BytesIO()
  image.save(png, format="PNG")
  paths_lib.write_atomic(path, png.getvalue())  # local or gs://
  return path


def save_reconstructions(images_u8_BHWC, pred_BNP, mask_BN, patch_size, path, scale=None):
  """The four-row grid of uint8 images, their reconstructions (B, N, p*p*C) on [0, 1]
  pixels and masks (B, N; 1 = masked) as a PNG at `path`."""
  b, h, w, c = images_u8_BHWC.shape
  grid = (h // patch_size, w // patch_size)
  pred = np.asarray(unpatchify(np.asarray(pred_BNP), patch_size, grid, c))
  mask_BNP = np.repeat(np.asarray(mask_BN)[:, :, None], patch_size**2 * c, axis=-1)
  mask = np.asarray(unpatchify(mask_BNP, patch_size, grid, c))
  rows = reconstruction_rows(images_u8_BHWC.astype(np.float32) / 255.0, pred, mask)
  if scale is None:  # small images are blown up for viewing, large ones kept as they are
    scale = max(1, 112 // h)
  return save_grid(rows, path, scale=scale)


def image_source(paths, channels):
  """A FolderSource over image files and (recursively) the images in folders."""
  from mae_jax.data import folder
  files = []
  for path in paths:
    if paths_lib.isdir(path):
      files += folder.images_under(path)
    elif paths_lib.isfile(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"--images {path}: no such file or directory")
  if not files:
    raise FileNotFoundError(f"--images {' '.join(paths)}: no image files there")
  return folder.FolderSource(files, [-1] * len(files), channels=channels, num_classes=None,
                             known_stats=((0.0,) * channels, (1.0,) * channels))


def reconstruct(pre, images_u8_BHWC, seed=0, mask_ratio=None):
  """(pred (B, N, p*p*C) on [0, 1] pixels, mask (B, N), masked-patch MSE on [0, 1])."""
  import jax
  from mae_jax import train_step as ts
  model = pre.model if mask_ratio is None else pre.model.clone(mask_ratio=mask_ratio)
  shape = images_u8_BHWC.shape[1:]
  step = jax.jit(functools.partial(
      ts.eval_step, model=model, mean=pre.mean, std=pre.std,
      baseline_HWC=np.zeros(shape, np.float32), norm_pix_loss=pre.norm_pix_loss))
  batch = {"image": images_u8_BHWC, "valid": np.ones(len(images_u8_BHWC), bool)}
  out = jax.device_get(step(pre.params, batch, jax.random.key(seed)))
  return out["pred"], out["mask"], float(out["sq_err"] / out["count"])


def load_images(pre, paths, count):
  """uint8 (B, S, S, C) at the model's size: from `paths`, else the workdir's test split."""
  from mae_jax import data
  size, channels = pre.model.image_size, pre.model.channels
  if paths:
    source = image_source(paths, channels)
  elif pre.config is not None:
    source = data.load_source(pre.config.data, "test")
  else:
    raise FileNotFoundError("a converted checkpoint has no dataset: pass --images")
  count = min(count, len(source))
  batch = next(data.make_eval_batches(source, image_size=size, batch_size=count))
  return batch["image"]


def parse_args(argv):
  parser = cli.ArgumentParser(prog="python -m mae_jax.visualize", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("path", help="train.py workdir or `mae_jax.convert import` output")
  parser.add_argument("--images", nargs="*", default=None, help="image files or folders")
  parser.add_argument("--out", default="reconstructions.png", help="PNG to write")
  parser.add_argument("--num_images", type=cli.positive_int, default=8)
  parser.add_argument("--mask_ratio", type=cli.open_unit_float, default=None,
                      help="default: the model's")
  parser.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seeds the mask")
  parser.add_argument("--step", type=cli.nonnegative_int, default=None,
                      help="workdir checkpoint step")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  from mae_jax import checkpoint, data, pretrained
  try:
    if not paths_lib.is_gcs(args.out):
      cli.check_output_file(args.out, "--out")  # before any work, not after it
    if not args.out.lower().endswith(".png"):
      raise cli.UsageError(f"--out {args.out}: expected a .png file name")
    pre = pretrained.load(args.path, args.step)
    images = load_images(pre, args.images, args.num_images)
  except (cli.UsageError, pretrained.PretrainedError, checkpoint.CheckpointError,
          checkpoint.ParamsError, data.DatasetError, paths_lib.PathError,
          FileNotFoundError) as e:
    return cli.report(e)
  pred, mask, mse = reconstruct(pre, images, args.seed, args.mask_ratio)
  try:
    save_reconstructions(images, pred, mask, pre.model.patch_size, args.out)
  except OSError as e:  # the disk filled up or the folder went away meanwhile
    return cli.report(f"--out {args.out}: cannot write it ({e.strerror or e})")
  print(f"{pre.description}: {len(images)} images, masked-patch MSE {mse:.4f} on [0, 1] "
        f"pixels -> {args.out}")
  return 0


def run():
  """The console script `mae-visualize`."""
  sys.exit(main())


if __name__ == "__main__":
  run()
