"""Import and export of the official PyTorch MAE and Hugging Face ViTMAE weights.

Formats (`--format`, guessed from the path when left out: a file is `official`, a
directory `hf`):
  official  facebookresearch/mae `.pth`: {"model": state dict} with timm ViT names.
            mae_pretrain_vit_{base,large,huge}.pth hold the encoder only;
            mae_visualize_vit_*.pth and mae_pretrain_vit_*_full.pth add the decoder.
  hf        a local Hugging Face directory: config.json + model.safetensors (or
            pytorch_model.bin, or a sharded *.index.json) of ViTMAEForPreTraining
            (`vit.` + `decoder.` names) or ViTMAEModel (encoder only, no prefix).

Both go through one canonical form, the official state dict as float32 numpy arrays
(`hf_to_official` / `official_to_hf`), and from there to the MaskedAutoencoder params
pytree (`official_to_params` / `params_to_official`). The fused qkv, the conv patch
embedding (a linear map over patchify rows) and the scanned block stacks map exactly;
the fixed sin-cos position embeddings are not parameters: they are checked on import
and written on export.

An import writes a directory:
  OUT/params/      Orbax StandardCheckpointer checkpoint of the params pytree (float32)
  OUT/model.json   {"model": MaskedAutoencoder fields, "source": where it came from,
                    "decoder_from_checkpoint": bool, "norm_pix_loss": bool | null}
`param_dirs.load_params(OUT)` gives back (params, model_fields);
MaskedAutoencoder(**model_fields) is the model they belong to.

  python -m mae_jax.convert import mae_visualize_vit_large.pth out/mae_vis_large
  python -m mae_jax.convert import mae_pretrain_vit_base.pth out/mae_base --variant B/16
  python -m mae_jax.convert import hf_dir/ out/from_hf
  python -m mae_jax.convert export out/mae_base mae_base.pth
  python -m mae_jax.convert export out/mae_base hf_out/ --format hf
  python -m mae_jax.convert export workdirs/demo demo.pth  # a run's latest checkpoint

Fine-tuned classifiers (the official fine-tuning's .pth: `fc_norm` + `head` for global
pooling, `norm` + `head` for the cls token, a trained `pos_embed`) import into the
classifier directory that fine-tuning writes (params/ + classifier.json; read with
`evaluation.finetune.load`), and such a directory exports back to the official .pth:
  python -m mae_jax.convert import mae_finetuned_vit_base.pth out/ft_base --variant B/16
  python -m mae_jax.convert export workdirs/demo/finetune ft.pth
"""
import argparse
import functools
import io
import json
import os
import pickle
import re
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import paths
from mae_jax.model import posembed, sizes
from mae_jax.train import checkpoints, param_dirs
from mae_jax.model.mae import MaskedAutoencoder
from mae_jax.train.param_dirs import load_params, read_meta, save_params, shape_mismatches
from mae_jax.tools import cli

POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")
STACKS = ("blocks", "decoder_blocks")  # official names of the scanned block stacks
DECODER_TOP = ("mask_token", "decoder_pos_embed", "decoder_embed", "decoder_blocks",
               "decoder_norm", "decoder_pred")
OFFICIAL_DECODER_HEADS = 16  # every official MAE decoder: 8 blocks x 512, 16 heads
POS_EMBED_ATOL = 1e-5


class ConversionError(ValueError):
  """A checkpoint that does not fit: names what is missing, unexpected or misshapen."""


# The canonical (official) layout.


def _wb(name, *shape):
  """A layer's weight (out, ...) and bias (out,): linear, conv or layer norm."""
  return {f"{name}.weight": shape, f"{name}.bias": shape[:1]}


def _block_shapes(prefix, d, hidden):
  layers = {"norm1": (d,), "attn.qkv": (3 * d, d), "attn.proj": (d, d), "norm2": (d,),
            "mlp.fc1": (hidden, d), "mlp.fc2": (d, hidden)}
  return {k: v for n, s in layers.items() for k, v in _wb(f"{prefix}.{n}", *s).items()}


def official_shapes(fields, with_decoder):
  """Official state-dict name -> shape for MaskedAutoencoder `fields`, in file order."""
  d, p, c = fields["width"], fields["patch_size"], fields["channels"]
  tokens = 1 + (fields["image_size"] // p)**2
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, tokens, d),
            **_wb("patch_embed.proj", d, c, p, p)}
  for i in range(fields["depth"]):
    shapes.update(_block_shapes(f"blocks.{i}", d, int(d * fields["mlp_ratio"])))
  shapes.update(_wb("norm", d))
  if not with_decoder:
    return shapes
  dd = fields["decoder_width"]
  shapes.update({"mask_token": (1, 1, dd), "decoder_pos_embed": (1, tokens, dd),
                 **_wb("decoder_embed", dd, d)})
  for i in range(fields["decoder_depth"]):
    shapes.update(_block_shapes(f"decoder_blocks.{i}", dd, int(dd * fields["mlp_ratio"])))
  return {**shapes, **_wb("decoder_norm", dd), **_wb("decoder_pred", p * p * c, dd)}


