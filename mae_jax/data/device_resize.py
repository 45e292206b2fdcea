"""Training crops resized on the accelerator (data.resize='device'; docs/benchmarks.md): the
host only cuts each box with the pixels its bicubic kernel reaches into a bucket, and the
accelerator resizes it with PIL's weights as two batched matmuls (a region too large for
the bucket is resized on the host and sent as an aligned box, which that copies unchanged).

Host batch: region uint8 (B, P, P, C), box float32 (B, 4) (top, left, height, width in the
region's pixels), extent int32 (B, 2) (the region's valid height and width; the rest is
padding), flip bool (B,), label int32 (B,)."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.data import augment as augment_lib

# Bucket side / image_size: every crop of a 384 px prepared image at 224 px fits; its square
# is the upload per sample (602 KB at 224 px) and the resize's cost.
BUCKET_RATIO = 2
KEYS = ("region", "box", "extent", "flip")  # a device-resize host batch's keys (and label)


def resolve(resize: str, platform: str) -> str:
  """data.resize for devices of `platform`: 'auto' is 'host' on CPU (Pillow's fixed-point
  resize is cheaper on the same cores), else 'device' (host cores are the limit)."""
  if resize != "auto":
    return resize
  return "host" if platform == "cpu" else "device"


def bucket_side(image_size: int) -> int:
  return BUCKET_RATIO * image_size


def span(start: float, length: float, size: int, out_size: int) -> tuple[int, int]:
  """[lo, hi) of the pixels of an axis of `size` that resampling [start, start + length) to
  out_size reaches (the kernel's support, widened when shrinking, plus one pixel)."""
  support = 2 * max(length / out_size, 1.0)
  return max(math.floor(start - support) - 1, 0), min(math.ceil(start + length + support) + 1, size)


def cut_regions(array_HWC: np.ndarray, boxes_K4, image_size: int, out_KPPC: np.ndarray):
  """Cut each box (K, 4) of one image into its region out_KPPC[k] (zeros past it); returns
  the boxes in their regions' pixels, float32 (K, 4), and the extents, int32 (K, 2)."""
  height, width, _ = array_HWC.shape
  side = out_KPPC.shape[1]
  boxes, extents = np.zeros((len(boxes_K4), 4), np.float32), np.zeros((len(boxes_K4), 2), np.int32)
  for k, (top, left, h, w) in enumerate(np.asarray(boxes_K4, np.float64).tolist()):
    r0, r1 = span(top, h, height, image_size)
    c0, c1 = span(left, w, width, image_size)
    if max(r1 - r0, c1 - c0) > side:  # too large for the bucket: resized here instead
      out_KPPC[k, :image_size, :image_size] = augment_lib.resize_boxes(
          array_HWC, np.array([[top, left, h, w]]), image_size)[0]
      boxes[k], extents[k] = (0, 0, image_size, image_size), (image_size, image_size)
      continue  # the accelerator's resize of an aligned box of the same size copies it
    out_KPPC[k, :r1 - r0, :c1 - c0] = array_HWC[r0:r1, c0:c1]
    boxes[k], extents[k] = (top - r0, left - c0, h, w), (r1 - r0, c1 - c0)
  return boxes, extents


def resize_regions(region_BPPC, box_B4, extent_B2, flip_B, image_size: int):
  """uint8 (B, S, S, C): each box of its region resized with PIL's bicubic weights (horizontal
  pass, round, vertical pass, round), mirrored where flip_B; jnp, inside a jitted program."""
  _, p_h, p_w, _ = region_BPPC.shape
  hi = jax.lax.Precision.HIGHEST  # float32 matmuls: no TF32 / bf16 passes on GPU or TPU
  cols_BSW = augment_lib.resize_weights(box_B4[:, 1], box_B4[:, 3], p_w, image_size,
                                        extent_B2[:, 1], xp=jnp)
  x_BHSC = jnp.einsum("bsw,bhwc->bhsc", cols_BSW, region_BPPC.astype(jnp.float32), precision=hi)
  x_BHSC = jnp.clip(jnp.floor(x_BHSC + 0.5), 0, 255)
  rows_BTH = augment_lib.resize_weights(box_B4[:, 0], box_B4[:, 2], p_h, image_size,
                                        extent_B2[:, 0], xp=jnp)
  out_BTSC = jnp.einsum("bth,bhsc->btsc", rows_BTH, x_BHSC, precision=hi)
  out_BTSC = jnp.clip(jnp.floor(out_BTSC + 0.5), 0, 255).astype(jnp.uint8)
  return jnp.where(flip_B[:, None, None, None], out_BTSC[:, :, ::-1], out_BTSC)


def crops_of(batch: dict, image_size: int) -> dict:
  """A device-resize batch -> the host path's {'image': uint8 (B, S, S, C), 'label'}."""
  image = resize_regions(batch["region"], batch["box"], batch["extent"], batch["flip"], image_size)
  return {"image": image, **{k: v for k, v in batch.items() if k not in KEYS}}


def regions_batch(k: int, image_size: int, channels: int) -> dict:
  """Empty host buffers for k crops: region zeros (k, P, P, C), box, extent, flip."""
  side = bucket_side(image_size)
  return {"region": np.zeros((k, side, side, channels), np.uint8),
          "box": np.zeros((k, 4), np.float32), "extent": np.zeros((k, 2), np.int32),
          "flip": np.zeros(k, bool)}
