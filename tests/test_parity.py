"""Numerical parity with the PyTorch reference, Hugging Face ViTMAEForPreTraining.

The reference is built from a ViTMAEConfig with random weights (nothing downloaded),
saved with save_pretrained and imported by mae_jax.convert, so the whole import path is
under test too. Both sides get the same images and the same masking noise.

Differences in HF's ViTMAE that the tests neutralize:
  * its random init leaves the fixed position embeddings at zero (transformers 5.x); a
    real checkpoint holds the sin-cos tables, so `randomize_` writes the official ones;
  * it draws its own torch.rand noise when none is given: we always pass `noise=`;
  * with mask_ratio 0 it still shuffles tokens by the noise: `encode` is compared with
    an ascending noise, whose shuffle is the identity;
  * interpolate_pos_encoding is left off (the images have the configured size).
"""
import copy

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

from mae_jax.model import mae, posembed, vit
from mae_jax.tools import convert
from mae_jax.train import optim, param_dirs

CASES = {
    "32px_p4": dict(image_size=32, patch_size=4, width=64, depth=2, num_heads=4,
                    decoder_width=32, decoder_depth=2, decoder_heads=4, batch=4),
    "224px_p16_base": dict(image_size=224, patch_size=16, width=768, depth=2, num_heads=12,
                           decoder_width=128, decoder_depth=1, decoder_heads=4, batch=2),
}
MASK_RATIO = 0.75
# LLVM -O0 halves the CPU compile time; results differ from -O2 by float rounding only.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
PAPER_OPTIM = dict(base_lr=1.5e-4, min_lr=0.0, weight_decay=0.05, b1=0.9, b2=0.95,
                   eps=1e-8, grad_clip=None)


def rel_err(got, want):
  """(max abs difference, that over max |want|)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = float(np.max(np.abs(got - want)))
  return err, err / max(float(np.max(np.abs(want))), 1e-30)


def report(case, what, got, want):
  err, rel = rel_err(got, want)
  print(f"\nPARITY {case} {what}: max abs {err:.3g}, rel {rel:.3g}")
  return rel


def official_sincos(embed_dim, grid):
  """The facebookresearch/mae util/pos_embed.py formula, (1 + grid^2, D), cls row 0."""
  def sincos_1d(dim, pos):
    omega = 1.0 / 10000**(np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid_w, grid_h = np.meshgrid(np.arange(grid, dtype=np.float32),
                               np.arange(grid, dtype=np.float32))  # w goes first
  emb = np.concatenate([sincos_1d(embed_dim // 2, grid_w),
                        sincos_1d(embed_dim // 2, grid_h)], axis=1)
  return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def hf_config(case, **overrides):
  c = CASES[case]
  kw = dict(hidden_size=c["width"], num_hidden_layers=c["depth"],
            num_attention_heads=c["num_heads"], intermediate_size=4 * c["width"],
            decoder_hidden_size=c["decoder_width"],
            decoder_num_hidden_layers=c["decoder_depth"],
            decoder_num_attention_heads=c["decoder_heads"],
            decoder_intermediate_size=4 * c["decoder_width"], image_size=c["image_size"],
            patch_size=c["patch_size"], num_channels=3, layer_norm_eps=1e-6,
            hidden_act="gelu", qkv_bias=True, mask_ratio=MASK_RATIO, norm_pix_loss=False)
  return ViTMAEConfig(**{**kw, **overrides})


def randomize_(model, case, seed):
  """Random weights that exercise every parameter (HF's init zeros biases and tokens)."""
  torch.manual_seed(seed)
  c = CASES[case]
  grid = c["image_size"] // c["patch_size"]
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("cls_token", "mask_token")):
        p.normal_(0.0, 0.1)
      elif p.ndim >= 2:
        p.normal_(0.0, p[0].numel()**-0.5)  # fan-in scaled: activations stay O(1)
      else:
        p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)  # LN scales, biases
    for table, width in ((model.vit.embeddings.position_embeddings, c["width"]),
                         (model.decoder.decoder_pos_embed, c["decoder_width"])):
      table.copy_(torch.from_numpy(official_sincos(width, grid)[None]).float())


