"""`python -m mae_jax.prepare`: the command of mae_jax.tools.prepare."""
from mae_jax.tools.prepare import run

if __name__ == "__main__":
  run()