def _listing(names, limit=40):
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_keys(state, shapes, optional=POS_EMBED_KEYS, what="checkpoint"):
  """Raise ConversionError naming every missing, unexpected or misshapen tensor."""
  wrong = [f"{k} {tuple(np.shape(state[k]))} (expected {shapes[k]})"
           for k in state if k in shapes and tuple(np.shape(state[k])) != tuple(shapes[k])]
  problems = [f"{kind} {len(names)}: {_listing(names)}" for kind, names in (
      ("missing", set(shapes) - set(state) - set(optional)),
      ("unexpected", set(state) - set(shapes)), ("wrong shape", wrong)) if names]
  if problems:
    raise ConversionError(f"{what} does not match the architecture:\n  " + "\n  ".join(problems))


def has_decoder(state):
  return any(k.split(".")[0] in DECODER_TOP for k in state)


# Architecture inference.


def _count_blocks(state, stack):
  idx = {int(m.group(1)) for k in state if (m := re.match(rf"{stack}\.(\d+)\.", k))}
  return max(idx) + 1 if idx else 0


def _require(state, name, what, ndim):
  if name not in state:
    raise ConversionError(f"checkpoint has no {name!r}, needed to infer {what}")
  shape = np.shape(state[name])
  if len(shape) != ndim or 0 in shape:
    raise ConversionError(f"{name} has shape {tuple(shape)}; expected {ndim} non-zero "
                          f"dimensions, to infer {what}")
  return shape


def infer_shapes(state, image_size=None):
  """Fields readable from tensor shapes alone (no heads): width, depth, patch, ..."""
  d, c, p, _ = _require(state, "patch_embed.proj.weight", "width and patch size", 4)
  hidden = _require(state, "blocks.0.mlp.fc1.weight", "the MLP ratio", 2)[0]
  if "pos_embed" in state:
    grid = int(round((_require(state, "pos_embed", "the image size", 3)[1] - 1)**0.5))
    image_size = grid * p
  fields = dict(image_size=image_size or 224, patch_size=p, channels=c, width=d,
                depth=_count_blocks(state, "blocks"), mlp_ratio=hidden / d)
  if has_decoder(state):
    dd = _require(state, "decoder_embed.weight", "the decoder width", 2)[0]
    dec_hidden = _require(state, "decoder_blocks.0.mlp.fc1.weight", "the decoder MLP", 2)[0]
    if dec_hidden != int(dd * fields["mlp_ratio"]):
      raise ConversionError(
          f"decoder MLP ratio {dec_hidden / dd} differs from the encoder's "
          f"{fields['mlp_ratio']}; mae_jax uses one mlp_ratio for both")
    fields.update(decoder_width=dd, decoder_depth=_count_blocks(state, "decoder_blocks"))
  return fields


def _check_heads(heads, width, flag):
  if width % heads:
    raise ConversionError(f"{flag}={heads} does not divide the width {width}")


def encoder_heads(fields, num_heads=None, variant=None):
  """(encoder heads, where from): given, from --variant (checked on the tensors) or SIZES."""
  source = "given"
  if num_heads is None and variant:
    try:
      kw = sizes.decode_variant(variant)
    except ValueError as e:
      raise ConversionError(f"--variant: {e}") from None
    got = {k: fields[k] for k in ("width", "depth", "patch_size")}
    if any(kw[k] != v for k, v in got.items()):
      raise ConversionError(f"--variant {variant} means {kw}, but the checkpoint has {got}")
    num_heads, source = kw["num_heads"], f"variant {variant}"
  for name, (width, depth, heads) in sizes.SIZES.items():
    if num_heads is None and (width, depth) == (fields["width"], fields["depth"]):
      num_heads, source = heads, f"the {name} size ({width} wide, {depth} deep)"
  if num_heads is None:
    raise ConversionError(
        f"cannot infer the number of heads of a {fields['width']}-wide, "
        f"{fields['depth']}-deep encoder: pass --num_heads or --variant (e.g. B/16)")
  _check_heads(num_heads, fields["width"], "num_heads")
  return num_heads, source


def resolve_heads(fields, num_heads=None, decoder_heads=None, variant=None):
  """Fill num_heads / decoder_heads, which shapes cannot tell; prints what it assumed."""
  num_heads, source = encoder_heads(fields, num_heads, variant)
  dec_source = "given" if decoder_heads is not None else "the official MAE decoder"
  decoder_heads = OFFICIAL_DECODER_HEADS if decoder_heads is None else decoder_heads
  _check_heads(decoder_heads, fields["decoder_width"], "decoder_heads")
  fields.update(num_heads=num_heads, decoder_heads=decoder_heads)
  print(f"encoder: {fields['depth']} blocks x {fields['width']}, {num_heads} heads "
        f"(heads: {source}); decoder: {fields['decoder_depth']} blocks x "
        f"{fields['decoder_width']}, {decoder_heads} heads (heads: {dec_source})")


# Official state dict <-> MaskedAutoencoder params.


def conv_to_kernel(w_DCpp):
  """Conv weight (D, C, p, p) -> linear kernel (p*p*C, D) over patchify rows."""
  return np.transpose(w_DCpp, (2, 3, 1, 0)).reshape(-1, w_DCpp.shape[0])


