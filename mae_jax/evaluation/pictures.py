"""Reconstruction grids (the paper's Figure 2 layout: original, masked input, reconstruction,
visible patches pasted back), rows named and the target stated, as a PNG or for TensorBoard.
"""
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mae_jax import paths as paths_lib
from mae_jax.model.patches import unpatchify


# What each row shows, written beside it: the third row's visible patches are predictions
# too, but no loss is computed on them, so they need not look like the image.
ROW_NAMES = ("original", "masked input (grey = masked)",
             "prediction, every patch (loss on masked only)", "visible + predicted masked")


def target_note(norm_pix_loss):
  """What the picture's predictions are, by the target the model was trained on."""
  if norm_pix_loss:
    return ("target: norm-pix (each patch standardized); predictions drawn with each "
            "true patch's mean and std")
  return "target: pixels"


def grid(rows, scale=4, pad=2):
  """Rows of (B, H, W, C) [0, 1] images tiled into one uint8 image, upscaled for viewing."""
  b, h, w, c = rows[0].shape
  canvas = np.ones((len(rows) * (h + pad) + pad, b * (w + pad) + pad, c), np.float32)
  for r, row in enumerate(rows):
    for i, img in enumerate(row):
      y, x = pad + r * (h + pad), pad + i * (w + pad)
      canvas[y:y + h, x:x + w] = img
  pixels = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
  image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
  return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


TITLE_HEIGHT = 24  # pixels above the grid, for the title


def labelled(image, row_names, title, pad=6):
  """`image` (a grid of len(row_names) equal rows) with each row's name on its left and
  `title` above, black on white."""
  font = ImageFont.load_default()
  text_w = int(max(font.getlength(t) for t in (*row_names, ""))) + 2 * pad
  white, ink = (255, 0) if image.mode == "L" else ((255, 255, 255), (0, 0, 0))
  out = Image.new(image.mode, (text_w + image.width, TITLE_HEIGHT + image.height), white)
  out.paste(image, (text_w, TITLE_HEIGHT))
  draw = ImageDraw.Draw(out)
  draw.text((pad, pad), title, fill=ink, font=font)
  row_h = image.height / len(row_names)
  for r, name in enumerate(row_names):
    draw.text((pad, TITLE_HEIGHT + (r + 0.5) * row_h - 6), name, fill=ink, font=font)
  return out


def reconstruction_picture(images_u8_BHWC, pred_BNP, mask_BN, patch_size, title="",
                           scale=None):
  """The four labelled rows of uint8 images, their reconstructions (B, N, p*p*C) on [0, 1]
  pixels and masks (B, N; 1 = masked), as a PIL image."""
  b, h, w, c = images_u8_BHWC.shape
  grid_size = (h // patch_size, w // patch_size)
  pred = np.asarray(unpatchify(np.asarray(pred_BNP), patch_size, grid_size, c))
  mask_BNP = np.repeat(np.asarray(mask_BN)[:, :, None], patch_size**2 * c, axis=-1)
  mask = np.asarray(unpatchify(mask_BNP, patch_size, grid_size, c))
  images = images_u8_BHWC.astype(np.float32) / 255.0
  masked_input = images * (1 - mask) + 0.5 * mask  # grey holes
  pasted = images * (1 - mask) + pred * mask
  rows = [images, masked_input, np.clip(pred, 0, 1), np.clip(pasted, 0, 1)]
  scale = max(1, 112 // h) if scale is None else scale  # small images blown up for viewing
  return labelled(grid(rows, scale=scale), ROW_NAMES, title)


def save_reconstructions(images_u8_BHWC, pred_BNP, mask_BN, patch_size, path, title="",
                         scale=None):
  """reconstruction_picture as a PNG at `path` (local or gs://)."""
  png = io.BytesIO()
  reconstruction_picture(images_u8_BHWC, pred_BNP, mask_BN, patch_size, title,
                         scale).save(png, format="PNG")
  paths_lib.write_atomic(path, png.getvalue())
  return path
