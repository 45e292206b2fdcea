"""Reconstruction grids: rows = original, masked input, reconstruction, reconstruction
with the visible patches pasted back (the paper's Figure 2 layout)."""
import numpy as np
from PIL import Image


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
  image.save(path)
  return path
