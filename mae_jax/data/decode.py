"""Decode only what a training crop needs, from an encoded image (a file or its bytes): boxes
drawn on the header's size, then a JPEG decoded once for all its crops, scaled down in the
DCT domain (PIL's `draft`) as far as its smallest crop keeps `image_size` pixels per side.
With draft off the crops are exactly those of `decode` then augment.augment_batch."""
import io
import math

import numpy as np
from PIL import Image

try:
  import simplejpeg
except ImportError:  # an install without it (a GPU machine off the network): PIL decodes all
  simplejpeg = None

from mae_jax.data import augment as augment_lib
from mae_jax.data.errors import DatasetError

resize_boxes = augment_lib.resize_boxes  # defined with the other resizes; kept here by name
PIL_MODES = {1: "L", 3: "RGB"}  # data.channels -> PIL mode decoded to
JPEG_MAGIC = b"\xff\xd8\xff"
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit gray (PIL: "I" from some PNGs)


def open_image(encoded) -> Image.Image:
  """A lazily decoded PIL image from a path or encoded bytes (only the header is read)."""
  return Image.open(io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded)


def to_array(image: Image.Image, channels: int) -> np.ndarray:
  """uint8 (H, W, channels) of any PIL mode: 16-bit gray scaled (PIL's convert would clip),
  float taken to be on [0, 1], alpha dropped, gray <-> RGB as PIL converts."""
  if image.mode in WIDE_MODES:
    image = Image.fromarray(np.clip(np.round(np.asarray(image) / 257), 0, 255).astype(np.uint8))
  elif image.mode == "F":
    image = Image.fromarray(np.clip(np.round(np.asarray(image) * 255), 0, 255).astype(np.uint8))
  return np.atleast_3d(np.asarray(image.convert(PIL_MODES[channels])))  # "L": (H, W)


def decode(encoded, channels: int, name: str = "image") -> np.ndarray:
  """The whole image as uint8 (H, W, channels); DatasetError naming `name` if it cannot."""
  try:
    with open_image(encoded) as image:
      image.load()
      return to_array(image, channels)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
    raise DatasetError(f"{name}: cannot decode image: {type(e).__name__}: {e}") from e


def crop_boxes(height: int, width: int, draws_KD, augment, image_size: int, crop_scale):
  """Boxes (K, 4) of K crops of one (height, width) image (draws_KD None: the eval box)."""
  k = 1 if draws_KD is None else len(draws_KD)
  sizes_K2 = np.tile(np.array([[height, width]], np.int64), (k, 1))
  return augment_lib.crop_boxes(sizes_K2, draws_KD, augment, image_size, crop_scale)


def draft_size(width: int, height: int, boxes_K4, image_size: int):
  """The size to ask PIL's draft for: the image shrunk as far as every box keeps at least
  image_size pixels per side (None: no shrinking possible)."""
  factor = float(np.min(boxes_K4[:, 2:])) / image_size
  if factor < 2:
    return None
  return math.ceil(width / factor), math.ceil(height / factor)


def draft_scale(width: int, height: int, wanted) -> int:
  """The DCT scale (1, 2, 4 or 8) PIL's draft picks for a request of `wanted` (w, h)."""
  if wanted is None:
    return 1
  most = min(width // wanted[0], height // wanted[1])
  return next(s for s in (8, 4, 2, 1) if s <= most)


def turbo_for_boxes(jpeg: bytes, draws_KD, augment, image_size: int, crop_scale, draft: bool):
  """decode_for_boxes of JPEG bytes to RGB by libjpeg-turbo (about 1.6x PIL's decode and
  copy; the same pixels), or None where it cannot (CMYK, damage: PIL then tries)."""
  try:
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(jpeg)
    if colorspace not in ("YCbCr", "Gray", "RGB"):
      return None
    boxes = crop_boxes(height, width, draws_KD, augment, image_size, crop_scale)
    s = draft_scale(width, height, draft_size(width, height, boxes, image_size) if draft else None)
    array = simplejpeg.decode_jpeg(jpeg, "RGB", min_height=-(-height // s),
                                   min_width=-(-width // s))
  except ValueError:
    return None
  return array, boxes * np.array([array.shape[0] / height, array.shape[1] / width] * 2)


def jpeg_bytes(encoded) -> bytes | None:
  """The bytes of a JPEG (a path or bytes), None for other formats."""
  if isinstance(encoded, str):
    with open(encoded, "rb") as f:
      encoded = f.read()
  return encoded if encoded[:3] == JPEG_MAGIC else None


def decode_for_boxes(encoded, draws_KD, augment, image_size: int, crop_scale, channels: int,
                     draft: bool, name: str = "image"):
  """(decoded uint8 (h, w, channels), float boxes (K, 4) in its pixels) for K crops of one
  encoded image, decoded as small as draft allows; DatasetError naming `name` if it cannot."""
  try:
    jpeg = jpeg_bytes(encoded) if channels == 3 and simplejpeg is not None else None
  except OSError as e:
    raise DatasetError(f"{name}: cannot decode image: {type(e).__name__}: {e}") from e
  if jpeg is not None:
    done = turbo_for_boxes(jpeg, draws_KD, augment, image_size, crop_scale, draft)
    if done is not None:
      return done
    encoded = jpeg
  try:
    with open_image(encoded) as image:
      width, height = image.size
      boxes = crop_boxes(height, width, draws_KD, augment, image_size, crop_scale)
      wanted = draft_size(width, height, boxes, image_size) if draft else None
      if wanted is not None and image.format == "JPEG":
        image.draft(PIL_MODES[channels], wanted)
      image.load()
      array = to_array(image, channels)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
    raise DatasetError(f"{name}: cannot decode image: {type(e).__name__}: {e}") from e
  return array, boxes * np.array([array.shape[0] / height, array.shape[1] / width] * 2)


def decode_crops(encoded, draws_KD, augment, image_size: int, crop_scale, channels: int,
                 draft: bool, name: str = "image") -> np.ndarray:
  """K crops of one encoded image, resized and flipped: uint8 (K, image_size, image_size,
  channels); DatasetError naming `name` if it cannot be decoded."""
  array, boxes = decode_for_boxes(encoded, draws_KD, augment, image_size, crop_scale,
                                  channels, draft, name)
  return augment_lib.mirror(resize_boxes(array, boxes, image_size), draws_KD, augment)


def runs(indices_B) -> list[tuple[int, int]]:
  """[(start, stop)] of the runs of equal consecutive indices (repeated sampling's groups)."""
  bounds = [0, *(np.flatnonzero(np.diff(indices_B)) + 1).tolist(), len(indices_B)]
  return list(zip(bounds[:-1], bounds[1:])) if len(indices_B) else []
