"""Masking: static K, partition of patches, restore, and what each strategy means."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.model import masking


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("strategy", sorted(masking.STRATEGIES))
def test_exactly_k_visible_and_partition(strategy, ratio):
  n, grid = 64, (8, 8)
  k = masking.num_visible(n, ratio)
  assert k == int(n * (1 - ratio))
  noise = masking.make_noise(strategy, jax.random.key(0), 3, grid, ratio)
  keep, mask, restore = map(np.asarray, masking.mask_from_noise(noise, k))
  assert keep.shape == (3, k) and mask.shape == (3, n)
  for b in range(3):
    assert mask[b].sum() == n - k
    assert len(set(keep[b])) == k
    np.testing.assert_array_equal(mask[b, keep[b]], 0)  # kept = visible; the rest masked


def test_given_noise_gives_argsort_mask():
  noise = np.random.default_rng(0).uniform(size=(4, 16)).astype(np.float32)
  keep, mask, restore = map(np.asarray, masking.mask_from_noise(jnp.asarray(noise), 4))
  order = np.argsort(noise, axis=1)
  np.testing.assert_array_equal(keep, order[:, :4])
  expected = np.ones((4, 16))
  np.put_along_axis(expected, order[:, :4], 0, axis=1)
  np.testing.assert_array_equal(mask, expected)


def test_restore_after_shuffle_is_identity():
  noise = jax.random.uniform(jax.random.key(1), (2, 10))
  x = jnp.arange(2 * 10 * 3, dtype=jnp.float32).reshape(2, 10, 3)
  shuffle = jnp.argsort(noise, axis=1)
  _, _, restore = masking.mask_from_noise(noise, 3)
  shuffled = masking.gather_tokens(x, shuffle)
  np.testing.assert_array_equal(masking.gather_tokens(shuffled, restore), x)


def test_random_is_different_per_sample_and_key():
  a = masking.make_noise("random", jax.random.key(0), 2, (4, 4), 0.75)
  b = masking.make_noise("random", jax.random.key(1), 2, (4, 4), 0.75)
  assert not np.allclose(a[0], a[1]) and not np.allclose(a, b)


def test_grid_keeps_every_other_row_and_column():
  noise = masking.make_noise("grid", jax.random.key(0), 2, (6, 6), 0.75)
  _, mask, _ = masking.mask_from_noise(noise, masking.num_visible(36, 0.75))
  visible = (1 - np.asarray(mask[0])).reshape(6, 6)
  expected = np.zeros((6, 6))
  expected[::2, ::2] = 1
  np.testing.assert_array_equal(visible, expected)
  np.testing.assert_array_equal(mask[0], mask[1])  # a fixed pattern


def test_center_masks_the_middle():
  noise = masking.make_noise("center", jax.random.key(0), 1, (8, 8), 0.25)
  _, mask, _ = masking.mask_from_noise(noise, masking.num_visible(64, 0.25))
  masked = np.asarray(mask[0]).reshape(8, 8)
  assert masked.sum() == 16
  np.testing.assert_array_equal(masked[2:6, 2:6], 1)  # the central 4x4 block
  assert masked[0].sum() == 0 and masked[:, 0].sum() == 0  # border visible


def _blockiness(mask_HW):
  """Fraction of 4-neighbour pairs with the same mask value."""
  same = (mask_HW[1:] == mask_HW[:-1]).sum() + (mask_HW[:, 1:] == mask_HW[:, :-1]).sum()
  return same / (mask_HW[1:].size + mask_HW[:, 1:].size)


def test_block_masks_contiguous_regions():
  grid, n, ratio = (16, 16), 256, 0.5
  k = masking.num_visible(n, ratio)
  scores = {}
  for strategy in ("block", "random"):
    noise = masking.make_noise(strategy, jax.random.key(3), 16, grid, ratio)
    _, mask, _ = masking.mask_from_noise(noise, k)
    scores[strategy] = np.mean([_blockiness(np.asarray(m).reshape(grid)) for m in mask])
  assert scores["random"] < 0.6 < 0.75 < scores["block"]
