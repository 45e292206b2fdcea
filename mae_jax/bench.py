"""`python -m mae_jax.bench`: the command of mae_jax.tools.bench."""
from mae_jax.tools.bench import run

if __name__ == "__main__":
  run()
