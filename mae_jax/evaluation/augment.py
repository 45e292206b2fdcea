"""On-device augmentation for fine-tuning (jnp from an explicit key, inside the jitted step):
RandAugment as timm applies it, its geometric ops composed into one affine map and resampled
once (equalize and invert left out); mixup / cutmix; label-smoothed targets.
"""
import functools
import math

import jax
import jax.numpy as jnp


def _identity(x, *_):
  return x


def _autocontrast(x, *_):
  lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
  return jnp.where(hi > lo, (x - lo) / jnp.maximum(hi - lo, 1e-6), x)


def _brightness(x, level, sign):
  return jnp.clip(x * (1 + sign * 0.9 * level), 0, 1)


def _contrast(x, level, sign):
  mean = x.mean()
  return jnp.clip(mean + (1 + sign * 0.9 * level) * (x - mean), 0, 1)


def _sharpness(x, level, sign):
  """Blend with PIL's SMOOTH filter (3x3, centre weight 5): factor > 1 sharpens."""
  kernel = jnp.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], x.dtype) / 13
  padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = x.shape[:2]
  blurred = sum(kernel[i, j] * padded[i:i + h, j:j + w] for i in range(3) for j in range(3))
  return jnp.clip(blurred + (1 + sign * 0.9 * level) * (x - blurred), 0, 1)


def _solarize(x, level, *_):
  return jnp.where(x >= 1 - level, 1 - x, x)


def _posterize(x, level, *_):
  """Keep 8 - round(4 * level) bits of each 8-bit pixel."""
  step = 2.0**jnp.round(4 * level)
  return jnp.floor(x * 255 / step) * step / 255


COLOR_OPS = (_identity, _autocontrast, _brightness, _contrast, _sharpness, _solarize,
             _posterize)
NUM_GEOMETRIC = 5  # rotate, shear x / y, translate x / y
NUM_OPS = len(COLOR_OPS) + NUM_GEOMETRIC


def _geometric(op, level, sign, size):
  """The affine map (3, 3) of op, output -> input of (x, y, 1) about the image centre: the
  identity for the colour ops."""
  t, shear = sign * level * math.radians(30), sign * level * 0.3
  shift = sign * level * 0.45 * size
  matrices = jnp.array([[[jnp.cos(t), -jnp.sin(t), 0], [jnp.sin(t), jnp.cos(t), 0], [0, 0, 1]],
                        [[1, shear, 0], [0, 1, 0], [0, 0, 1]],
                        [[1, 0, 0], [shear, 1, 0], [0, 0, 1]],
                        [[1, 0, shift], [0, 1, 0], [0, 0, 1]],
                        [[1, 0, 0], [0, 1, shift], [0, 0, 1]]], jnp.float32)
  index = op - len(COLOR_OPS)
  return jnp.where(index >= 0, matrices[jnp.maximum(index, 0)], jnp.eye(3))


def warp(x_HWC, matrix_33):
  """Resample x at matrix @ (x, y, 1) (centred output coordinates), bilinear, zero fill."""
  h, w, _ = x_HWC.shape
  cy, cx = (h - 1) / 2, (w - 1) / 2
  ys, xs = jnp.meshgrid(jnp.arange(h) - cy, jnp.arange(w) - cx, indexing="ij")
  src = jnp.einsum("ij,jhw->ihw", matrix_33,
                   jnp.stack([xs, ys, jnp.ones_like(xs)]).astype(jnp.float32))
  coords = [src[1] + cy, src[0] + cx]
  channel = lambda c: jax.scipy.ndimage.map_coordinates(c, coords, order=1, mode="constant",
                                                         cval=0.0)
  return jax.vmap(channel, in_axes=-1, out_axes=-1)(x_HWC)


def _augment_one(x_HWC, rng, *, num_ops, level, prob):
  matrix = jnp.eye(3)
  for _ in range(num_ops):
    rng, k_op, k_sign, k_apply = jax.random.split(rng, 4)
    op = jax.random.randint(k_op, (), 0, NUM_OPS)
    op = jnp.where(jax.random.bernoulli(k_apply, prob), op, 0)  # 0: identity
    sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
    color = jnp.where(op < len(COLOR_OPS), op, 0)
    x_HWC = jax.lax.switch(color, COLOR_OPS, x_HWC, level, sign)
    matrix = matrix @ _geometric(op, level, sign, x_HWC.shape[1])
  return warp(x_HWC, matrix)


def rand_augment(images_BHWC, rng, *, num_ops, magnitude, prob):
  """RandAugment-style ops on float images on [0, 1], (B, H, W, C) -> same; each image gets
  its own draws. magnitude: 0..10 (timm's scale); num_ops 0 returns the images as they are."""
  if num_ops == 0:
    return images_BHWC
  fn = functools.partial(_augment_one, num_ops=num_ops, level=magnitude / 10, prob=prob)
  return jax.vmap(fn)(images_BHWC, jax.random.split(rng, images_BHWC.shape[0]))


def smooth_targets(labels_B, num_classes, smoothing):
  """One-hot targets (B, C) with label smoothing: 1 - s + s / C on the label, s / C elsewhere."""
  onehot = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.float32)
  return onehot * (1 - smoothing) + smoothing / num_classes


def cutmix_box(rng, lam, height, width):
  """A box mask (H, W) of area about (1 - lam) * H * W at a uniform centre (clipped at the
  border), as the reference's rand_bbox."""
  cut = jnp.sqrt(1 - lam)
  ch, cw = ((jnp.floor(n * cut) // 2).astype(jnp.int32) for n in (height, width))
  ky, kx = jax.random.split(rng)
  cy, cx = jax.random.randint(ky, (), 0, height), jax.random.randint(kx, (), 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return ((rows >= cy - ch) & (rows < cy + ch) & (cols >= cx - cw) & (cols < cx + cw))


def mixup_cutmix(images_BHWC, targets_BC, rng, *, mixup_alpha, cutmix_alpha, prob,
                 switch_prob):
  """timm's batch-mode Mixup: with probability `prob`, mix the batch with its reverse,
  by mixup (lam ~ Beta(mixup_alpha)) or, with probability `switch_prob` where both are on,
  cutmix (a box of the reversed batch pasted in; lam = the area left). Targets mix by lam."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images_BHWC, targets_BC
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  both = mixup_alpha > 0 and cutmix_alpha > 0
  use_cutmix = jax.random.bernoulli(k_switch, switch_prob) if both else cutmix_alpha > 0
  flipped = images_BHWC[::-1]
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  mixed = lam_mix * images_BHWC + (1 - lam_mix) * flipped
  if cutmix_alpha > 0:
    h, w = images_BHWC.shape[1:3]
    box = cutmix_box(k_box, jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha), h, w)
    cut = jnp.where(box[None, :, :, None], flipped, images_BHWC)
    lam_cut = 1 - box.sum() / (h * w)
    mixed = jnp.where(use_cutmix, cut, mixed)
    lam_mix = jnp.where(use_cutmix, lam_cut, lam_mix)
  apply = jax.random.bernoulli(k_apply, prob)
  lam = jnp.where(apply, lam_mix, 1.0)
  out = jnp.where(apply, mixed, images_BHWC)
  return out, lam * targets_BC + (1 - lam) * targets_BC[::-1]
