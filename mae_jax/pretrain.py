"""`python -m mae_jax.pretrain`: the command of mae_jax.tools.pretrain."""
from mae_jax.tools.pretrain import run

if __name__ == "__main__":
  run()
