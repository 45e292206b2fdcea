"""Parameter directories: mae_jax's format for weights without a training state (imported
official / Hugging Face weights, exports of a run): DIR/params/ (Orbax StandardCheckpointer,
the params pytree) + DIR/model.json ({"model": MaskedAutoencoder fields, ...})."""
import json

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from mae_jax import paths
from mae_jax.train.checkpoints import check_finite_tree, short_reason

PARAMS_DIR = "params"
META_FILE = "model.json"


class ParamsError(ValueError):
  """A parameter directory that is missing, already taken, or does not fit its target."""


def is_params_dir(path):
  return paths.isfile(paths.join(path, META_FILE))


def save_params(directory, params, meta):
  """Write DIR/params and DIR/model.json (meta); never overwrites an existing DIR."""
  directory = paths.absolute(directory)
  if paths.exists(directory):
    raise ParamsError(f"{directory} already exists; choose a new output directory")
  paths.makedirs(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(paths.join(directory, PARAMS_DIR), params)
  paths.write_atomic(paths.join(directory, META_FILE), json.dumps(meta, indent=2))
  return directory


def read_meta(directory):
  """The model.json of a parameter directory, as a dict."""
  if not is_params_dir(directory):
    raise ParamsError(f"{directory}: no {META_FILE}; expected a parameter directory "
                      "(`python -m mae_jax.convert import` writes one)")
  path = paths.join(directory, META_FILE)
  try:
    meta = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise ParamsError(f"{path}: unreadable ({' '.join(str(e).split())})") from None
  if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
    raise ParamsError(f"{path}: expected a JSON object with the model's fields under 'model'")
  return meta


def shape_mismatches(tree, reference, complete=True):
  """'path (shape) vs (reference shape)' for each leaf of `tree` that differs from
  `reference`, plus the reference's leaves `tree` lacks when `complete`."""
  got = {p: tuple(np.shape(v)) for p, v in flax.traverse_util.flatten_dict(tree).items()}
  want = {p: tuple(np.shape(v)) for p, v in flax.traverse_util.flatten_dict(reference).items()}
  bad = [f"{'/'.join(p)} {s} vs {want.get(p, 'absent')}" for p, s in got.items()
         if want.get(p) != s]
  return bad + ([f"{'/'.join(p)} absent vs {s}" for p, s in want.items() if p not in got]
                if complete else [])


def load_params(path, target=None):
  """(params, model fields) of a parameter directory (MaskedAutoencoder(**fields) is their
  model), restored onto `target` where given (arrays or ShapeDtypeStructs with shardings,
  e.g. pretrained.abstract_params); stored shapes that differ from it are listed."""
  meta = read_meta(path)
  params_path = paths.absolute(paths.join(path, PARAMS_DIR))
  with ocp.StandardCheckpointer() as checkpointer:
    if target is not None:
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      try:
        stored = checkpointer.metadata(params_path).item_metadata.tree
      except Exception as e:  # a missing or damaged params/ directory
        raise ParamsError(f"{params_path}: missing or damaged parameters ("
                          f"{short_reason(e, 200)})") from None
      bad = shape_mismatches(stored, target)
      if bad:
        shown = "; ".join(bad[:20]) + (f"; ... ({len(bad)} in all)" if len(bad) > 20 else "")
        raise ParamsError(f"{path} holds params of {meta['model']}, which do not fit the "
                          f"target (stored vs target): {shown}")
    try:
      params = checkpointer.restore(params_path, target)
    except Exception as e:  # Orbax / TensorStore on missing or damaged files
      raise ParamsError(f"{params_path}: damaged or incomplete parameters, cannot be "
                        f"restored ({short_reason(e, 200)})") from None
  check_finite_tree(params, f"{params_path}: damaged parameters", ParamsError)
  return params, meta["model"]
