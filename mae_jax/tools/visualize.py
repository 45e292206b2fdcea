"""Reconstruction grids: rows = original, masked input, reconstruction, reconstruction
with the visible patches pasted back (the paper's Figure 2 layout).

  python -m mae_jax.visualize workdirs/demo --out recon.png             # its test images
  python -m mae_jax.visualize out/mae_vis_large --images photos/ --out recon.png

The model comes from a train.py workdir or a converted checkpoint (mae_jax.train.pretrained);
images from files or folders given with --images (resized on the short side and centre
cropped to the model's size), or, for a workdir, the first test images of its dataset.
The mask is drawn with --seed; --mask_ratio overrides the model's.
"""
import argparse
import functools
import sys

import numpy as np

from mae_jax import paths as paths_lib
from mae_jax.evaluation.pictures import save_reconstructions, target_note
from mae_jax.tools import cli


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
  from mae_jax.train import pretrained, program, train_step as ts
  model = pre.model if mask_ratio is None else pre.model.clone(mask_ratio=mask_ratio)
  shape = images_u8_BHWC.shape[1:]
  step = program.jit(functools.partial(
      ts.eval_step, model=model, mean=pre.mean, std=pre.std,
      baseline_HWC=np.zeros(shape, np.float32), norm_pix_loss=pre.norm_pix_loss),
                     pretrained.one_device_mesh())  # where pretrained.load puts the params
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
  from mae_jax import data
  from mae_jax.train import checkpoints, param_dirs, pretrained
  try:
    if not paths_lib.is_gcs(args.out):
      cli.check_output_file(args.out, "--out")  # before any work, not after it
    if not args.out.lower().endswith(".png"):
      raise cli.UsageError(f"--out {args.out}: expected a .png file name")
    pre = pretrained.load(args.path, args.step)
    images = load_images(pre, args.images, args.num_images)
  except (cli.UsageError, pretrained.PretrainedError, checkpoints.CheckpointError,
          param_dirs.ParamsError, data.DatasetError, paths_lib.PathError,
          FileNotFoundError) as e:
    return cli.report(e)
  pred, mask, mse = reconstruct(pre, images, args.seed, args.mask_ratio)
  try:
    save_reconstructions(images, pred, mask, pre.model.patch_size, args.out,
                         title=f"{pre.description}: {target_note(pre.norm_pix_loss)}")
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
