"""Vision Transformer parts (Linen): attention, MLP, pre-LN block and a block stack.

Initialization follows the reference MAE: xavier-uniform kernels, zero biases,
LayerNorm eps 1e-6. Compute runs in `dtype`, parameters stay in `param_dtype`;
attention logits and softmax are float32.
"""
from typing import Any

from absl import logging
import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp

Dtype = Any
xavier = nn.initializers.xavier_uniform()
LN_EPS = 1e-6


@jax.custom_vjp
def token_matmul(x_BTI, w_IO):
  """x @ w over the last axis of x, with a backward pass shaped for XLA's CPU backend.

  Autodiff's weight gradient contracts the (batch, tokens) axes of the input and the output
  gradient as they are; XLA CPU then transposes the larger operand and runs a generic dot.
  Flattening to (batch * tokens, features) and contracting x^T @ g keeps every product on
  its fast matmul kernel: train steps are 1.13 to 1.17x faster on 2 cores
  (docs/benchmarks.md). The values are the autodiff ones.
  """
  return jnp.dot(x_BTI, w_IO)


def _token_matmul_fwd(x_BTI, w_IO):
  return jnp.dot(x_BTI, w_IO), (x_BTI, w_IO)


def _token_matmul_bwd(res, g_BTO):
  x_BTI, w_IO = res
  x_MI = x_BTI.reshape(-1, x_BTI.shape[-1])
  g_MO = g_BTO.reshape(-1, g_BTO.shape[-1])
  return jnp.dot(g_BTO, w_IO.T), jnp.dot(x_MI.T, g_MO)


token_matmul.defvjp(_token_matmul_fwd, _token_matmul_bwd)


class Dense(nn.Module):
  """nn.Dense's parameters (`kernel` (in, out), `bias`) and values; on the CPU backend the
  product is `token_matmul`, elsewhere XLA's own dot and its autodiff."""
  features: int
  kernel_init: Any = xavier
  bias_init: Any = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    matmul = token_matmul if jax.default_backend() == "cpu" else jnp.dot
    return matmul(x, kernel) + bias


def dense(features, name, dtype, param_dtype):
  return Dense(features, dtype=dtype, param_dtype=param_dtype, name=name)


def layer_norm(name, dtype, param_dtype):
  """LayerNorm with the two-pass variance of the reference (torch): Flax's default
  E[x^2] - E[x]^2 loses float32 precision on tokens whose mean dwarfs their spread."""
  return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name)


def auto_attention(backend, dtype, head_dim):
  """The attention kernel for implementation=None: cuDNN's fused attention on a GPU in
  bfloat16 / float16 with a head dim it supports (a multiple of 8, at most 128), else XLA.
  jax.nn.dot_product_attention's own None always means XLA."""
  if (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  return "xla"


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (the reference layout)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str | None = None  # jax.nn.dot_product_attention: None (auto), "xla", "cudnn"

  @nn.compact
  def __call__(self, x_BTD):
    b, t, d = x_BTD.shape
    h = self.num_heads
    qkv = dense(3 * d, "qkv", self.dtype, self.param_dtype)(x_BTD)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, h, d // h), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    impl = self.implementation or auto_attention(jax.default_backend(), q.dtype, d // h)
    try:
      out_BTHK = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    except (ValueError, NotImplementedError) as e:  # raised while tracing, before compiling
      if self.implementation is not None:
        raise
      logging.warning("cuDNN attention does not apply here (%s); using XLA's", e)
      out_BTHK = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return dense(d, "proj", self.dtype, self.param_dtype)(out_BTHK.reshape(b, t, d))


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

  @nn.compact
  def __call__(self, x_BTD):
    y = dense(self.hidden_dim, "fc1", self.dtype, self.param_dtype)(x_BTD)
    y = gelu(y)
    return dense(x_BTD.shape[-1], "fc2", self.dtype, self.param_dtype)(y)


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
  attn_impl: str | None = None

  @nn.compact
  def __call__(self, x_BTD, drop_rate=None):
    """drop_rate: this block's drop-path rate (scanned in by BlockStack), None = none."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    branch = lambda y: y if drop_rate is None else drop_path(y, drop_rate,
                                                              self.make_rng("dropout"))
    y = layer_norm("norm1", **kw)(x_BTD)
    x_BTD = x_BTD + branch(Attention(self.num_heads, implementation=self.attn_impl,
                                     name="attn", **kw)(y))
    y = layer_norm("norm2", **kw)(x_BTD)
    x_BTD = x_BTD + branch(Mlp(self.mlp_dim, name="mlp", **kw)(y))
    return x_BTD, None


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class BlockStack(nn.Module):
  """`depth` Blocks with parameters stacked on a leading layer axis.

  The stack is an nn.scan (one compiled block, fast compiles); `unroll` unrolls it in
  the compiled program without changing the parameter layout. `remat` names a policy in
  REMAT_POLICIES. `drop_path` > 0 drops residual branches when called with
  deterministic=False (rates rising linearly from 0 at the first block to drop_path at
  the last, as the reference's fine-tuning; needs a 'dropout' RNG).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"
  unroll: bool = False
  attn_impl: str | None = None
  drop_path: float = 0.0  # stochastic-depth rate of the last block; 0 = off

  @nn.compact
  def __call__(self, x_BTD, deterministic=True):
    block = Block
    if self.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    stack = nn.scan(block, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True},
                    length=self.depth, unroll=self.depth if self.unroll else 1)
    rates_L = None  # per-block drop-path rates, scanned over with the parameters
    if self.drop_path > 0 and not deterministic:
      rates_L = jnp.linspace(0.0, self.drop_path, self.depth, dtype=jnp.float32)
    x_BTD, _ = stack(self.num_heads, self.mlp_dim, dtype=self.dtype,
                     param_dtype=self.param_dtype, attn_impl=self.attn_impl,
                     name="layers")(x_BTD, rates_L)
    return x_BTD
