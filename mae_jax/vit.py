"""Vision Transformer parts (Linen): attention, MLP, pre-LN block and a block stack.

Initialization follows the reference MAE: xavier-uniform kernels, zero biases,
LayerNorm eps 1e-6. Compute runs in `dtype`, parameters stay in `param_dtype`;
attention logits and softmax are float32.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
xavier = nn.initializers.xavier_uniform()
LN_EPS = 1e-6


def dense(features, name, dtype, param_dtype):
  return nn.Dense(features, kernel_init=xavier, bias_init=nn.initializers.zeros,
                  dtype=dtype, param_dtype=param_dtype, name=name)


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
  implementation: str | None = None  # jax.nn.dot_product_attention: None (auto), "xla", "cudnn"

  @nn.compact
  def __call__(self, x_BTD):
    b, t, d = x_BTD.shape
    h = self.num_heads
    qkv = dense(3 * d, "qkv", self.dtype, self.param_dtype)(x_BTD)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, h, d // h), 3, axis=2)
    out_BTHK = jax.nn.dot_product_attention(
        q[:, :, 0], k[:, :, 0], v[:, :, 0], implementation=self.implementation)
    return dense(d, "proj", self.dtype, self.param_dtype)(out_BTHK.reshape(b, t, d))


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    y = dense(self.hidden_dim, "fc1", self.dtype, self.param_dtype)(x_BTD)
    y = nn.gelu(y, approximate=False)
    return dense(x_BTD.shape[-1], "fc2", self.dtype, self.param_dtype)(y)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x))."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attn_impl: str | None = None

  @nn.compact
  def __call__(self, x_BTD, _=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = layer_norm("norm1", **kw)(x_BTD)
    x_BTD = x_BTD + Attention(self.num_heads, implementation=self.attn_impl, name="attn",
                              **kw)(y)
    y = layer_norm("norm2", **kw)(x_BTD)
    x_BTD = x_BTD + Mlp(self.mlp_dim, name="mlp", **kw)(y)
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
  REMAT_POLICIES.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"
  unroll: bool = False
  attn_impl: str | None = None

  @nn.compact
  def __call__(self, x_BTD):
    block = Block
    if self.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=self.depth, unroll=self.depth if self.unroll else 1)
    x_BTD, _ = stack(self.num_heads, self.mlp_dim, dtype=self.dtype,
                     param_dtype=self.param_dtype, attn_impl=self.attn_impl,
                     name="layers")(x_BTD, None)
    return x_BTD
