"""Reconstruction grids: rows = original, masked input, reconstruction, reconstruction with
the visible patches pasted back (the paper's Figure 2 layout), as a PNG (local or gs://).
The trainer draws one at the end of a run; `python -m mae_jax.visualize` for any model."""
import io

import numpy as np
from PIL import Image

from mae_jax import paths as paths_lib
from mae_jax.model.patches import unpatchify


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
