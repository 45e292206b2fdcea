"""Vision Transformer parts (Linen): attention, MLP, pre-LN block, a block stack and the
encoder that the MAE and the classifier share.

Initialization follows the reference MAE: xavier-uniform kernels, zero biases,
LayerNorm eps 1e-6. Compute runs in `dtype`, parameters stay in `param_dtype`;
attention logits and softmax are float32.
"""
import dataclasses
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.model import kernels as kernels_lib, patches, posembed

Dtype = Any
xavier = nn.initializers.xavier_uniform()
token_init = nn.initializers.normal(stddev=0.02)  # cls and mask tokens
DEFAULT_KERNELS = kernels_lib.Kernels()  # XLA's matmul and attention, no remat, scanned


def dense(features, name, dtype, param_dtype, kernels=DEFAULT_KERNELS, kernel_init=xavier):
  """Flax's nn.Dense (xavier-uniform kernel, zero bias) with the kernels' matmul."""
  return nn.Dense(features, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                  dot_general=kernels.dot_general, name=name)


def batch_split(x):
  """x with its leading axis named "batch": split over the mesh's batch axes in the programs
  of mae_jax.train.program, unconstrained in a plain model.apply (sharding.LOGICAL_RULES)."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def layer_norm(name, dtype, param_dtype):
  """LayerNorm with the two-pass variance of the reference (torch): Flax's default
  E[x^2] - E[x]^2 loses float32 precision on tokens whose mean dwarfs their spread."""
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name)


class Layer(nn.Module):
  """The keyword-only fields of every model module; `ops` hands them to its sublayers."""
  _: dataclasses.KW_ONLY
  dtype: Dtype = jnp.float32        # compute dtype
  param_dtype: Dtype = jnp.float32  # parameters stay float32
  # How it computes (matmul, attention, remat, unroll), not what: chosen for the devices
  # where the program is built (kernels.Kernels.of)
  kernels: kernels_lib.Kernels = DEFAULT_KERNELS

  @property
  def ops(self):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)


class Attention(Layer):
  """Multi-head self-attention with a fused qkv projection (the reference layout)."""
  num_heads: int

  @nn.compact
  def __call__(self, x_BTD):
    b, t, d = x_BTD.shape
    h = self.num_heads
    qkv = batch_split(dense(3 * d, "qkv", **self.ops)(x_BTD))
    q, k, v = (y[:, :, 0] for y in jnp.split(qkv.reshape(b, t, 3, h, d // h), 3, axis=2))
    impl = self.kernels.attention_for(q.dtype, d // h)
    try:
      out_BTHK = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    except (ValueError, NotImplementedError) as e:  # raised while tracing, before compiling
      if self.kernels.attention != "auto":
        raise
      logging.warning("cuDNN attention does not apply here (%s); using XLA's", e)
      out_BTHK = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return dense(d, "proj", **self.ops)(out_BTHK.reshape(b, t, d))


def gelu(x):
  """Exact GELU as the reference computes it, x / 2 * (1 + erf(x / sqrt(2))): within 1e-6 of
  float64 in float32. jax.nn.gelu(approximate=False) takes the erfc form, which XLA's CPU
  backend runs more slowly (train steps about 1.05x slower on 2 cores, docs/benchmarks.md)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5 ** 0.5, x.dtype)))


class Mlp(Layer):
  """fc1 -> exact GELU -> fc2."""
  hidden_dim: int

  @nn.compact
  def __call__(self, x_BTD):
    y = batch_split(gelu(dense(self.hidden_dim, "fc1", **self.ops)(x_BTD)))
    return dense(x_BTD.shape[-1], "fc2", **self.ops)(y)


def drop_path(y_BTD, rate, rng):
  """Stochastic depth: zero each example's residual branch with probability `rate` (a
  traced scalar), scale the kept ones by 1 / (1 - rate)."""
  keep = 1.0 - rate
  keep_B11 = jax.random.bernoulli(rng, keep, (y_BTD.shape[0], 1, 1))
  return jnp.where(keep_B11, y_BTD / keep.astype(y_BTD.dtype), jnp.zeros_like(y_BTD))


class Block(Layer):
  """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x))."""
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x_BTD, drop_rate=None):
    """drop_rate: this block's drop-path rate (scanned in by BlockStack), None = none."""
    branch = lambda y: y if drop_rate is None else drop_path(y, drop_rate,
                                                              self.make_rng("dropout"))
    x_BTD = batch_split(x_BTD)
    y = layer_norm("norm1", self.dtype, self.param_dtype)(x_BTD)
    x_BTD = x_BTD + branch(Attention(self.num_heads, name="attn", **self.ops)(y))
    y = layer_norm("norm2", self.dtype, self.param_dtype)(x_BTD)
    x_BTD = x_BTD + branch(Mlp(self.mlp_dim, name="mlp", **self.ops)(y))
    return x_BTD, None


REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


class BlockStack(Layer):
  """`depth` Blocks, their parameters stacked on a leading layer axis by an nn.scan (one
  compiled block, fast compiles); kernels.unroll unrolls it without changing that layout,
  kernels.remat names a REMAT_POLICIES policy. With drop_path > 0 and deterministic=False,
  residual branches are dropped at rates rising linearly from 0 at the first block to
  drop_path at the last (the reference's fine-tuning; needs a 'dropout' RNG)."""
  depth: int
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0  # stochastic-depth rate of the last block; 0 = off

  @nn.compact
  def __call__(self, x_BTD, deterministic=True):
    block, remat = Block, self.kernels.remat
    if remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[remat], prevent_cse=False)
    stack = nn.scan(block, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True},
                    length=self.depth, unroll=self.depth if self.kernels.unroll else 1)
    rates_L = None  # per-block drop-path rates, scanned over with the parameters
    if self.drop_path > 0 and not deterministic:
      rates_L = jnp.linspace(0.0, self.drop_path, self.depth, dtype=jnp.float32)
    return stack(self.num_heads, self.mlp_dim, name="layers", **self.ops)(x_BTD, rates_L)[0]


# The fields an owner (MAE, classifier) passes on to its Encoder.
ENCODER_FIELDS = ("image_size", "patch_size", "channels", "width", "depth", "num_heads",
                  "mlp_ratio", "dtype", "param_dtype", "kernels")


class Encoder(Layer):
  """The ViT encoder: patch embedding, cls token, position embedding, blocks, final norm.

  One module for the MAE, its all-token variant and the classifier. Owners attach it with
  `nn.share_scope`, so its parameters sit at their top level under the reference's names
  (`patch_embed`, `cls_token`, `blocks`, `norm`, `pos_embed` when learned), which the
  converter and checkpoints use. Only the methods called create parameters: a classifier
  that pools without `norm` has none.
  """
  image_size: int
  patch_size: int
  channels: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0          # stochastic depth of the last block (fine-tuning)
  learned_pos_embed: bool = False  # a trained `pos_embed`, initialized from the sin-cos table

  def setup(self):
    self.patch_embed = dense(self.width, "patch_embed", **self.ops)
    self.cls_token = self.param("cls_token", token_init, (1, 1, self.width), self.param_dtype)
    if self.learned_pos_embed:
      table = lambda _, dtype: self.sincos_table()[None].astype(dtype)
      self.pos_embed = self.param("pos_embed", table, self.param_dtype)
    self.blocks = BlockStack(self.depth, self.num_heads, int(self.width * self.mlp_ratio),
                             drop_path=self.drop_path, **self.ops)
    self.norm = layer_norm("norm", self.dtype, self.param_dtype)

  def sincos_table(self):
    """The fixed 2D sin-cos position embedding (1 + N, D), cls position first."""
    return posembed.sincos_2d(self.width, (self.image_size // self.patch_size,) * 2)

  def position_table(self):
    """The position embedding in use (1 + N, D): learned, or the fixed table."""
    return self.pos_embed[0] if self.learned_pos_embed else self.sincos_table()

  def embed(self, images_BHWC):
    """Patch embedding (a linear map of flattened patches) + position embedding: (B, N, D)."""
    x_BND = self.patch_embed(patches.patchify(images_BHWC.astype(self.dtype), self.patch_size))
    return x_BND + self.position_table()[1:].astype(self.dtype)

  def prepend_cls(self, x_BKD):
    """(B, K, D) -> (B, 1 + K, D) with the cls token (+ its position embedding) first."""
    cls = (self.cls_token + self.position_table()[:1]).astype(self.dtype)
    return jnp.concatenate([jnp.broadcast_to(cls, (x_BKD.shape[0], 1, self.width)), x_BKD],
                           axis=1)

  def transform(self, x_BTD, deterministic=True):
    """The transformer blocks, without the final norm: (B, T, D) -> (B, T, D)."""
    return self.blocks(x_BTD, deterministic=deterministic)

  def __call__(self, x_BTD, deterministic=True):
    """Blocks then the final norm over a token sequence (B, T, D)."""
    return self.norm(self.transform(x_BTD, deterministic))


def encoder_of(owner, **overrides):
  """An Encoder with `owner`'s ENCODER_FIELDS, which the owner's setup assigns to
  `self.encoder` and attaches with `nn.share_scope(self, self.encoder)`: flat parameter names."""
  return Encoder(**{f: getattr(owner, f) for f in ENCODER_FIELDS}, **overrides)
