"""How the layers compute, chosen once for the devices a program is built for: `Kernels`.

The model classes carry what defines the math (sizes, dtypes); one `Kernels` object says how
it runs: every Dense layer's `dot_general`, the attention implementation, the block stacks'
remat policy and scan unrolling. `Kernels.of` resolves the config's choices for the platform
of the devices the program is compiled for, never the host's default backend, so a TPU
program compiled on a CPU host is the TPU program.
"""
import dataclasses

import jax
import jax.numpy as jnp

MATMULS = ("auto", "xla", "cpu")


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


def _token_matmul_bwd(res, g_BTO):
  x_BTI, w_IO = res
  x_MI, g_MO = (a.reshape(-1, a.shape[-1]) for a in (x_BTI, g_BTO))
  return jnp.dot(g_BTO, w_IO.T), jnp.dot(x_MI.T, g_MO)


token_matmul.defvjp(lambda x_BTI, w_IO: (jnp.dot(x_BTI, w_IO), (x_BTI, w_IO)), _token_matmul_bwd)


def cpu_dot_general(lhs, rhs, dimension_numbers, precision=None,
                    preferred_element_type=None):
  """`lax.dot_general` for nn.Dense's contraction (lhs's last axis with rhs's first, no
  batch axes) through `token_matmul`; any other contraction goes to lax.dot_general."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  dense = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
           and rhs.ndim == 2 and not lhs_batch and not rhs_batch)
  if not dense or precision is not None or preferred_element_type is not None:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  return token_matmul(lhs, rhs)


_KERNELS = {"xla": jax.lax.dot_general, "cpu": cpu_dot_general}


def resolve_matmul(matmul, platform):
  """The concrete kernel name ("xla" or "cpu") for a model.matmul value and a platform
  ("cpu", "gpu", "tpu"; None = unknown, XLA's)."""
  if matmul not in MATMULS:
    raise ValueError(f"matmul={matmul!r}: expected one of {MATMULS}")
  if matmul == "auto":
    return "cpu" if platform == "cpu" else "xla"
  return matmul


@dataclasses.dataclass(frozen=True)
class Kernels:
  """How the layers of a model compute (not what: the values do not depend on it).

  matmul: "xla" (lax.dot_general) or "cpu" (token_matmul, the CPU backend's fast weight
  gradient). attention: jax.nn.dot_product_attention's implementation, or "auto": cuDNN's
  fused attention where it applies (bfloat16 / float16, a head dim that is a multiple of 8
  and at most 128), else XLA's; `of` gives "auto" only for GPUs. remat: the block stacks'
  recompute policy (vit.REMAT_POLICIES); unroll: unroll their scans.
  """
  matmul: str = "xla"
  attention: str = "xla"
  remat: str = "none"
  unroll: bool = False

  @classmethod
  def of(cls, platform, matmul="auto", attn_impl=None, remat="none", unroll=False):
    """The kernels for devices of `platform` ("cpu", "gpu", "tpu"; None: unknown, XLA's)
    from the config's values: matmul in MATMULS, attn_impl None (auto) | "xla" | "cudnn"."""
    attention = attn_impl or ("auto" if platform == "gpu" else "xla")
    return cls(resolve_matmul(matmul, platform), attention, remat, bool(unroll))

  @property
  def dot_general(self):
    return _KERNELS[self.matmul]

  def attention_for(self, dtype, head_dim):
    """The implementation an attention of `head_dim` in `dtype` runs."""
    if self.attention != "auto":
      return self.attention
    fused = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
             and head_dim <= 128)
    return "cudnn" if fused else "xla"