class Reference:
  """One case: the HF model, the converted mae_jax model and params, inputs."""

  def __init__(self, case, tmp_dir):
    c = CASES[case]
    self.case = case
    self.hf = ViTMAEForPreTraining(hf_config(case)).eval()
    randomize_(self.hf, case, seed=0)
    self.hf.save_pretrained(tmp_dir / "hf")
    convert.import_checkpoint(str(tmp_dir / "hf"), str(tmp_dir / "mae_jax"))
    self.params, self.fields = param_dirs.load_params(str(tmp_dir / "mae_jax"))
    self.model = mae.MaskedAutoencoder(**self.fields)
    rng = np.random.default_rng(0)
    shape = (c["batch"], c["image_size"], c["image_size"], 3)
    self.images_BHWC = rng.standard_normal(shape).astype(np.float32)
    self.images_BCHW = torch.from_numpy(self.images_BHWC.transpose(0, 3, 1, 2).copy())
    self.noise_BN = rng.random((c["batch"], self.model.num_patches), dtype=np.float32)
    self._loss_and_grads = jax.jit(jax.value_and_grad(self._loss, has_aux=True),
                                   compiler_options=FAST_COMPILE)

  def hf_forward(self, norm_pix_loss):
    self.hf.config.norm_pix_loss = norm_pix_loss
    return self.hf(pixel_values=self.images_BCHW, noise=torch.from_numpy(self.noise_BN))

  def _loss(self, params, target_BNP):
    out = self.model.apply({"params": params}, self.images_BHWC, noise_BN=self.noise_BN)
    return mae.mae_loss(out["pred"], target_BNP, out["mask"]), out

  def jax_forward(self, norm_pix_loss):
    """(loss, outputs, grads): one compiled function serves both target kinds."""
    target = mae.patch_targets(self.images_BHWC, self.model.patch_size, norm_pix_loss)
    (loss, out), grads = self._loss_and_grads(self.params, target)
    return loss, out, grads

  def torch_grads(self, norm_pix_loss):
    """{hf name: grad} of the HF loss, for every trainable parameter."""
    self.hf.zero_grad()
    self.hf_forward(norm_pix_loss).loss.backward()
    return {n: p.grad.numpy().copy() for n, p in self.hf.named_parameters()
            if p.requires_grad}

  def to_params(self, hf_state):
    """HF-named tensors (params or grads) -> the mae_jax pytree, by the converter."""
    return convert.official_to_params(convert.hf_to_official(hf_state), self.fields)


@pytest.fixture(scope="module", params=list(CASES))
def ref(request, tmp_path_factory):
  return Reference(request.param, tmp_path_factory.mktemp(request.param))


def test_position_embeddings_match_official_formula(ref):
  c = CASES[ref.case]
  grid = c["image_size"] // c["patch_size"]
  for width in (c["width"], c["decoder_width"]):
    np.testing.assert_allclose(posembed.sincos_2d(width, (grid, grid)),
                               official_sincos(width, grid), rtol=0, atol=1e-6)


def test_converted_params_equal_reference_weights(ref):
  """HF weights -> converter -> Orbax -> load_params keeps every tensor exactly."""
  state = {k: v.detach().numpy() for k, v in ref.hf.state_dict().items()}
  want = ref.to_params(state)
  jax.tree.map(np.testing.assert_array_equal, ref.params, want)
  assert sum(x.size for x in jax.tree.leaves(ref.params)) == sum(
      p.numel() for p in ref.hf.parameters() if p.requires_grad)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_forward_parity(ref, norm_pix_loss):
  with torch.no_grad():
    want = ref.hf_forward(norm_pix_loss)
  loss, out, _ = ref.jax_forward(norm_pix_loss)
  np.testing.assert_array_equal(np.asarray(out["mask"]), want.mask.numpy())
  np.testing.assert_array_equal(np.asarray(out["restore_idx"]), want.ids_restore.numpy())
  tag = f"{ref.case} norm_pix={norm_pix_loss}"
  assert report(tag, "pred", out["pred"], want.logits.numpy()) < 1e-5
  assert report(tag, "loss", loss, want.loss.item()) < 1e-5


def test_norm_pix_targets_use_unbiased_variance(ref):
  """mae_jax's targets equal the reference's: torch.var is unbiased (ddof=1)."""
  x = ref.hf.patchify(ref.images_BCHW)
  var = x.var(dim=-1, keepdim=True)
  want = (x - x.mean(dim=-1, keepdim=True)) / (var + 1e-6)**0.5
  got = mae.patch_targets(ref.images_BHWC, ref.model.patch_size, norm_pix_loss=True)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-5)
  biased = (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, unbiased=False,
                                                        keepdim=True) + 1e-6)**0.5
  assert np.max(np.abs(np.asarray(got) - biased.numpy())) > 1e-3  # the choice matters


def test_encode_parity(ref):
  """encode == the reference encoder's unmasked forward (mask_ratio 0), cls included."""
  encoder = ViTMAEModel(hf_config(ref.case, mask_ratio=0.0)).eval()
  encoder.load_state_dict(ref.hf.vit.state_dict())
  b, n = ref.noise_BN.shape
  ascending = torch.arange(n, dtype=torch.float32).expand(b, n)  # identity shuffle
  with torch.no_grad():
    want = encoder(pixel_values=ref.images_BCHW, noise=ascending)
  np.testing.assert_array_equal(want.ids_restore.numpy(), np.broadcast_to(np.arange(n),
                                                                         (b, n)))
  got = jax.jit(ref.model.apply, static_argnames="method", compiler_options=FAST_COMPILE)(
      {"params": ref.params}, ref.images_BHWC, method=mae.MaskedAutoencoder.encode)
  assert got.shape == (b, 1 + n, ref.fields["width"])
  assert report(ref.case, "encode", got, want.last_hidden_state.numpy()) < 1e-5


