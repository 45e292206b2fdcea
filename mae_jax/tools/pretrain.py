"""The pretraining command: `python train.py`, `mae-train` or `python -m mae_jax.pretrain`.

  python train.py --config configs/default.py --workdir workdirs/demo [--config.FIELD=VALUE ...]

Several processes (docs/launching.md): under srun, mpirun or on a Cloud TPU VM nothing more;
elsewhere add --coordinator_address=HOST:PORT --num_processes=N --process_id=I to each.
A relative --config is read from the current directory.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mae_jax.tools import cli

FLAGS = flags.FLAGS


def flag_failure(error):
  """One `error:` line naming the flag and what it expects (or, for an exception of a
  recipe file's own code, the file and line); exit 2."""
  print(f"error: {cli.flag_error(error, sys.argv)}", file=sys.stderr)
  sys.exit(2)


def define_recipe_flag():
  """--config (a recipe file; configs/default.py unless given, see cli.default_recipe) with
  --config.FIELD overrides; without --config on the command line the default recipe loads
  right here, and a failure is a flag error. Shared by the commands that take a pretraining
  recipe."""
  try:
    config_flags.DEFINE_config_file("config", cli.default_recipe("default.py"), "Recipe file.",
                                    lock_config=True)
  except Exception as e:  # pylint: disable=broad-except (absl, ml_collections, the recipe)
    flag_failure(e)


def define_flags():
  """The command's flags."""
  define_recipe_flag()
  flags.DEFINE_string("workdir", None, "Checkpoints, logs and results go here.", required=True)
  define_distributed_flags()


def define_distributed_flags():
  """How a process joins a multi-process run (mae_jax.train.distributed.Options); shared by
  the commands that train (train.py, mae_jax.evaluate)."""
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "Join jax.distributed: auto = when the flags below, SLURM (srun), Open MPI "
                    "or a Cloud TPU VM say this is one of several processes.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
  flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
  flags.DEFINE_list("local_device_ids", None, "Devices this process drives, e.g. 0,1 (GPUs).")
  flags.DEFINE_integer("init_timeout", 300, "Seconds to wait for all processes to connect.")
  flags.DEFINE_integer("heartbeat_timeout", 100,
                       "Seconds without a heartbeat after which a process counts as dead and "
                       "the others stop with an error.")
  flags.DEFINE_integer("shutdown_timeout", 300,
                       "Seconds a finished process waits at exit for the others to finish.")


def parse_flags(argv):
  """absl's parsing, with a bad flag as one line and exit 2 instead of a usage dump."""
  try:
    argv = FLAGS(argv)
    FLAGS.config.keys()  # the recipe loads lazily: a file that failed to load raises here
    return argv
  except Exception as e:  # pylint: disable=broad-except (absl, ml_collections, the recipe)
    flag_failure(e)


def explicit_fields():
  """The --config.FIELD names given on the command line (smoke=True keeps their values)."""
  return tuple(config_flags.get_override_values(FLAGS["config"]))


def join_distributed():
  """jax.distributed.initialize where the flags or the environment say this process is one
  of several; a bad flag is one line and exit 2. Before anything touches a device."""
  from mae_jax.train import distributed
  try:
    distributed.initialize(distributed.Options(
        FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
        FLAGS.local_device_ids, FLAGS.init_timeout, FLAGS.heartbeat_timeout,
        FLAGS.shutdown_timeout))
  except distributed.DistributedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def exit_on_peer_failure(error):
  """A collective that failed in a multi-process run (most likely a peer died): one line,
  exit 1 at once (at a normal exit JAX would wait shutdown_timeout for the dead process)."""
  from mae_jax.train import distributed
  if not distributed.is_multiprocess():
    raise error
  print(f"error: {distributed.peer_failure(error)}", file=sys.stderr, flush=True)
  os._exit(1)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep library INFO chatter out of the run's output
  join_distributed()
  from mae_jax import trainer
  from mae_jax.data import DatasetError
  from mae_jax.train import distributed, loop
  from mae_jax.train.checkpoints import CheckpointError
  from mae_jax.train.param_dirs import ParamsError
  from mae_jax.train.config import ConfigError
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir, explicit_fields())
  except (ConfigError, DatasetError, ParamsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except CheckpointError as e:
    sys.stdout.flush()
    print(f"error: {e}", file=sys.stderr, flush=True)
    os._exit(2)  # not sys.exit: at exit, asyncio would log each write of a failed save
  except loop.NonFiniteLossError as e:  # the run diverged: not a usage error
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except distributed.PEER_ERRORS as e:
    exit_on_peer_failure(e)


def run():
  """The console script `mae-train`."""
  define_flags()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