def kernel_to_conv(kernel_PD, patch_size, channels):
  """Inverse of conv_to_kernel."""
  w = np.reshape(kernel_PD, (patch_size, patch_size, channels, kernel_PD.shape[1]))
  return np.transpose(w, (3, 2, 0, 1))


def _to_jax_leaf(name, value):
  """'blocks.3.attn.qkv.weight' -> (('blocks', 'layers', 'attn', 'qkv', 'kernel'), 3, W.T)."""
  parts, layer = name.split("."), None
  if parts[0] in STACKS:
    layer, parts = int(parts[1]), [parts[0], "layers", *parts[2:]]
  if parts[:2] == ["patch_embed", "proj"]:
    parts = ["patch_embed", *parts[2:]]
  if parts[-1] == "weight":
    parts[-1] = "scale" if value.ndim == 1 else "kernel"
    value = conv_to_kernel(value) if value.ndim == 4 else value.T if value.ndim == 2 else value
  return tuple(parts), layer, value


def _from_jax_leaf(path, value, fields):
  """Inverse of _to_jax_leaf for one unstacked leaf: (official name, array)."""
  parts = list(path)
  if parts[-1] == "kernel":
    value = (kernel_to_conv(value, fields["patch_size"], fields["channels"])
             if parts[0] == "patch_embed" else value.T)
  parts[-1] = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
  if parts[0] == "patch_embed":
    parts = ["patch_embed", "proj", *parts[1:]]
  return ".".join(parts), value


def official_to_params(state, fields):
  """Official state dict (pos embeds allowed, ignored) -> params pytree of what it holds."""
  check_keys(state, official_shapes(fields, has_decoder(state)))
  return _state_to_params({k: v for k, v in state.items() if k not in POS_EMBED_KEYS})


def _state_to_params(state):
  """Official names -> the params pytree, block tensors stacked on a layer axis."""
  leaves = {}  # path -> {layer (None outside a stack): array}
  for name, value in state.items():
    path, layer, value = _to_jax_leaf(name, np.asarray(value, np.float32))
    leaves.setdefault(path, {})[layer] = value
  return flax.traverse_util.unflatten_dict({
      path: layers[None] if None in layers else np.stack([layers[i] for i in range(len(layers))])
      for path, layers in leaves.items()})


def params_to_official(params, fields, with_decoder=True):
  """Params pytree -> official state dict (with the sin-cos pos embeds), file order."""
  if not with_decoder:
    params = {k: v for k, v in params.items() if k not in DECODER_TOP}
  state = _params_to_state(params, fields)
  state.update(sincos_tables(fields, with_decoder))
  return _in_order(state, official_shapes(fields, with_decoder), "exported state")


def _in_order(state, shapes, what):
  """`state` checked against `shapes` (nothing optional), contiguous, in their order."""
  check_keys(state, shapes, optional=(), what=what)
  return {k: np.ascontiguousarray(state[k]) for k in shapes}


def _params_to_state(params, fields):
  """Inverse of _state_to_params: the params pytree -> official names (no order)."""
  state = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    value = np.asarray(value, np.float32)
    leaves = ([((path[0], str(i), *path[2:]), v) for i, v in enumerate(value)]
              if path[0] in STACKS else [(path, value)])
    state.update(_from_jax_leaf(p, v, fields) for p, v in leaves)
  return state


# Fine-tuned classifiers: the official fine-tuning's ViT (`fc_norm` or `norm`, `head`, a trained
# `pos_embed`) <-> the classifier directories of `evaluation.finetune` (classifier.json).

CLASSIFIER_FIELDS = ("num_classes", "image_size", "patch_size", "channels", "width", "depth",
                     "num_heads", "mlp_ratio", "pool", "learned_pos_embed")


def classifier_shapes(fields):
  """Official fine-tuned ViT name -> shape for classifier `fields`, in file order."""
  shapes = official_shapes(fields, with_decoder=False)
  d = fields["width"]
  if fields["pool"] == "avg":  # the encoder's final norm is replaced by fc_norm after pooling
    del shapes["norm.weight"], shapes["norm.bias"]
    shapes.update(_wb("fc_norm", d))
  return {**shapes, **_wb("head", fields["num_classes"], d)}


def classifier_fields(state, hints, variant=None):
  """ViTClassifier fields of a fine-tuned state dict; the pool from the norm it holds."""
  fields = infer_shapes(state, hints.get("image_size"))
  fields["num_heads"], _ = encoder_heads(fields, hints.get("num_heads"), variant)
  fields.update(num_classes=int(np.shape(state["head.weight"])[0]),
                pool="avg" if "fc_norm.weight" in state else "cls",
                learned_pos_embed=True)
  print(f"classifier: {fields['depth']} blocks x {fields['width']}, {fields['num_heads']} "
        f"heads, {fields['num_classes']} classes, {fields['pool']} pooling")
  return {k: fields[k] for k in CLASSIFIER_FIELDS}


