"""Model invariants: patches, position embeddings, encoder/decoder shapes and masking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import model_fields
from mae_jax.model import kernels, mae, patches, posembed, sizes, vit
from mae_jax.model.mae import MaskedAutoencoder

TINY = model_fields(depth=2, num_heads=4, decoder_width=16)


def init(model, batch=2, seed=0):
  x = jnp.zeros((batch, model.image_size, model.image_size, model.channels))
  return jax.jit(model.init)({"params": jax.random.key(seed), "mask": jax.random.key(1)},
                             x)["params"]


def test_patchify_roundtrip_and_layout():
  x = np.random.default_rng(0).normal(size=(2, 12, 8, 3)).astype(np.float32)
  p = patches.patchify(x, 4)
  assert p.shape == (2, 6, 48)
  # Patch (row 1, col 0) holds pixels [4:8, 0:4] flattened as (p_row, p_col, channel).
  np.testing.assert_array_equal(p[:, 2], x[:, 4:8, 0:4, :].reshape(2, -1))
  np.testing.assert_array_equal(patches.unpatchify(p, 4, (3, 2), 3), x)


def closed_form(d, row, col):
  """Reference formula for one grid position: [col encoding | row encoding]."""
  def enc(pos, dim):
    k = np.arange(dim // 2)
    w = 1.0 / 10000**(k / (dim / 2))
    return np.concatenate([np.sin(pos * w), np.cos(pos * w)])
  return np.concatenate([enc(col, d // 2), enc(row, d // 2)])


@pytest.mark.parametrize("row,col", [(0, 0), (0, 3), (2, 1), (4, 4)])
def test_posembed_closed_form(row, col):
  table = posembed.sincos_2d(16, (5, 5))
  assert table.shape == (26, 16)
  np.testing.assert_array_equal(table[0], 0)  # cls slot
  np.testing.assert_allclose(table[1 + row * 5 + col], closed_form(16, row, col), atol=1e-6)


@pytest.mark.slow
def test_shapes_dtypes_and_param_dtype():
  model = MaskedAutoencoder(**TINY, dtype=jnp.bfloat16)
  params = init(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  x = jnp.ones((3, 16, 16, 3))
  out = model.apply({"params": params}, x, rngs={"mask": jax.random.key(2)})
  assert out["pred"].shape == (3, 16, 48) and out["pred"].dtype == jnp.float32
  assert out["mask"].shape == (3, 16)
  assert np.all(np.asarray(out["mask"]).sum(1) == 12)  # K = int(16 * 0.25) = 4 visible
  feats = model.apply({"params": params}, x, method=model.encode)
  assert feats.shape == (3, 17, 32) and feats.dtype == jnp.bfloat16


def test_official_initialization():
  params = init(MaskedAutoencoder(**dict(TINY, width=64, decoder_width=64)))
  qkv = np.asarray(params["blocks"]["layers"]["attn"]["qkv"]["kernel"][0])  # (64, 192)
  bound = np.sqrt(6 / (64 + 192))  # xavier-uniform
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound
  pe = np.asarray(params["patch_embed"]["kernel"])  # flattened linear: fan_in = p*p*C
  assert np.abs(pe).max() <= np.sqrt(6 / (48 + 64))
  assert 0.01 < np.std(np.asarray(params["cls_token"])) < 0.03
  np.testing.assert_array_equal(params["norm"]["scale"], 1)
  np.testing.assert_array_equal(params["blocks"]["layers"]["mlp"]["fc1"]["bias"], 0)


def test_encoder_ignores_masked_pixels():
  model = MaskedAutoencoder(**TINY)
  params = init(model)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  noise = rng.uniform(size=(2, 16)).astype(np.float32)
  enc = lambda img: model.apply({"params": params}, img, noise, method=model.encode_masked)
  latent, mask, _ = enc(x)
  pix_mask = np.asarray(patches.unpatchify(
      np.repeat(np.asarray(mask)[:, :, None], 48, -1), 4, (4, 4), 3))
  x2 = x + 10.0 * pix_mask * rng.normal(size=x.shape).astype(np.float32)
  latent2, _, _ = enc(x2)
  np.testing.assert_allclose(latent, latent2, atol=1e-6)
  x3 = x + 10.0 * (1 - pix_mask) * rng.normal(size=x.shape).astype(np.float32)
  assert np.abs(np.asarray(enc(x3)[0]) - np.asarray(latent)).max() > 1e-2  # visible ones matter


def test_loss_ignores_visible_predictions():
  rng = np.random.default_rng(1)
  pred, target = rng.normal(size=(2, 2, 8, 5)).astype(np.float32)
  mask = np.array([[1, 0, 1, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0, 1]], np.float32)[..., None]
  mask = mask[..., 0]
  base = mae.mae_loss(pred, target, mask)
  pred2 = pred + 5.0 * (1 - mask)[..., None]
  np.testing.assert_allclose(mae.mae_loss(pred2, target, mask), base, rtol=1e-6)
  expected = (((pred - target)**2).mean(-1) * mask).sum() / mask.sum()
  np.testing.assert_allclose(base, expected, rtol=1e-6)
  pred3 = pred + 1.0 * mask[..., None]
  assert abs(float(mae.mae_loss(pred3, target, mask)) - float(base)) > 1e-3


def test_norm_pix_targets_match_numpy():
  x = np.random.default_rng(2).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  t = np.asarray(mae.patch_targets(x, 4, norm_pix_loss=True))
  raw = x.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
  mean = raw.mean(-1, keepdims=True)
  var = raw.var(-1, ddof=1, keepdims=True)  # unbiased, as the reference's torch.var
  np.testing.assert_allclose(t, (raw - mean) / np.sqrt(var + 1e-6), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(mae.patch_targets(x, 4, norm_pix_loss=False), raw)


def test_presets_decode():
  assert sizes.decode_variant("B/16") == dict(width=768, depth=12, num_heads=12, patch_size=16)
  assert sizes.decode_variant("vit_huge") == dict(width=1280, depth=32, num_heads=16,
                                                    patch_size=14)
  assert sizes.decode_variant("L/16")["depth"] == 24
  with pytest.raises(ValueError, match="model.variant"):
    sizes.decode_variant("XL/16")


def test_scan_unroll_and_remat_give_same_output():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 16, 3)), jnp.float32)
  noise = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 16)), jnp.float32)
  base = MaskedAutoencoder(**TINY)
  params = init(base)
  ref = base.apply({"params": params}, x, noise)["pred"]
  for kw in (dict(unroll=True), dict(remat="full"), dict(remat="dots")):
    model = MaskedAutoencoder(**TINY, kernels=kernels.Kernels(**kw))
    out = model.apply({"params": params}, x, noise)["pred"]
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("backend,dtype,head_dim,expected", [
    ("gpu", jnp.bfloat16, 64, "cudnn"), ("gpu", jnp.float16, 128, "cudnn"),
    ("gpu", jnp.float32, 64, "xla"),     # cuDNN's fused attention is half precision only
    ("gpu", jnp.bfloat16, 160, "xla"),   # head dim above 128
    ("gpu", jnp.bfloat16, 36, "xla"),    # not a multiple of 8
    ("cpu", jnp.bfloat16, 64, "xla"), ("tpu", jnp.bfloat16, 64, "xla")])
def test_auto_attention_picks_cudnn_only_where_it_applies(backend, dtype, head_dim, expected):
  assert kernels.Kernels.of(backend).attention_for(dtype, head_dim) == expected
  assert kernels.Kernels.of(backend, attn_impl="xla").attention_for(dtype, head_dim) == "xla"


@pytest.mark.parametrize("shape,dtype", [((3, 5, 8), jnp.float32), ((7, 8), jnp.float32),
                                         ((3, 5, 8), jnp.bfloat16)])
def test_token_matmul_gradients_are_autodiffs(shape, dtype):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=shape), dtype)
  w = jnp.asarray(rng.normal(size=(8, 6)), dtype)
  probe = jnp.asarray(rng.normal(size=shape[:-1] + (6,)), jnp.float32)
  loss = lambda f: lambda x, w: (jnp.sin(f(x, w).astype(jnp.float32)) * probe).sum()
  ours = jax.grad(loss(kernels.token_matmul), argnums=(0, 1))(x, w)
  ref = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(ours, ref):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("matmul,platform,expected", [
    ("auto", "cpu", "cpu"), ("auto", "gpu", "xla"), ("auto", "tpu", "xla"),
    ("auto", None, "xla"), ("xla", "cpu", "xla"), ("cpu", "tpu", "cpu")])
def test_matmul_kernel_follows_the_platform(matmul, platform, expected):
  assert kernels.resolve_matmul(matmul, platform) == expected


def test_cpu_dense_matches_xla_dense():
  """nn.Dense with the CPU kernel: same parameters, outputs and gradients as with XLA's."""
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, 8)), jnp.float32)
  layer = lambda matmul: vit.dense(6, "d", jnp.float32, jnp.float32,
                                   kernels=kernels.Kernels(matmul=matmul))
  ours, ref = layer("cpu"), layer("xla")
  params = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
  loss = lambda m: lambda p: (jnp.tanh(m.apply(p, x)) ** 2).sum()
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-6)
  g, g_ref = jax.grad(loss(ours))(params), jax.grad(loss(ref))(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def custom_vjp_calls(model, params, x, noise):
  """How many custom-VJP products the traced program of `model` holds."""
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, noise)["pred"])(params)
  return str(jaxpr).count("custom_vjp_call")


