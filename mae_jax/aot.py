"""`python -m mae_jax.aot`: the command of mae_jax.tools.aot."""
from mae_jax.tools.aot import run

if __name__ == "__main__":
  run()