def params_to_classifier(params, fields):
  """ViTClassifier params -> the official fine-tuned state dict, file order; a classifier
  with a fixed position embedding writes the sin-cos table it used."""
  state = _params_to_state(params, fields)
  state.setdefault("pos_embed", sincos_tables(fields, with_decoder=False)["pos_embed"])
  return _in_order(state, classifier_shapes(fields), "exported classifier")


def sincos_tables(fields, with_decoder=True):
  """The fixed position embeddings as the official (1, 1+N, D) tensors."""
  grid = (fields["image_size"] // fields["patch_size"],) * 2
  tables = {"pos_embed": posembed.sincos_2d(fields["width"], grid)[None]}
  if with_decoder:
    tables["decoder_pos_embed"] = posembed.sincos_2d(fields["decoder_width"], grid)[None]
  return tables


def check_pos_embed(state, fields):
  """Stored position embeddings must be the fixed sin-cos tables mae_jax computes."""
  for name, table in sincos_tables(fields, has_decoder(state)).items():
    if name in state and np.shape(state[name]) == table.shape:
      err = float(np.max(np.abs(np.asarray(state[name], np.float32) - table)))
      if err > POS_EMBED_ATOL:
        raise ConversionError(
            f"{name} is not the fixed 2D sin-cos table mae_jax uses (max abs difference "
            f"{err:.3g}); pass --no_check_pos_embed to load anyway and use sin-cos")


# Hugging Face names <-> official names.

QKV = ("query", "key", "value")
# transformers>=5 in-memory names and its save_pretrained spelling -> the hub names.
HF_ALIASES = (
    (r"^(vit\.)?layers\.", r"\1encoder.layer."),
    (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
    *((rf"\.attention\.{x[0]}_proj\.", f".attention.attention.{x}.") for x in QKV),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)
# Official module -> hub name; "{vit}" is "vit." in ViTMAEForPreTraining, "" in ViTMAEModel.
HF_TOP = {
    "cls_token": "{vit}embeddings.cls_token", "pos_embed": "{vit}embeddings.position_embeddings",
    "patch_embed.proj": "{vit}embeddings.patch_embeddings.projection",
    "norm": "{vit}layernorm", "blocks": "{vit}encoder.layer",
    **{k: f"decoder.{k}" for k in DECODER_TOP}, "decoder_blocks": "decoder.decoder_layers",
}
# Official name -> hub name inside a block (after 'blocks.3.'); q/k/v: the split attn.qkv.
HF_BLOCK = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense",
            "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense", **{f"attn.{x}": f"attention.attention.{x}" for x in QKV}}


def _rename(name, table):
  """Replace the longest dotted prefix of `name` found in `table`; None if none."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    head = ".".join(parts[:n])
    if head in table:
      return ".".join([table[head], *parts[n:]])
  return None


def _rename_in_block(name, table):
  """'blocks.3.attn.query.weight' <-> 'blocks.3.attention.attention.query.weight'."""
  stack, idx, rest = name.split(".", 2)
  return f"{stack}.{idx}.{_rename(rest, table) or rest}"


def _fuse_qkv(state):
  """attn.{query,key,value} -> attn.qkv (concatenated in that order)."""
  out = {}
  for name, value in state.items():
    m = re.match(r"(.*\.attn)\.(query|key|value)\.(weight|bias)$", name)
    parts = [f"{m.group(1)}.{x}.{m.group(3)}" for x in QKV] if m else []
    if parts and all(p in state for p in parts):
      out[f"{m.group(1)}.qkv.{m.group(3)}"] = np.concatenate([state[p] for p in parts])
    else:  # a lone query/key/value stays: unexpected, with qkv missing
      out[name] = value
  return out


def hf_to_official(state):
  """HF ViTMAEForPreTraining / ViTMAEModel state dict (any transformers version) ->
  official names. Unknown names pass through, so check_keys reports them."""
  prefix = "vit." if any(k.startswith("vit.") for k in state) else ""
  inverse_top = {v.format(vit=prefix): k for k, v in HF_TOP.items()}
  inverse_block = {v: k for k, v in HF_BLOCK.items()}
  out = {}
  for name, value in state.items():
    for pattern, repl in HF_ALIASES:
      name = re.sub(pattern, repl, name)
    new = _rename(name, inverse_top)
    if new is not None and new.split(".")[0] in STACKS:
      new = _rename_in_block(new, inverse_block)
    out[new or name] = value
  return _fuse_qkv(out)


def _split_qkv(name, value):
  stem, _, leaf = name.rpartition(".attn.qkv.")
  return {f"{stem}.attn.{x}.{leaf}": v for x, v in zip(QKV, np.split(value, 3))}


def official_to_hf(state, prefix="vit."):
  """Official names -> the hub's ViTMAE names (transformers 4.x names, which 5.x renames
  on load); prefix "vit." for ViTMAEForPreTraining, "" for ViTMAEModel."""
  top = {k: v.format(vit=prefix) for k, v in HF_TOP.items()}
  out = {}
  for name, value in state.items():
    split = _split_qkv(name, value) if ".attn.qkv." in name else {name: value}
    for n, v in split.items():
      out[_rename(_rename_in_block(n, HF_BLOCK) if n.split(".")[0] in STACKS else n, top)] = v
  return out


# Files.


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConversionError("reading or writing .pth / .bin files needs torch "
                          "(pip install 'mae_jax[parity]')") from None
  return torch


def _to_numpy(state, error):
  """A loaded dict of floating-point torch tensors -> float32 numpy; else `error`."""
  if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
    raise ConversionError(error)
  for name, value in state.items():
    if not value.is_floating_point():
      raise ConversionError(f"{name}: expected a floating-point tensor, got {value.dtype}")
  return {k: v.detach().cpu().float().numpy() for k, v in state.items()}


def _torch_load(path):
  """torch.load without running arbitrary pickled code (tensors, containers, and the
  argparse.Namespace that training scripts save beside the weights). A file that is not a
  whole torch.save file (empty, truncated, text, random bytes) is one ConversionError."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: " + ("is a directory; expected a .pth file (or pass "
                                         "--format hf)" if os.path.isdir(path)
                                         else "not found"))
  torch = _torch()
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises EOFError, KeyError, RuntimeError ... on bad bytes
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if found and isinstance(e, pickle.UnpicklingError):  # a class named: refused, never run
      raise ConversionError(f"{path}: holds a {found.group(1)} object, not only tensors; "
                            "mae_jax loads tensors only: re-save just the state dict "
                            "(torch.save({'model': model.state_dict()}, path))") from None
    text = " ".join(str(e).split()).split(". ")[0][:120]
    reason = type(e).__name__ + (f": {text}" if text else "")
    raise ConversionError(
        f"{path}: not a readable PyTorch checkpoint ({os.path.getsize(path)} bytes; {reason}); "
        "expected a whole file written by torch.save: is it empty, truncated or of another "
        "format?") from None


