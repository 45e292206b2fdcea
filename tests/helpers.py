"""What the test files share, defined once: the tiny model, the tiny run config (as a
ConfigDict, as dotted overrides and as train.py flags), generated data, and in-process
runs of the command lines.

A test that needs another size changes only the fields it cares about, e.g.
`model_fields(depth=2, num_heads=4)` or `synthetic_config(num_steps=2)`, so what it
varies is visible where it is used.
"""
import contextlib
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A ViT MAE of a few thousand parameters on 16 x 16 images (16 patches of 4 x 4): compiles
# in seconds, steps take milliseconds.
TINY_MODEL = dict(image_size=16, patch_size=4, channels=3, width=32, depth=1, num_heads=2,
                  decoder_width=32, decoder_depth=1, decoder_heads=2)
_DATA_FIELDS = ("image_size", "channels")  # in a run config these live in config.data


def model_fields(**changes):
  """MaskedAutoencoder keyword arguments: TINY_MODEL with `changes`."""
  unknown = set(changes) - set(TINY_MODEL) - {"mlp_ratio", "mask_ratio", "norm_pix_loss",
                                               "dtype", "mask_strategy"}
  assert not unknown, f"not a model field here: {sorted(unknown)}"
  return {**TINY_MODEL, **changes}


def tiny_model(**changes):
  """The tiny MaskedAutoencoder (its fields: model_fields(**changes))."""
  from mae_jax.model.mae import MaskedAutoencoder  # pylint: disable=g-import-not-at-top
  return MaskedAutoencoder(**model_fields(**changes))


def as_overrides(fields):
  """Model fields as dotted run-config overrides (image_size, channels -> data.*)."""
  return {f"{'data' if k in _DATA_FIELDS else 'model'}.{k}": v for k, v in fields.items()}


# The tiny run: TINY_MODEL on 64 synthetic images, batch 16. The channels stay the recipe's.
TINY = {
    "data.name": "synthetic", "data.synthetic_size": 64,
    **as_overrides({k: v for k, v in TINY_MODEL.items() if k != "channels"}),
    "batch_size": 16, "optim.warmup_steps": 2, "log_every_steps": 1, "eval_batch_size": 32,
    "knn_every_epochs": 0.0,  # the recipe's kNN monitor off: tests that want it set it
}


def set_fields(config, fields):
  """Set dotted `fields` ({"model.width": 32, "batch_size": 8}) on `config`, in place."""
  with config.unlocked():
    for key, value in fields.items():
      *parents, leaf = key.split(".")
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def tiny_config(overrides=None):
  """configs/default.py with TINY and then `overrides` (dotted keys) applied."""
  from configs.default import get_config  # pylint: disable=g-import-not-at-top
  return set_fields(get_config(), {**TINY, **(overrides or {})})


def synthetic_config(**overrides):
  """The tiny run of 6 steps, checkpoints every 2; `overrides` are top-level fields."""
  return tiny_config({"num_steps": 6, "checkpoint_every_steps": 2, **overrides})


def config_flags(fields):
  """Dotted overrides as train.py / evaluate flags: ["--config.model.width=32", ...]."""
  return [f"--config.{k}={v}" for k, v in fields.items()]


# --- Generated data ------------------------------------------------------------------------


def random_batches(n, batch=16, size=16, channels=3, seed=0):
  """`n` host batches of uniform random uint8 images (labels 0), as the pipeline yields."""
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8),
           "label": np.zeros(batch, np.int32)} for _ in range(n)]


NUM_CLASSES = 4  # of the pattern images: chance is 0.25


