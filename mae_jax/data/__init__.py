"""Data: random-access sources (Fashion-MNIST IDX, TFDS, image folders, synthetic) and the
resumable host pipeline (grain) that turns them into per-process uint8 batches."""
from mae_jax.data.loaders import LOADERS, load_source
from mae_jax.data.normalize import normalize
from mae_jax.data.pipeline import (ProcessSlice, array_batches, make_eval_batches,
                                   make_train_batches, per_pixel_mean)
from mae_jax.data.source import DatasetError, Source, Subset

__all__ = ["DatasetError", "LOADERS", "ProcessSlice", "Source", "Subset", "array_batches",
           "load_source", "make_eval_batches", "make_train_batches", "normalize",
           "per_pixel_mean"]
