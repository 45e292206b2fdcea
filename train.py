"""Pretrain a Masked Autoencoder.

  python train.py --config configs/default.py --workdir workdirs/demo [--config.FIELD=VALUE ...]
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Recipe file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, logs and results go here.", required=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep library INFO chatter out of the run's output
  from mae_jax import trainer
  from mae_jax.config import ConfigError
  from mae_jax.convert import ConversionError
  from mae_jax.data import DatasetError
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, DatasetError, ConversionError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