def pattern(label, rng, size=16):
  """A gray image of class `label`: horizontal stripes, vertical stripes, a checkerboard
  or a blob, at a random phase / position, with pixel noise."""
  y, x = np.mgrid[:size, :size]
  phase = rng.integers(0, 4)
  if label == 0:
    image = (y + phase) // 2 % 2
  elif label == 1:
    image = (x + phase) // 2 % 2
  elif label == 2:
    image = ((x + phase) // 2 + (y + phase) // 2) % 2
  else:
    cy, cx = rng.uniform(5, 11, 2)
    image = np.exp(-((y - cy)**2 + (x - cx)**2) / 12)
  image = 0.15 + 0.7 * image + rng.normal(0, 0.05, (size, size))
  return np.clip(image * 255, 0, 255).astype(np.uint8)


def write_pattern_folder(root, per_class={"train": 32, "test": 16}):
  """root/<split>/class<k>/<i>.png of pattern images: the layout data.name=folder reads."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, n in per_class.items():
    for label in range(NUM_CLASSES):
      directory = root / split / f"class{label}"
      directory.mkdir(parents=True)
      for i in range(n):
        Image.fromarray(pattern(label, rng)).save(directory / f"{i}.png")


def pretrain_on_patterns(root, **overrides):
  """A 4-step pretraining (depth 2, checkpoints at steps 2 and 4 unless `overrides` say
  otherwise) on a pattern folder written in root/data; returns its workdir, root/run."""
  from mae_jax import trainer  # pylint: disable=g-import-not-at-top
  write_pattern_folder(root / "data")
  config = synthetic_config(**{"num_steps": 4, "eval_batch_size": 64, **overrides})
  with config.unlocked():
    config.data.update(name="folder", data_dir=str(root / "data"))
    config.model.depth = 2
  trainer.train_and_evaluate(config, str(root / "run"))
  return root / "run"


def official_state(fields, with_decoder=True, seed=0, scale=1.0):
  """A random state dict in the official MAE layout for `fields` (normal weights times
  `scale`; the sin-cos position embeddings are the real ones)."""
  from mae_jax.tools import convert  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  state = {k: rng.standard_normal(s).astype(np.float32) * np.float32(scale)
           for k, s in convert.official_shapes(fields, with_decoder).items()}
  state.update(convert.sincos_tables(fields, with_decoder))
  return state


def save_pth(state, path, **extra):
  """`state` as an official .pth file ({"model": tensors, **extra}); returns its path."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, **extra}, path)
  return str(path)


# --- Command lines in-process --------------------------------------------------------------


@contextlib.contextmanager
def absl_flags():
  """A scope for an absl command's flags in this process: the flags defined inside are
  removed, and the flag values and the absl log level restored, when it ends, so that
  train.py and `python -m mae_jax.evaluate` (both define --config and --workdir) can be
  run one after the other."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  before, verbosity, argv = set(flags.FLAGS), logging.get_verbosity(), sys.argv
  try:
    yield
  finally:
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    logging.set_verbosity(verbosity)
    sys.argv = argv


def exit_code(fn, *args):
  """The exit code of `fn(*args)`: SystemExit's code, or 0 when it returns."""
  try:
    fn(*args)
  except SystemExit as e:
    return e.code
  return 0


def run_train_py(argv):
  """`python train.py *argv` (mae_jax.pretrain) in this process, through its own flag
  parsing and main; returns the exit code (stdout, stderr: capsys). Its flags are removed
  afterwards."""
  from mae_jax.tools import pretrain  # pylint: disable=g-import-not-at-top
  argv = [os.path.join(ROOT, "train.py"), *argv]
  with absl_flags():
    sys.argv = argv
    code = exit_code(pretrain.define_flags)  # loads --config
    return code or exit_code(lambda: pretrain.main(pretrain.parse_flags(argv)))


def run_evaluate(argv):
  """`python -m mae_jax.evaluate *argv` in this process, as its __main__ runs it; returns
  the exit code. Its flags are removed afterwards."""
  from mae_jax.tools import evaluate  # pylint: disable=g-import-not-at-top
  argv = ["evaluate", *argv]
  with absl_flags():
    sys.argv = argv
    try:
      evaluate.define_flags()
    except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
      return exit_code(evaluate.flag_failure, e, argv)
    return exit_code(lambda: evaluate.main(evaluate.parse_flags(argv)))