@pytest.fixture(scope="module")
def grads(ref):
  """(torch grads by HF name, mae_jax grads pytree) of the norm_pix loss."""
  torch_grads = ref.torch_grads(norm_pix_loss=True)
  jax_grads = ref.jax_forward(norm_pix_loss=True)[2]
  return torch_grads, jax_grads


def test_gradient_parity(ref, grads):
  torch_grads, jax_grads = grads
  want = flat_leaves(ref.to_params(torch_grads))
  got = flat_leaves(jax_grads)
  assert got.keys() == want.keys()
  errs = {k: rel_err(got[k], want[k]) for k in want}  # (max abs, rel) per tensor
  worst = max(rel for _, rel in errs.values())
  print(f"\nPARITY {ref.case} grads: worst per-tensor rel {worst:.3g} over {len(want)}")
  assert worst < 1e-4, {k: e for k, e in errs.items() if e[1] >= 1e-4}


def flat_leaves(tree):
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def no_decay(name, p):
  return p.ndim <= 1 or name.endswith(("cls_token", "mask_token"))


def torch_adamw(model, schedule):
  """torch.optim.AdamW with the paper's groups: no decay on biases, norms, tokens."""
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  decay = [p for n, p in named if not no_decay(n, p)]
  groups = [{"params": decay, "weight_decay": PAPER_OPTIM["weight_decay"]},
            {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=float(schedule(0)), eps=PAPER_OPTIM["eps"],
                           betas=(PAPER_OPTIM["b1"], PAPER_OPTIM["b2"]))


def jax_adamw_steps(tx, params, grads):
  """Steps of the optax transform over a list of gradient pytrees, in one compile."""
  def run(params, grads):
    opt_state = tx.init(params)
    for g in grads:
      updates, opt_state = tx.update(g, opt_state, params)
      params = optax.apply_updates(params, updates)
    return params
  return jax.jit(run, compiler_options=FAST_COMPILE)(params, grads)


def test_adamw_steps_match_torch(ref, grads):
  """Two steps of mae_jax's optimizer == torch AdamW from the same params and grads."""
  config = ml_collections.ConfigDict(PAPER_OPTIM)
  tx, schedule = optim.make_optimizer(config, global_batch_size=4096, warmup_steps=0,
                                      total_steps=10)
  torch_grads, _ = grads
  rng = np.random.default_rng(1)
  second = {k: (g * rng.uniform(-1, 2, g.shape)).astype(np.float32)
            for k, g in torch_grads.items()}
  model = copy.deepcopy(ref.hf)
  opt = torch_adamw(model, schedule)
  named = dict(model.named_parameters())
  for step, g in enumerate((torch_grads, second)):
    for group in opt.param_groups:
      group["lr"] = float(schedule(step))
    for name, value in g.items():
      named[name].grad = torch.from_numpy(value)
    opt.step()
  params = jax_adamw_steps(tx, ref.params, [ref.to_params(torch_grads), ref.to_params(second)])
  want = flat_leaves(ref.to_params({n: p.detach().numpy() for n, p in named.items()}))
  got, before = flat_leaves(params), flat_leaves(ref.params)
  worst = max(rel_err(got[k], want[k])[0] for k in want)
  moved = max(rel_err(want[k], before[k])[0] for k in want)
  print(f"\nPARITY {ref.case} adamw: worst abs {worst:.3g} (largest update {moved:.3g})")
  assert worst < 1e-6
  assert moved > 1e-3  # the steps did move the params


@pytest.mark.parametrize("offset", [0.0, 10.0, 30.0, 100.0])
def test_layer_norm_matches_torch_when_the_mean_is_large(offset):
  """Tokens whose mean is large next to their spread (|mean| / std = offset) are
  normalized as torch does (two-pass variance): E[x^2] - E[x]^2 in float32 loses
  about offset^2 * 6e-8 of the variance, 1e-5 relative already at offset 10."""
  rng = np.random.default_rng(0)
  x = (offset + rng.standard_normal((64, 768))).astype(np.float32)
  want = torch.nn.functional.layer_norm(torch.from_numpy(x), (768,), eps=1e-6).numpy()
  norm = vit.layer_norm("norm", jnp.float32, jnp.float32)
  got = norm.apply(norm.init(jax.random.key(0), x), x)
  assert rel_err(got, want)[1] < 1e-5
