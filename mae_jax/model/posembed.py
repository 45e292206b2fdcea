"""Fixed 2D sin-cos position embeddings (MAE paper, Sec. A.1).

The first half of the width encodes the patch's column (x), the second its row (y), each as
the 1D transformer encoding [sin(pos * w_k), cos(pos * w_k)], w_k = 1 / 10000^(k / (D/4));
the first slot is the cls token's, all zeros: the reference's table, so its converted weights
and our constants are identical.
"""
import numpy as np


def sincos_1d(embed_dim, positions):
  """positions: (M,) -> (M, embed_dim) as [sin | cos]."""
  if embed_dim % 2:
    raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
  omega = 1.0 / 10000**(np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
  angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim, grid_size):
  """(1 + gh*gw, D) float32 table, the cls slot first; grid_size = (gh, gw)."""
  if embed_dim % 4:
    raise ValueError(f"2D sin-cos embedding width must be divisible by 4, got {embed_dim}")
  gh, gw = grid_size
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  table = np.concatenate(
      [sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
  return np.concatenate([np.zeros((1, embed_dim)), table], axis=0).astype(np.float32)
