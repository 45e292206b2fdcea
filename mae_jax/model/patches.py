"""Patchify / unpatchify: images (B, H, W, C) <-> patch rows (B, N, p*p*C).

The row layout is (p_row, p_col, channel), row-major over the patch grid: the layout of
the reference MAE's `patchify` ("nchpwq->nhwpqc"), so converted decoder heads and targets
line up exactly.
"""
import jax.numpy as jnp


def patchify(x_BHWC, patch_size):
  """(B, H, W, C) -> (B, N, p*p*C) with N = (H/p) * (W/p)."""
  b, h, w, c = x_BHWC.shape
  p = patch_size
  gh, gw = h // p, w // p
  x = x_BHWC.reshape(b, gh, p, gw, p, c)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, gh, gw, p, p, C)
  return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x_BND, patch_size, grid_size, channels):
  """(B, N, p*p*C) -> (B, H, W, C); grid_size = (gh, gw)."""
  b = x_BND.shape[0]
  p = patch_size
  gh, gw = grid_size
  x = x_BND.reshape(b, gh, gw, p, p, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, gh, p, gw, p, C)
  return x.reshape(b, gh * p, gw * p, channels)