def test_model_kernels_are_chosen_for_the_platform_given():
  """The same model takes token_matmul with the kernels of platform "cpu" and XLA's dot
  with those of "tpu", whatever the host: the choice is in the traced program, not in the
  backend."""
  x = jnp.zeros((2, 16, 16, 3))
  noise = jnp.asarray(np.random.default_rng(8).uniform(size=(2, 16)), jnp.float32)
  params = init(MaskedAutoencoder(**TINY))
  for platform, calls in (("cpu", lambda n: n > 0), ("tpu", lambda n: n == 0)):
    model = MaskedAutoencoder(**TINY, kernels=kernels.Kernels.of(platform))
    assert calls(custom_vjp_calls(model, params, x, noise)), platform


@pytest.mark.slow
def test_mae_gradients_with_the_cpu_kernel_equal_xla_autodiff():
  """The whole MAE loss gradient is the same through token_matmul (the CPU path) as
  through XLA's autodiff of jnp.dot."""
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 16, 16, 3)), jnp.float32)
  noise = jnp.asarray(np.random.default_rng(8).uniform(size=(2, 16)), jnp.float32)
  params = init(MaskedAutoencoder(**TINY))
  def grad(matmul):
    model = MaskedAutoencoder(**TINY, kernels=kernels.Kernels(matmul=matmul))
    def loss(p):
      out = model.apply({"params": p}, x, noise)
      return mae.mae_loss(out["pred"], mae.patch_targets(x, 4, True), out["mask"])
    return jax.grad(loss)(params)
  for a, b in zip(jax.tree.leaves(grad("cpu")), jax.tree.leaves(grad("xla"))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_gelu_is_the_exact_gelu(dtype, tol):
  """Values against the float64 erf formula, gradients against jax.nn.gelu's exact form."""
  import math  # pylint: disable=import-outside-toplevel
  xs = jnp.asarray(np.linspace(-12, 12, 4001), dtype)
  ref = np.array([v / 2 * (1 + math.erf(v / math.sqrt(2))) for v in np.asarray(xs, np.float64)])
  out = vit.gelu(xs)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=tol, atol=tol)
  exact = lambda v: jax.nn.gelu(v, approximate=False)
  grad = jax.vmap(jax.grad(lambda v: vit.gelu(v).astype(jnp.float32)))(xs)
  grad_ref = jax.vmap(jax.grad(lambda v: exact(v).astype(jnp.float32)))(xs)
  np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(grad_ref, np.float32),
                             rtol=tol, atol=tol)
