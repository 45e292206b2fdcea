"""Patch masking as one mechanism: a noise field (B, N), argsorted, keeps the K lowest.

Every strategy only shapes the noise, so the visible count K is static and jit never
recompiles. With the `random` strategy and a given noise, the result is exactly the
reference MAE's `random_masking` (Sec. 3, "Masking").
"""
import math

import jax
import jax.numpy as jnp
import numpy as np


def num_visible(num_patches, mask_ratio):
  """K = int(N * (1 - mask_ratio)), the reference's rounding."""
  return int(num_patches * (1 - mask_ratio))


def random_noise(rng, batch, grid_size, mask_ratio):
  """i.i.d. uniform noise: every patch equally likely to be kept."""
  del mask_ratio
  return jax.random.uniform(rng, (batch, grid_size[0] * grid_size[1]))


def block_noise(rng, batch, grid_size, mask_ratio, block=2):
  """A coarse uniform field upsampled by `block`, plus small jitter: the patches of a block
  share a noise level, so they are masked together (large holes); the jitter breaks ties."""
  del mask_ratio
  gh, gw = grid_size
  coarse_rng, jitter_rng = jax.random.split(rng)
  ch, cw = math.ceil(gh / block), math.ceil(gw / block)
  coarse = jax.random.uniform(coarse_rng, (batch, ch, cw))
  fine = jnp.repeat(jnp.repeat(coarse, block, axis=1), block, axis=2)[:, :gh, :gw]
  jitter = 1e-3 * jax.random.uniform(jitter_rng, (batch, gh, gw))
  return (fine + jitter).reshape(batch, gh * gw)


def grid_noise(rng, batch, grid_size, mask_ratio):
  """A fixed regular pattern: keep one patch of every s x s cell, s = round(1/sqrt(1-r)); at
  ratio 0.75 the patches at even (row, col), the paper's grid-wise sampling. Patches outside
  the pattern follow in raster order if K asks for more."""
  del rng
  gh, gw = grid_size
  stride = max(1, round(1 / math.sqrt(1 - mask_ratio)))
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  off_pattern = ((rows % stride) != 0) | ((cols % stride) != 0)
  order = np.arange(gh * gw) / (gh * gw)  # raster tie-break in [0, 1)
  noise = off_pattern.reshape(-1) + order
  return jnp.broadcast_to(jnp.asarray(noise, jnp.float32), (batch, gh * gw))


def center_noise(rng, batch, grid_size, mask_ratio):
  """Mask the central region: noise = -(distance to the centre), so the border is kept."""
  del rng, mask_ratio
  gh, gw = grid_size
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  dist = np.hypot(rows - (gh - 1) / 2, cols - (gw - 1) / 2).reshape(-1)
  noise = -dist + 1e-6 * np.arange(gh * gw)  # deterministic tie-break
  return jnp.broadcast_to(jnp.asarray(noise, jnp.float32), (batch, gh * gw))


STRATEGIES = {"random": random_noise, "block": block_noise, "grid": grid_noise,
              "center": center_noise}


def make_noise(strategy, rng, batch, grid_size, mask_ratio):
  """(B, N) noise for a strategy named in STRATEGIES."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown mask strategy {strategy!r}; valid: {sorted(STRATEGIES)}")
  return STRATEGIES[strategy](rng, batch, grid_size, mask_ratio)


def mask_from_noise(noise_BN, num_keep):
  """Argsort the noise; keep the K lowest.

  Returns:
    keep_idx_BK: (B, K) indices of the visible patches, in ascending-noise order.
    mask_BN: (B, N) float32, 0 = visible, 1 = masked, in the original patch order.
    restore_idx_BN: (B, N) argsort of the shuffle: gathering [visible; masked] tokens
      with it puts every token back at its patch position.
  """
  shuffle_idx_BN = jnp.argsort(noise_BN, axis=1)
  restore_idx_BN = jnp.argsort(shuffle_idx_BN, axis=1)
  keep_idx_BK = shuffle_idx_BN[:, :num_keep]
  mask_BN = (restore_idx_BN >= num_keep).astype(jnp.float32)
  return keep_idx_BK, mask_BN, restore_idx_BN


def gather_tokens(x_BND, idx_BK):
  """x[b, idx[b, k], :] -> (B, K, D)."""
  return jnp.take_along_axis(x_BND, idx_BK[:, :, None], axis=1)