def read_official(path):
  """Official .pth -> {name: float32 array} (the state dict under "model")."""
  ckpt = _torch_load(path)
  keys = list(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
  state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
  return _to_numpy(state, f"{path}: expected a state dict under 'model', found {keys}")


def write_official(state, path):
  """{name: array} -> .pth (local or gs://), the state dict under "model" as officially."""
  torch = _torch()
  data = io.BytesIO()
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, data)
  paths.write_atomic(path, data.getvalue())


def _read_json(path, what):
  """A JSON file's object, or one ConversionError naming the file."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: unreadable {what} ({' '.join(str(e).split())})") from None
  if not isinstance(value, dict):
    raise ConversionError(f"{path}: expected a JSON object ({what}), found "
                          f"{type(value).__name__}")
  return value


def _hf_weight_files(directory):
  index = [f for f in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
           if os.path.exists(os.path.join(directory, f))]
  if index:
    path = os.path.join(directory, index[0])
    weight_map = _read_json(path, "weight index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()):
      raise ConversionError(f"{path}: expected a 'weight_map' of tensor name -> file")
    return sorted(set(weight_map.values()))
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.exists(os.path.join(directory, name)):
      return [name]
  raise ConversionError(f"{directory}: no model.safetensors or pytorch_model.bin")


def _read_weight_file(path):
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    if not os.path.isfile(path):
      raise ConversionError(f"{path}: not found (named by the weight index)")
    try:
      tensors = load_file(path)
    except Exception as e:  # SafetensorError, OSError, ... on a damaged file
      raise ConversionError(f"{path}: not a readable safetensors file ("
                            f"{' '.join(str(e).split())[:120]}); is it truncated?") from None
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  return _to_numpy(_torch_load(path), f"{path}: expected a state dict of tensors")


def read_hf(directory):
  """Local HF directory -> ({hf name: float32 array}, config dict). Nothing downloaded."""
  if not os.path.isdir(directory):
    raise ConversionError(f"{directory}: " + ("is a file; expected a Hugging Face directory"
                                              " (or pass --format official)"
                                              if os.path.exists(directory) else "not found"))
  config_path = os.path.join(directory, "config.json")
  if not os.path.exists(config_path):
    raise ConversionError(f"{directory}: no config.json (expected a Hugging Face "
                          "ViTMAE directory)")
  config = _read_json(config_path, "Hugging Face config")
  state = {k: v for name in _hf_weight_files(directory)
           for k, v in _read_weight_file(os.path.join(directory, name)).items()}
  return state, config


def hf_config_fields(config):
  """ViTMAEConfig dict -> the MaskedAutoencoder fields it fixes (checked where it must)."""
  if config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True):
    raise ConversionError("mae_jax needs hidden_act='gelu' and qkv_bias=True, got "
                          f"{config.get('hidden_act')!r}, {config.get('qkv_bias')}")
  eps = config.get("layer_norm_eps", 1e-12)
  if abs(eps - 1e-6) > 1e-9:
    print(f"note: config.json has layer_norm_eps={eps}; mae_jax uses the official 1e-6")
  size = config.get("image_size", 224)
  if isinstance(size, (list, tuple)) and len(set(size)) != 1:
    raise ConversionError(f"config.json image_size={size}: mae_jax needs square sizes")
  return dict(image_size=int(size[0] if isinstance(size, (list, tuple)) else size),
              num_heads=config.get("num_attention_heads"),
              decoder_heads=config.get("decoder_num_attention_heads"),
              mask_ratio=float(config.get("mask_ratio", 0.75)),
              decoder_width=config.get("decoder_hidden_size"),
              decoder_depth=config.get("decoder_num_hidden_layers"))


def hf_config(fields, with_decoder, norm_pix_loss=False):
  """A ViTMAEConfig dict (config.json) for MaskedAutoencoder `fields`."""
  f = fields
  return {
      "architectures": ["ViTMAEForPreTraining" if with_decoder else "ViTMAEModel"],
      "model_type": "vit_mae", "hidden_size": f["width"], "num_hidden_layers": f["depth"],
      "num_attention_heads": f["num_heads"], "intermediate_size": int(f["width"] * f["mlp_ratio"]),
      "decoder_hidden_size": f["decoder_width"], "decoder_num_hidden_layers": f["decoder_depth"],
      "decoder_num_attention_heads": f["decoder_heads"],
      "decoder_intermediate_size": int(f["decoder_width"] * f["mlp_ratio"]),
      "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True,
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
      "initializer_range": 0.02, "image_size": f["image_size"], "patch_size": f["patch_size"],
      "num_channels": f["channels"], "mask_ratio": f["mask_ratio"],
      "norm_pix_loss": bool(norm_pix_loss),
  }


def write_hf(state, fields, directory, norm_pix_loss=False):
  """Official state dict -> HF directory (config.json + model.safetensors, hub names): a
  ViTMAEForPreTraining with the decoder, a ViTMAEModel without."""
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  with_decoder = has_decoder(state)
  paths.makedirs(directory)
  hf_state = official_to_hf(state, prefix="vit." if with_decoder else "")
  paths.write_atomic(paths.join(directory, "model.safetensors"), save(
      {k: np.ascontiguousarray(v) for k, v in hf_state.items()}, metadata={"format": "pt"}))
  paths.write_atomic(paths.join(directory, "config.json"),
                     json.dumps(hf_config(fields, with_decoder, norm_pix_loss), indent=2))


# State dict -> params with a model, and back.


def model_fields(state, hints, variant=None):
  """MaskedAutoencoder fields of an official state dict. hints (from flags or an HF
  config.json; None: not given) give what the tensors cannot: num_heads, decoder_heads,
  image_size without a pos_embed, mask_ratio, an encoder-only file's decoder_width/depth."""
  hints = {k: v for k, v in hints.items() if v is not None}
  fields = infer_shapes(state, hints.get("image_size"))
  if hints.get("image_size", fields["image_size"]) != fields["image_size"]:
    raise ConversionError(f"image_size {hints['image_size']} given, but pos_embed is for "
                          f"{fields['image_size']}")
  if not has_decoder(state):
    fields.update(decoder_width=hints.get("decoder_width", MaskedAutoencoder.decoder_width),
                  decoder_depth=hints.get("decoder_depth", MaskedAutoencoder.decoder_depth))
  resolve_heads(fields, hints.get("num_heads"), hints.get("decoder_heads"), variant)
  fields["mask_ratio"] = float(hints.get("mask_ratio", MaskedAutoencoder.mask_ratio))
  return fields


