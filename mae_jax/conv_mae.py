"""`python -m mae_jax.conv_mae`: the command of mae_jax.tools.conv_mae."""
from mae_jax.tools.conv_mae import run

if __name__ == "__main__":
  run()
