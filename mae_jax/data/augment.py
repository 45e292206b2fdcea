"""Crop boxes (top, left, height, width) for a whole batch in numpy, random ones from uniform
draws (B, NUM_DRAWS) that the caller seeds; resizes as PIL's bicubic."""
import dataclasses

import numpy as np
from PIL import Image

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range (torchvision's default)
ATTEMPTS = 10  # torchvision's tries before its centre-crop fallback
EVAL_CROP = 0.875  # eval: resize the shorter side to size / 0.875, then centre-crop size
RESAMPLE = Image.Resampling.BICUBIC  # as the official MAE recipe
# Columns of the per-example draws (B, NUM_DRAWS), uniform on [0, 1).
SCALE, LOG_RATIO = slice(0, ATTEMPTS), slice(ATTEMPTS, 2 * ATTEMPTS)
TOP, LEFT, FLIP = 2 * ATTEMPTS, 2 * ATTEMPTS + 1, 2 * ATTEMPTS + 2
NUM_DRAWS = 2 * ATTEMPTS + 3


def random_resized_crop_boxes(sizes_B2: np.ndarray, draws_BD: np.ndarray,
                              scale: tuple[float, float], ratio=RATIO) -> np.ndarray:
  """torchvision's RandomResizedCrop.get_params, vectorised: int boxes (B, 4) of images of
  sizes_B2 (height, width). The first of ATTEMPTS draws that fits wins, else the fallback."""
  height, width = (sizes_B2[:, k:k + 1].astype(np.float64) for k in (0, 1))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * draws_BD[:, SCALE])
  log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
  aspect = np.exp(log_lo + (log_hi - log_lo) * draws_BD[:, LOG_RATIO])
  w_BA, h_BA = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
  fits_BA = (w_BA > 0) & (w_BA <= width) & (h_BA > 0) & (h_BA <= height)
  first, rows = fits_BA.argmax(1), np.arange(len(sizes_B2))
  h, w = h_BA[rows, first], w_BA[rows, first]
  height, width = height[:, 0], width[:, 0]
  top = np.floor(draws_BD[:, TOP] * (height - h + 1))
  left = np.floor(draws_BD[:, LEFT] * (width - w + 1))
  found = fits_BA.any(1)
  in_ratio = width / height  # the fallback: the whole image, clamped to the aspect range
  h = np.where(found, h, np.where(in_ratio < ratio[0], np.round(width / ratio[0]), height))
  w = np.where(found, w, np.where(in_ratio > ratio[1], np.round(height * ratio[1]), width))
  top = np.where(found, top, (height - h) // 2)
  left = np.where(found, left, (width - w) // 2)
  return np.stack([top, left, h, w], 1).astype(np.int64)


def center_boxes(sizes_B2: np.ndarray, image_size: int) -> np.ndarray:
  """Deterministic float boxes (B, 4): images larger than image_size get the ImageNet eval
  crop (shorter side -> image_size / EVAL_CROP, centre image_size square); the rest, whole."""
  height, width = sizes_B2[:, 0].astype(np.float64), sizes_B2[:, 1].astype(np.float64)
  large = np.minimum(height, width) > image_size
  side = np.minimum(height, width) * EVAL_CROP
  h, w = np.where(large, side, height), np.where(large, side, width)
  return np.stack([(height - h) / 2, (width - w) / 2, h, w], 1)


def crop_boxes(sizes_B2, draws_BD, augment, image_size: int, crop_scale) -> np.ndarray:
  """Boxes (B, 4) of the crops `augment` makes of images (height, width) sizes_B2."""
  if augment.random_crop:
    return random_resized_crop_boxes(sizes_B2, draws_BD, crop_scale)
  return center_boxes(sizes_B2, image_size)


def resize_boxes(array_HWC, boxes_K4, image_size: int) -> np.ndarray:
  """uint8 (K, image_size, image_size, C): each float box of the image resized bicubically
  (PIL's resize with a box crops before it resamples)."""
  channels = array_HWC.shape[-1]
  pil = Image.fromarray(array_HWC[..., 0] if channels == 1 else array_HWC)  # once for all K
  return np.stack([np.asarray(pil.resize((image_size,) * 2, RESAMPLE,
                                         box=(left, top, left + w, top + h)))
                   for top, left, h, w in boxes_K4.tolist()]).reshape(
                       -1, image_size, image_size, channels)


def crop_resize(image_HWC: np.ndarray, box, size: int) -> np.ndarray:
  """uint8 (H, W, C) -> (size, size, C): the box (top, left, h, w) resized bicubically."""
  return resize_boxes(image_HWC, np.asarray(box, np.float64)[None], size)[0]


def cubic(x, xp=np):
  """PIL's bicubic kernel (a = -0.5), zero outside (-2, 2); xp: numpy or jax.numpy."""
  x = xp.minimum(xp.abs(x), 2)
  return xp.where(x < 1, (1.5 * x - 2.5) * x * x + 1, ((-0.5 * x + 2.5) * x - 4) * x + 2)


def resize_weights(start_B, length_B, in_size: int, out_size: int, extent_B=None, xp=np):
  """(B, out_size, in_size) weights resampling [start, start + length) of each row to
  out_size pixels, as PIL's antialiased bicubic resize (kernel widened when shrinking).
  extent_B: pixels from there on are padding (zero weight, as PIL clips at the edge)."""
  scale_B = (xp.asarray(length_B) / out_size).astype(xp.float32)
  widen_B11 = xp.maximum(scale_B, 1)[:, None, None]
  centers_BO = (xp.asarray(start_B)[:, None].astype(xp.float32)
                + (xp.arange(out_size, dtype=xp.float32) + 0.5) * scale_B[:, None])
  pixels_I = xp.arange(in_size, dtype=xp.float32) + 0.5
  w_BOI = cubic((pixels_I - centers_BO[..., None]) / widen_B11, xp)
  if extent_B is not None:
    w_BOI = xp.where(pixels_I < xp.asarray(extent_B)[:, None, None], w_BOI, 0)
  return w_BOI / w_BOI.sum(-1, keepdims=True)


def crop_resize_array(images_BHWC: np.ndarray, boxes_B4: np.ndarray, size: int) -> np.ndarray:
  """crop_resize for a batch of equal-size images at once (two batched matmuls, in float:
  pixels may differ from PIL's fixed-point result by a level or two)."""
  b, h, w, c = images_BHWC.shape
  boxes = boxes_B4.astype(np.float64)
  rows_BSH = resize_weights(boxes[:, 0], boxes[:, 2], h, size)
  cols_BSW = resize_weights(boxes[:, 1], boxes[:, 3], w, size)
  x_BSWC = np.matmul(rows_BSH, images_BHWC.reshape(b, h, w * c).astype(np.float32)).reshape(
      b, size, w, c)
  x_BSCS = np.matmul(x_BSWC.transpose(0, 1, 3, 2), cols_BSW.transpose(0, 2, 1)[:, None])
  return np.clip(np.rint(x_BSCS.transpose(0, 1, 3, 2)), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Augment:
  """What data.augment does to a training image: crop box kind and flip."""
  random_crop: bool
  flip: bool


AUGMENTS = {
    "none": Augment(random_crop=False, flip=False),  # the deterministic eval resize
    "crop": Augment(random_crop=True, flip=False),
    "crop_flip": Augment(random_crop=True, flip=True),
}


def flips(draws_KD, augment, k: int) -> np.ndarray:
  """bool (K,): which of K crops are mirrored."""
  if not augment.flip:
    return np.zeros(k, bool)
  return draws_KD[:, FLIP] < 0.5


def mirror(crops_KSSC: np.ndarray, draws_KD, augment) -> np.ndarray:
  """The crops, those that flips() picks mirrored in place."""
  flip = flips(draws_KD, augment, len(crops_KSSC))
  crops_KSSC[flip] = crops_KSSC[flip, :, ::-1]
  return crops_KSSC


def augment_batch(images, draws_BD: np.ndarray | None, augment: Augment, image_size: int,
                  crop_scale: tuple[float, float] | None) -> np.ndarray:
  """Images -> uint8 (B, image_size, image_size, C): one uint8 (B, H, W, C) array (resized
  in numpy, vectorised) or a list of uint8 (H_i, W_i, C) (resized one by one with PIL)."""
  sizes_B2 = np.array([image.shape[:2] for image in images], np.int64).reshape(-1, 2)
  boxes = crop_boxes(sizes_B2, draws_BD, augment, image_size, crop_scale)
  if isinstance(images, np.ndarray):
    out = crop_resize_array(images, boxes, image_size)
  else:
    out = np.stack([crop_resize(image, box, image_size) for image, box in zip(images, boxes)])
  return mirror(out, draws_BD, augment)
