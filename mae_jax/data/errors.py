"""The one error of mae_jax.data."""


class DatasetError(ValueError):
  """A dataset, file or data field is missing or malformed (one line saying which)."""
