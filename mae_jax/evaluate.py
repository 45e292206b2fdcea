"""`python -m mae_jax.evaluate`: the command of mae_jax.tools.evaluate."""
from mae_jax.tools.evaluate import run

if __name__ == "__main__":
  run()
