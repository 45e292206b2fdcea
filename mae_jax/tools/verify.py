"""`python -m mae_jax.checkpoint verify DIR`: re-read every
file of every checkpoint step in DIR (a train.py workdir or its checkpoints/, local or gs://)
against its manifest. Exit 0: all good; 1: a damaged step (named); 2: nothing to verify.
"""
import argparse
import sys

from mae_jax import paths
from mae_jax.train import checkpoints


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.checkpoint",
      description="verify DIR: re-read every file of every checkpoint step in DIR (a "
                  "train.py workdir or its checkpoints/, local or gs://) against its manifest")
  parser.add_argument("command", choices=["verify"])
  parser.add_argument("directory")
  args = parser.parse_args(argv)
  try:
    directory = args.directory
    if paths.isdir(paths.join(directory, "checkpoints")):
      directory = paths.join(directory, "checkpoints")
    if not checkpoints.complete_steps(directory):
      print(f"error: {paths.absolute(directory)}: no complete checkpoint step", file=sys.stderr)
      return 2
    results = checkpoints.verify_all(directory)
  except (paths.PathError, OSError) as e:
    print(f"error: {args.directory}: {checkpoints.gcs_reason(e)}", file=sys.stderr)
    return 2
  for step, problem in results:
    print(f"step {step}: {problem or 'ok'}")
  return 1 if any(p and not p.startswith("no manifest") for _, p in results) else 0


def run():
  sys.exit(main())


if __name__ == "__main__":
  run()
