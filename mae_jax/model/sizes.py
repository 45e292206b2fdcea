"""Model presets: one size table decodes "Ti/16", "S/16", "B/16", "L/16", "H/14"."""
import jax.numpy as jnp

from mae_jax.model.kernels import Kernels
from mae_jax.model.mae import ENCODERS

# name -> (width, depth, heads); MLP ratio 4 throughout (ViT, Dosovitskiy et al. Table 1).
# "Mu" is not from the paper: a micro encoder for CPU demos on 28 x 28 images.
SIZES = {
    "Mu": (128, 4, 4),
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}
# Friendly aliases for the paper's presets.
PRESETS = {
    "vit_tiny": "Ti/16",
    "vit_small": "S/16",
    "vit_base": "B/16",
    "vit_large": "L/16",
    "vit_huge": "H/14",
}
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
