"""Pretrain a Masked Autoencoder (mae_jax.tools.pretrain; installed as `mae-train` too).

  python train.py --config configs/default.py --workdir workdirs/demo [--config.FIELD=VALUE ...]

Several processes (docs/launching.md): under srun, mpirun or on a Cloud TPU VM nothing more;
elsewhere add --coordinator_address=HOST:PORT --num_processes=N --process_id=I to each.
"""
from mae_jax.tools import pretrain

if __name__ == "__main__":
  pretrain.run()