def _init(fields, rng):
  model = MaskedAutoencoder(**fields)
  params_rng, mask_rng = jax.random.split(rng)
  x = jnp.zeros((1, fields["image_size"], fields["image_size"], fields["channels"]))
  return model.init({"params": params_rng, "mask": mask_rng}, x)["params"]


def abstract_params(fields):
  """jax.ShapeDtypeStruct pytree of MaskedAutoencoder(**fields)'s params (no compute)."""
  return jax.eval_shape(lambda: _init(fields, jax.random.key(0)))


@functools.partial(jax.jit, static_argnums=0)
def _init_decoder(fields_items, rng):
  return {k: v for k, v in _init(dict(fields_items), rng).items() if k in DECODER_TOP}


def init_decoder(fields, seed):
  """The decoder and mask token of MaskedAutoencoder(**fields).init with `seed`; only these
  leaves leave the compiled init, so XLA drops the rest: fast at any size."""
  return _init_decoder(tuple(sorted(fields.items())), jax.random.key(seed))


def convert_state(state, fields, seed=0, check_pos=True):
  """Official state dict -> (params, decoder_from_checkpoint); an encoder-only checkpoint
  gets a freshly initialized decoder (seeded), and says so."""
  if check_pos:
    check_pos_embed(state, fields)
  params = jax.tree.map(jnp.asarray, official_to_params(state, fields))
  from_checkpoint = has_decoder(state)
  bad = shape_mismatches(params, abstract_params(fields), complete=from_checkpoint)
  if bad:  # a converter bug, not a checkpoint problem: official_shapes already passed
    raise ConversionError(f"converted params (vs MaskedAutoencoder's): {_listing(bad)}")
  if from_checkpoint:
    return params, True
  params.update(init_decoder(fields, seed))
  print(f"encoder-only checkpoint: the decoder ({fields['decoder_depth']} blocks x "
        f"{fields['decoder_width']}, {fields['decoder_heads']} heads) and mask token are "
        f"freshly initialized with seed {seed}, not loaded")
  return params, False


# Import / export of whole checkpoints.


