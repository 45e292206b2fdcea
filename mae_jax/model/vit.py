"""Vision Transformer parts (Linen): attention, MLP, pre-LN block, a block stack and the
encoder that the MAE and the classifier share.

Initialization follows the reference MAE: xavier-uniform kernels, zero biases,
LayerNorm eps 1e-6. Compute runs in `dtype`, parameters stay in `param_dtype`;
attention logits and softmax are float32.
"""
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.model import kernels as kernels_lib, patches, posembed

Dtype = Any
xavier = nn.initializers.xavier_uniform()
token_init = nn.initializers.normal(stddev=0.02)  # cls and mask tokens
LN_EPS = 1e-6
DEFAULT_KERNELS = kernels_lib.Kernels()  # XLA's matmul and attention, no remat, scanned


def dense(features, name, dtype, param_dtype, kernels=DEFAULT_KERNELS, kernel_init=xavier):
  """Flax's nn.Dense (xavier-uniform kernel, zero bias) with the kernels' matmul."""
  return nn.Dense(features, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                  dot_general=kernels.dot_general, name=name)


def batch_split(x):
  """x with its leading axis named "batch": split over the mesh's batch axes in every
  program mae_jax.train.program builds (sharding.LOGICAL_RULES), unconstrained elsewhere (a
  plain model.apply). See sharding.LOGICAL_RULES for why."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def layer_norm(name, dtype, param_dtype):
  """LayerNorm with the two-pass variance of the reference (torch): Flax's default
  E[x^2] - E[x]^2 loses float32 precision on tokens whose mean dwarfs their spread."""
  return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (the reference layout)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: kernels_lib.Kernels = DEFAULT_KERNELS  # how it computes (matmul, attention)

  @nn.compact
  def __call__(self, x_BTD):
    b, t, d = x_BTD.shape
    h = self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)
    qkv = batch_split(dense(3 * d, "qkv", **kw)(x_BTD))
    q, k, v = jnp.split(qkv.reshape(b, t, 3, h, d // h), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    impl = self.kernels.attention_for(q.dtype, d // h)
    try:
      out_BTHK = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    except (ValueError, NotImplementedError) as e:  # raised while tracing, before compiling
      if self.kernels.attention != "auto":
        raise
      logging.warning("cuDNN attention does not apply here (%s); using XLA's", e)
      out_BTHK = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return dense(d, "proj", **kw)(out_BTHK.reshape(b, t, d))


def gelu(x):
  """Exact GELU as the reference computes it: x / 2 * (1 + erf(x / sqrt(2))).

  jax.nn.gelu(approximate=False) takes the erfc form, which XLA's CPU backend evaluates
  more slowly: with this one train steps on 2 cores ran 0.98 to 1.10x as fast, about 1.05x
  typically (docs/benchmarks.md). Within 1e-6 of the float64 values in float32.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5 ** 0.5, x.dtype)))


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: kernels_lib.Kernels = DEFAULT_KERNELS

  @nn.compact
  def __call__(self, x_BTD):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)
    y = batch_split(gelu(dense(self.hidden_dim, "fc1", **kw)(x_BTD)))
    return dense(x_BTD.shape[-1], "fc2", **kw)(y)


def drop_path(y_BTD, rate, rng):
  """Stochastic depth: zero each example's residual branch with probability `rate` (a
  traced scalar), scale the kept ones by 1 / (1 - rate)."""
  keep = 1.0 - rate
  keep_B11 = jax.random.bernoulli(rng, keep, (y_BTD.shape[0], 1, 1))
  return jnp.where(keep_B11, y_BTD / keep.astype(y_BTD.dtype), jnp.zeros_like(y_BTD))


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x))."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: kernels_lib.Kernels = DEFAULT_KERNELS

  @nn.compact
  def __call__(self, x_BTD, drop_rate=None):
    """drop_rate: this block's drop-path rate (scanned in by BlockStack), None = none."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ops = dict(kw, kernels=self.kernels)
    branch = lambda y: y if drop_rate is None else drop_path(y, drop_rate,
                                                              self.make_rng("dropout"))
    x_BTD = batch_split(x_BTD)
    y = layer_norm("norm1", **kw)(x_BTD)
    x_BTD = x_BTD + branch(Attention(self.num_heads, name="attn", **ops)(y))
    y = layer_norm("norm2", **kw)(x_BTD)
    x_BTD = x_BTD + branch(Mlp(self.mlp_dim, name="mlp", **ops)(y))
    return x_BTD, None


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class BlockStack(nn.Module):
  """`depth` Blocks with parameters stacked on a leading layer axis.

  The stack is an nn.scan (one compiled block, fast compiles); kernels.unroll unrolls it
  in the compiled program without changing the parameter layout. kernels.remat names a
  policy in REMAT_POLICIES. `drop_path` > 0 drops residual branches when called with
  deterministic=False (rates rising linearly from 0 at the first block to drop_path at
  the last, as the reference's fine-tuning; needs a 'dropout' RNG).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  drop_path: float = 0.0  # stochastic-depth rate of the last block; 0 = off
  kernels: kernels_lib.Kernels = DEFAULT_KERNELS

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
    x_BTD, _ = stack(self.num_heads, self.mlp_dim, dtype=self.dtype,
                     param_dtype=self.param_dtype, kernels=self.kernels,
                     name="layers")(x_BTD, rates_L)
    return x_BTD


# The fields an owner (MAE, classifier) passes on to its Encoder.
ENCODER_FIELDS = ("image_size", "patch_size", "channels", "width", "depth", "num_heads",
                  "mlp_ratio", "dtype", "param_dtype", "kernels")


class Encoder(nn.Module):
  """The ViT encoder: patch embedding, cls token, position embedding, blocks, final norm.

  One module for the MAE, its all-token variant and the fine-tuning classifier. Owners
  attach it with `nn.share_scope`, so its parameters sit at the owner's top level under
  the reference's names (`patch_embed`, `cls_token`, `blocks`, `norm`, and `pos_embed`
  when learned): the names the converter and existing checkpoints use. Parameters are
  created only by the methods called, so a classifier that pools without `norm` has none.
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
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: kernels_lib.Kernels = DEFAULT_KERNELS

  @property
  def grid_size(self):
    return (self.image_size // self.patch_size,) * 2

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.patch_embed = dense(self.width, "patch_embed", kernels=self.kernels, **kw)
    self.cls_token = self.param("cls_token", token_init, (1, 1, self.width), self.param_dtype)
    if self.learned_pos_embed:
      table = lambda _, shape, dtype: self.sincos_table().reshape(shape).astype(dtype)
      self.pos_embed = self.param("pos_embed", table, (1, self.num_tokens, self.width),
                                  self.param_dtype)
    self.blocks = BlockStack(self.depth, self.num_heads, int(self.width * self.mlp_ratio),
                             drop_path=self.drop_path, kernels=self.kernels, **kw)
    self.norm = layer_norm("norm", **kw)

  @property
  def num_tokens(self):
    return 1 + self.grid_size[0] * self.grid_size[1]

  def sincos_table(self):
    """The fixed 2D sin-cos position embedding (1 + N, D), cls position first."""
    return posembed.sincos_2d(self.width, self.grid_size)

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
  """An Encoder with `owner`'s ENCODER_FIELDS. The owner's setup assigns it and shares its
  scope, so the parameter names stay flat:
      self.encoder = encoder_of(self)
      nn.share_scope(self, self.encoder)
  """
  return Encoder(**{f: getattr(owner, f) for f in ENCODER_FIELDS}, **overrides)
