"""Matrix-product kernels for the Dense layers, chosen per platform by `model.matmul`.

Every Dense layer of the model is Flax's stock `nn.Dense`; what differs between platforms
is only the `dot_general` it is given. `dot_general_for(matmul, platform)` resolves the
model field: "auto" takes the platform's own kernel (the CPU one on "cpu", XLA's dot
everywhere else), "xla" and "cpu" force one. The platform is that of the devices a program
is compiled for, never the host's default backend, so a TPU program compiled on a CPU host
is the TPU program.
"""
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


def _token_matmul_fwd(x_BTI, w_IO):
  return jnp.dot(x_BTI, w_IO), (x_BTI, w_IO)


def _token_matmul_bwd(res, g_BTO):
  x_BTI, w_IO = res
  x_MI = x_BTI.reshape(-1, x_BTI.shape[-1])
  g_MO = g_BTO.reshape(-1, g_BTO.shape[-1])
  return jnp.dot(g_BTO, w_IO.T), jnp.dot(x_MI.T, g_MO)


token_matmul.defvjp(_token_matmul_fwd, _token_matmul_bwd)


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


def dot_general_for(matmul, platform):
  """The `dot_general` that nn.Dense layers get for a model.matmul value and a platform."""
  return _KERNELS[resolve_matmul(matmul, platform)]
