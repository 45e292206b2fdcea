"""Command lines and tooling; each is also `python -m mae_jax.<command>` and a console
script.

  pretrain    train.py: MAE pretraining (mae_jax.trainer)
  evaluate    kNN, linear probe, fine-tuning of an encoder
  bench       throughput and MFU of the training program
  aot, hlo    the training program compiled for a TPU slice on any host; its collectives
  sweep       the ablation runner: points, tables, plots
  conv_mae    the convolutional masked-autoencoder baseline
  prepare     image folders / TFDS -> sharded ArrayRecord JPEGs
  convert     official / Hugging Face weights in and out
  visualize   reconstruction grids of a model
  verify      re-read every checkpoint of a workdir against its manifest
"""
from mae_jax import paths
from mae_jax.tools import cli

# A command's process, before any of them starts JAX or touches a path.
cli.quiet_libtpu_without_tpu()
paths.configure()
