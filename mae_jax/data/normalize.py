"""On-device input normalization: batches leave the host as uint8 and are standardized in
the jitted programs with the dataset's per-channel mean and std."""
import jax.numpy as jnp


def normalize(images_BHWC, mean, std):
  """uint8 [0, 255] -> float32, standardized per channel."""
  x = images_BHWC.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
