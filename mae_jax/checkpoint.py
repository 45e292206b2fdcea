"""`python -m mae_jax.checkpoint verify DIR`: the command of mae_jax.tools.verify."""
from mae_jax.tools.verify import run

if __name__ == "__main__":
  run()