def _read_hf_source(path):
  state, config = read_hf(path)
  try:
    hints = hf_config_fields(config)
  except (TypeError, ValueError) as e:  # a field of another type than ViTMAEConfig's
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"{path}/config.json: a field has an unexpected value ({e})") from None
  for name, value in hints.items():
    if name != "mask_ratio" and value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ConversionError(f"{path}/config.json: {name} is {value!r}; expected an int >= 1")
  return hf_to_official(state), hints, config.get("norm_pix_loss")


# format -> reader of (official state dict, hints, norm_pix_loss)
READERS = {"official": lambda path: (read_official(path), {}, None), "hf": _read_hf_source}


def guess_format(path):
  return "hf" if os.path.isdir(path) or not os.path.splitext(path)[1] else "official"


def import_checkpoint(src, out, fmt=None, *, variant=None, seed=0, check_pos=True, **hints):
  """Convert `src` (official .pth or HF directory) into an import directory `out`; returns
  (params, meta). hints: HINT_FLAGS (None = infer)."""
  fmt = fmt or guess_format(src)
  if paths.is_gcs(src):
    raise ConversionError(f"{src}: convert import reads a local file or directory; copy it "
                          "here first (gcloud storage cp)")
  if not os.path.lexists(src):
    raise ConversionError(f"{src}: not found")
  _refuse_taken(out)  # before any reading: a taken output fails at once
  if paths.is_gcs(out):
    _check_gcs_output(out)
  else:
    cli.check_output_dir(out, "out")
  state, file_hints, norm_pix_loss = READERS[fmt](src)
  file_hints.update({k: v for k, v in hints.items() if v is not None})
  if "head.weight" in state and not has_decoder(state):  # a fine-tuned classifier
    return import_classifier(state, out, file_hints, variant, src)
  fields = model_fields(state, file_hints, variant)
  params, from_checkpoint = convert_state(state, fields, seed, check_pos)
  meta = {"model": fields, "source": {"format": fmt, "path": os.path.abspath(src)},
          "decoder_from_checkpoint": from_checkpoint,
          "decoder_init_seed": None if from_checkpoint else seed,
          "norm_pix_loss": norm_pix_loss}
  out = save_params(out, params, meta)
  print(f"wrote {out}/{param_dirs.PARAMS_DIR} (Orbax) and {out}/{param_dirs.META_FILE}")
  return params, meta


def import_classifier(state, out, hints, variant, src):
  """A fine-tuned state dict -> a classifier directory (`finetune.load` reads it)."""
  from mae_jax.evaluation import classifier, finetune  # pylint: disable=g-import-not-at-top
  fields = classifier_fields(state, hints, variant)
  check_keys(state, classifier_shapes(fields), optional=(), what="fine-tuned checkpoint")
  params = _state_to_params(state)  # pos_embed kept: the trained table
  _refuse_taken(out)
  source = {"format": "official", "path": os.path.abspath(src)}
  finetune.save(out, params, classifier.ViTClassifier(**fields), {"source": source})
  print(f"wrote {out}/params (Orbax) and {out}/classifier.json")
  return params, {"model": fields, "source": source}


# format -> writer(state, fields, out, norm_pix_loss)
WRITERS = {"official": lambda state, _, out, __: write_official(state, out), "hf": write_hf}


def _taken(path):
  """Anything at `path`: on gs:// an object or objects below it; locally even a broken link."""
  return paths.exists(path) if paths.is_gcs(path) else os.path.lexists(path)


def _refuse_taken(out):
  if _taken(out):
    raise param_dirs.ParamsError(f"{paths.absolute(out)} already exists; choose a new "
                                 "output directory")


