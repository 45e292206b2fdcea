"""`python -m mae_jax.convert`: the command of mae_jax.tools.convert."""
from mae_jax.tools.convert import run

if __name__ == "__main__":
  run()
