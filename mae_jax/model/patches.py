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
  x = jnp.transpose(x_BHWC.reshape(b, h // p, p, w // p, p, c), (0, 1, 3, 2, 4, 5))
  return x.reshape(b, (h // p) * (w // p), p * p * c)  # from (B, H/p, W/p, p, p, C)


def unpatchify(x_BND, patch_size, grid_size, channels):
  """(B, N, p*p*C) -> (B, H, W, C); grid_size = (gh, gw)."""
  (gh, gw), p, b = grid_size, patch_size, x_BND.shape[0]
  x = jnp.transpose(x_BND.reshape(b, gh, gw, p, p, channels), (0, 1, 3, 2, 4, 5))
  return x.reshape(b, gh * p, gw * p, channels)  # from (B, gh, p, gw, p, C)
