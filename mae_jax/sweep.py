"""`python -m mae_jax.sweep`: the command of mae_jax.tools.sweep."""
from mae_jax.tools.sweep import run

if __name__ == "__main__":
  run()
