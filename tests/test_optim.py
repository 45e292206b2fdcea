"""Optimizer: weight-decay exclusions, lr scaling, warmup-cosine schedule, durations."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from helpers import tiny_model
from mae_jax.train import config as config_lib, optim


def test_decay_mask_excludes_exactly_biases_norms_and_tokens():
  model = tiny_model(image_size=8, channels=1, width=16, depth=2, decoder_width=8)
  params = jax.jit(model.init)({"params": jax.random.key(0), "mask": jax.random.key(1)},
                               jnp.zeros((1, 8, 8, 1)))["params"]
  flat = flax.traverse_util.flatten_dict(optim.decay_mask(params), sep="/")
  decayed = sorted(k for k, v in flat.items() if v)
  assert decayed == sorted([
      "patch_embed/kernel", "decoder_embed/kernel", "decoder_pred/kernel",
      *[f"{s}/layers/{m}/kernel" for s in ("blocks", "decoder_blocks")
        for m in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")]])
  for name in ("cls_token", "mask_token", "norm/scale", "norm/bias",
               "blocks/layers/norm1/scale", "blocks/layers/attn/qkv/bias"):
    assert flat[name] is False


def test_weight_decay_applies_only_where_masked():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
            "cls_token": jnp.ones((1, 1, 2))}
  cfg = get_config().optim
  tx, _ = optim.make_optimizer(cfg, 256, warmup_steps=0, total_steps=10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  lr = optim.scaled_lr(cfg.base_lr, 256)
  np.testing.assert_allclose(updates["dense"]["kernel"], -lr * 0.05, rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0)
  np.testing.assert_array_equal(updates["cls_token"], 0)


def test_lr_scaling_rule():
  assert optim.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
  assert optim.scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)


def test_schedule_values():
  sched = optim.lr_schedule(1e-3, warmup_steps=10, total_steps=110, min_lr=1e-5)
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(5e-4)
  assert float(sched(10)) == pytest.approx(1e-3)  # end of warmup: the peak
  assert float(sched(60)) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-5)  # half-way
  assert float(sched(110)) == pytest.approx(1e-5)  # the end: min_lr


def test_durations_from_epochs_or_steps():
  c = get_config()
  with c.unlocked():
    c.batch_size, c.num_epochs, c.optim.warmup_epochs = 100, 2.5, 0.5
  d = config_lib.durations(c, 1050)  # 10 steps per epoch (remainder dropped)
  assert (d.steps_per_epoch, d.total_steps, d.warmup_steps) == (10, 25, 5)
  with c.unlocked():
    c.num_steps, c.optim.warmup_steps = 7, 3
  d = config_lib.durations(c, 1050)
  assert (d.total_steps, d.warmup_steps) == (7, 3)
