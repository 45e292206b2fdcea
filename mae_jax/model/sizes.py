"""Model presets: one size table decodes "Ti/16", "S/16", "B/16", "L/16", "H/14"."""
import jax.numpy as jnp
import ml_collections

from mae_jax import checks
from mae_jax.model import kernels, masking, vit
from mae_jax.model.kernels import Kernels
from mae_jax.model.mae import ENCODERS
from mae_jax.train import stages

# name -> (width, depth, heads); MLP ratio 4 throughout (ViT, Dosovitskiy et al. Table 1).
# "Mu" is not from the paper: a micro encoder for CPU demos on 28 x 28 images.
SIZES = {"Mu": (128, 4, 4), "Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12),
         "L": (1024, 24, 16), "H": (1280, 32, 16)}
# Friendly aliases for the paper's presets.
PRESETS = {"vit_tiny": "Ti/16", "vit_small": "S/16", "vit_base": "B/16", "vit_large": "L/16",
           "vit_huge": "H/14"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def decode_variant(variant):
  """"B/16" (or a PRESETS alias) -> dict(width, depth, num_heads, patch_size)."""
  variant = PRESETS.get(variant, variant)
  size, _, patch = variant.partition("/")
  if size not in SIZES or not patch.isdigit():
    raise ValueError(
        f"model.variant={variant!r}: expected SIZE/PATCH with SIZE in {list(SIZES)} "
        f"(e.g. 'B/16') or a preset in {list(PRESETS)}")
  width, depth, heads = SIZES[size]
  return dict(width=width, depth=depth, num_heads=heads, patch_size=int(patch))


def model_kwargs(model_config, image_size, channels):
  """The MaskedAutoencoder fields (what it computes) for a config: the variant, then each
  set override."""
  kw = decode_variant(model_config.variant)
  for field in ("width", "depth", "num_heads", "patch_size"):
    if model_config.get(field) is not None:
      kw[field] = model_config[field]
  for field in ("mlp_ratio", "decoder_width", "decoder_depth", "decoder_heads",
                "mask_ratio", "mask_strategy"):
    kw[field] = model_config[field]
  kw["dtype"] = DTYPES[model_config.dtype]
  return dict(kw, image_size=image_size, channels=channels)


# Fields of a model config (or of an older model.json) that say how it computes, not what.
COMPUTE_FIELDS = ("matmul", "attn_impl", "remat", "unroll")


def kernels_of(fields, platform):
  """The Kernels of the COMPUTE_FIELDS in `fields` (a model config or a dict) for devices
  of `platform` ("cpu", "gpu", "tpu": e.g. `mesh.devices.flat[0].platform`)."""
  get = fields.get
  return Kernels.of(platform, get("matmul", "auto"), get("attn_impl"), get("remat", "none"),
                    get("unroll", False))


def build_model(config, platform):
  """The MaskedAutoencoder a full run config describes (AllTokensMAE where
  model.encoder_tokens is "all"), with the kernels of its model block for devices of
  `platform`."""
  cls = ENCODERS[config.model.get("encoder_tokens", "visible")]
  return cls(**model_kwargs(config.model, config.data.image_size, config.data.channels),
             kernels=kernels_of(config.model, platform))


def check(config, explicit=()):
  """Raise checks.ConfigError on the first model field of a run config that cannot work: a
  known variant, consistent sizes, a mask that leaves patches visible. `explicit`: the
  fields given on the command line, which an error blames first."""
  m = config.model
  checks.check_choice(m.mask_strategy, "model.mask_strategy", sorted(masking.STRATEGIES))
  checks.check_choice(m.dtype, "model.dtype", sorted(DTYPES))
  checks.check_choice(m.remat, "model.remat", sorted(vit.REMAT_POLICIES))
  checks.check_choice(m.attn_impl, "model.attn_impl", [None, "xla", "cudnn"])
  checks.check_choice(m.matmul, "model.matmul", list(kernels.MATMULS))
  checks.check_choice(m.get("encoder_tokens", "visible"), "model.encoder_tokens", sorted(ENCODERS))
  try:
    kw = model_kwargs(m, config.data.image_size, config.data.channels)
  except ValueError as e:
    raise checks.ConfigError(f"config.{e}") from None
  for field in ("width", "depth", "num_heads", "patch_size", "decoder_width", "decoder_depth",
                "decoder_heads"):
    checks.check_int(kw[field], f"model.{field}", 1)
  checks.check_int(kw["image_size"], "data.image_size", 1)
  checks.check_number(m.mlp_ratio, "model.mlp_ratio", 0, strict=True)
  if kw["image_size"] % kw["patch_size"]:  # blamed on the field the user set
    patch_field = "model.patch_size" if m.get("patch_size") is not None else "model.variant"
    checks.check(patch_field not in explicit or "data.image_size" in explicit, patch_field,
                 f"{m.patch_size if patch_field == 'model.patch_size' else m.variant!r} gives "
                 f"patch size {kw['patch_size']}, which does not divide data.image_size "
                 f"{kw['image_size']}")
    checks.check(False, "data.image_size", f"{kw['image_size']} is not a positive multiple of "
                 f"the patch size {kw['patch_size']} ({patch_field})")
  for width, why in (("width", " (2D sin-cos)"), ("decoder_width", "")):
    checks.check(kw[width] % 4 == 0, f"model.{width}", f"{kw[width]} must be divisible by 4{why}")
  for width, heads in (("width", "num_heads"), ("decoder_width", "decoder_heads")):
    checks.check(kw[width] % kw[heads] == 0, f"model.{heads}",
                 f"{kw[heads]} does not divide {width} {kw[width]}")
  checks.check(checks.is_number(m.mask_ratio) and 0 < m.mask_ratio < 1, "model.mask_ratio",
               f"{m.mask_ratio} must be in (0, 1)")
  num_patches = (kw["image_size"] // kw["patch_size"])**2
  checks.check(masking.num_visible(num_patches, m.mask_ratio) >= 1, "model.mask_ratio",
               f"{m.mask_ratio} leaves no visible patch out of {num_patches}")
  stages.check(config, kw["patch_size"])  # config.schedule's sizes and ratios


# Fields that fix the shapes of the saved parameters and optimizer state: model_kwargs key
# -> config path.
SHAPE_FIELDS = {
    **{f: f"model.{f}" for f in ("width", "depth", "num_heads", "patch_size", "mlp_ratio",
                                 "decoder_width", "decoder_depth", "decoder_heads")},
    "image_size": "data.image_size", "channels": "data.channels"}


def model_shape(config):
  """{config path: value} of the SHAPE_FIELDS of a run config (a ConfigDict, or the dict of
  a saved config.json), the variant decoded."""
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  kw = model_kwargs(config.model, config.data.image_size, config.data.channels)
  return {path: kw[key] for key, path in SHAPE_FIELDS.items()}