def _check_gcs_output(out, is_file=False):
  """Write and delete a probe object in a gs:// output directory (beside an output file), so
  a missing bucket, credentials or server is one ConversionError before anything is read."""
  folder = os.fspath(paths.resolve(out).parent) if is_file else out
  try:
    paths.write_probe(folder)
  except FileNotFoundError:
    raise ConversionError(f"{out}: bucket {paths.bucket(out)} does not exist (or these "
                          "credentials cannot see it)") from None
  except Exception as e:  # gcsfs, aiohttp and google-auth errors
    raise ConversionError(f"{out}: cannot write there ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None


def _check_new_output(out, fmt, overwrite):
  """Refuse an output that is taken (without --overwrite) or cannot be written."""
  gcs = paths.is_gcs(out)
  taken = paths.exists(out) if gcs else os.path.isfile(out) or (
      os.path.isdir(out) and os.listdir(out))
  if taken and not overwrite:
    raise ConversionError(f"{out} exists; pass --overwrite to replace it")
  if gcs:
    _check_gcs_output(out, is_file=fmt == "official")
  elif fmt == "official":
    cli.check_output_file(out, "out")
  elif os.path.isfile(out):
    raise ConversionError(f"{out} is a file; --format hf writes a directory")
  elif not os.path.isdir(out):
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
      raise ConversionError(f"{out}: cannot create it: {parent} is not a writable folder")


def _export_source(path):
  """(params, model fields, meta) of a parameter directory or of a train.py workdir's
  latest checkpoint (only its params are read)."""
  from mae_jax.train import pretrained  # pylint: disable=import-outside-toplevel
  if not paths.isdir(path):
    raise ConversionError(f"{path}: " + ("not found" if not _taken(path) else
                                         "is a file; expected a parameter directory "
                                         "(convert import) or a train.py workdir"))
  if pretrained.is_workdir(path) and not param_dirs.is_params_dir(path):
    model, config = pretrained.model_of(path)
    params, step = pretrained.restore_params(path, model)
    fields = sizes.model_kwargs(config.model, config.data.image_size, config.data.channels)
    meta = {"model": fields, "decoder_from_checkpoint": True,
            "norm_pix_loss": bool(config.model.norm_pix_loss),
            "source": {"format": "workdir", "path": paths.absolute(path), "step": step}}
    print(f"{path}: the params of checkpoint step {step}")
    return jax.device_get(params), fields, meta
  if not param_dirs.is_params_dir(path):
    raise ConversionError(f"{path}: neither a parameter directory (model.json + params/, "
                          "from `convert import`) nor a train.py workdir (config.json + "
                          "checkpoints/)")
  meta = read_meta(path)
  return (*load_params(path), meta)


def export_checkpoint(params_dir, out, fmt=None, with_decoder=None, overwrite=False):
  """Write an import directory, or a train.py workdir's latest checkpoint, as an official
  .pth or an HF directory, or a classifier directory as an official .pth.
  with_decoder=None: only a decoder that came from a checkpoint."""
  fmt = fmt or guess_format(out)
  from mae_jax.evaluation import finetune  # pylint: disable=g-import-not-at-top
  is_classifier = paths.isfile(paths.join(params_dir, finetune.CLASSIFIER_FILE))
  if is_classifier and fmt != "official":
    raise ConversionError(f"{params_dir} holds a classifier: it exports to the official "
                          ".pth format only (--format official)")
  _check_new_output(out, fmt, overwrite)  # before anything is read
  if is_classifier:  # fine-tuning's output or an import
    model, params = finetune.load(params_dir)
    state = params_to_classifier(params, {f: getattr(model, f) for f in CLASSIFIER_FIELDS})
    write_official(state, out)
    print(f"wrote {out} (official, fine-tuned classifier, {model.num_classes} classes)")
    return state
  params, fields, meta = _export_source(params_dir)
  if with_decoder is None:
    with_decoder = meta.get("decoder_from_checkpoint", True)
  state = params_to_official(params, fields, with_decoder)
  WRITERS[fmt](state, fields, out, bool(meta.get("norm_pix_loss")))
  print(f"wrote {out} ({fmt}, {'with' if with_decoder else 'without'} the decoder)")
  return state


# Command line.


HINT_FLAGS = ("num_heads", "decoder_heads", "decoder_width", "decoder_depth", "image_size",
              "mask_ratio")


def _parser():
  parser = cli.ArgumentParser(prog="python -m mae_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="official .pth or HF directory -> Orbax params")
  imp.add_argument("src", help="official .pth file or local HF directory")
  imp.add_argument("out", help="new output directory (params/ + model.json)")
  imp.add_argument("--format", choices=sorted(READERS), help="default: guessed from src")
  imp.add_argument("--variant", help="e.g. B/16, L/16, H/14: gives the heads of a .pth")
  for flag in HINT_FLAGS:
    imp.add_argument(f"--{flag}", type=cli.open_unit_float if flag == "mask_ratio" else
                     cli.positive_int)
  imp.add_argument("--seed", type=cli.nonnegative_int, default=0,
                   help="decoder init of encoder-only files")
  imp.add_argument("--no_check_pos_embed", action="store_true")
  exp = sub.add_parser("export", help="Orbax params -> official .pth or HF directory")
  exp.add_argument("params", help="a directory written by `import`, or a train.py workdir "
                   "(its latest checkpoint)")
  exp.add_argument("out", help=".pth file (official) or directory (hf)")
  exp.add_argument("--format", choices=sorted(WRITERS), help="default: .pth -> official")
  dec = exp.add_mutually_exclusive_group()
  dec.add_argument("--with_decoder", action="store_true", default=None)
  dec.add_argument("--encoder_only", dest="with_decoder", action="store_false")
  exp.add_argument("--overwrite", action="store_true")
  imp.set_defaults(run=lambda a: import_checkpoint(
      a.src, a.out, a.format, variant=a.variant, seed=a.seed,
      check_pos=not a.no_check_pos_embed, **{k: getattr(a, k) for k in HINT_FLAGS}))
  exp.set_defaults(run=lambda a: export_checkpoint(
      a.params, a.out, a.format, a.with_decoder, a.overwrite))
  return parser


def main(argv=None):
  from mae_jax.train.pretrained import PretrainedError  # pylint: disable=import-outside-toplevel
  args = _parser().parse_args(argv)
  try:
    args.run(args)
  except (ConversionError, param_dirs.ParamsError, checkpoints.CheckpointError,
          PretrainedError, cli.UsageError, FileNotFoundError, paths.PathError) as e:
    return cli.report(e)
  return 0


def run():
  """The console script `mae-convert`."""
  sys.exit(main())


if __name__ == "__main__":
  run()
