"""`python -m mae_jax.visualize`: the command of mae_jax.tools.visualize."""
from mae_jax.tools.visualize import run

if __name__ == "__main__":
  run()
