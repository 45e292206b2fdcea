"""The jitted, sharded train step: 8 simulated devices agree with 1; the loss goes down."""
import functools

import jax
import numpy as np
import pytest

from configs.default import get_config
from helpers import as_overrides, model_fields, random_batches, set_fields
from mae_jax.model import sizes
from mae_jax.train import optim, sharding, train_step as ts


STEPS = 5  # steps of the mesh comparisons


def step_config(**mesh):
  """The recipe with the tiny model at depth 2, 4 heads, RGB, batch 16, on `mesh`."""
  c = set_fields(get_config(), as_overrides(model_fields(depth=2, num_heads=4,
                                                         decoder_heads=4)))
  with c.unlocked():
    c.batch_size = 16
    c.mesh.update(mesh)
  return c


def fast_config(**mesh):
  """step_config with a learning rate large enough that later losses depend on earlier
  updates, and an Adam eps that keeps rounding noise in near-zero gradients from being
  amplified into full-size steps."""
  c = step_config(**mesh)
  with c.unlocked():
    c.optim.base_lr, c.optim.eps = 0.1, 1e-4
  return c


def run_steps(config, devices, batches, steps, accum_steps=1):
  """Train `steps` steps on a mesh over `devices`; returns (losses, params, state)."""
  model = sizes.build_model(config, "cpu")
  tx, schedule = optim.make_optimizer(config.optim, config.batch_size, 2, max(steps, 10))
  mesh = sharding.make_mesh(config.mesh, devices)
  shape = (16, 16, 3)
  abstract = jax.eval_shape(functools.partial(ts.init_state, model, tx, image_shape=shape),
                            jax.random.key(0))
  state_sh = sharding.state_shardings(abstract, mesh)
  state = jax.jit(functools.partial(ts.init_state, model, tx, image_shape=shape),
                  out_shardings=state_sh)(jax.random.key(0))
  step = jax.jit(functools.partial(ts.train_step, model=model, tx=tx, schedule=schedule,
                                   mean=(0.5,) * 3, std=(0.25,) * 3, norm_pix_loss=True,
                                   accum_steps=accum_steps),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  losses = []
  for i in range(steps):
    state, metrics = step(state, sharding.global_batch(batches[i], mesh), jax.random.key(7))
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state.params), state


def make_batches(n, batch=16, seed=0):
  return random_batches(n, batch=batch, size=16, channels=3, seed=seed)


def assert_trees_close(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, **tol)


@pytest.fixture(scope="module")
def one_device_run():
  return run_steps(fast_config(data=-1, fsdp=1), jax.devices()[:1], make_batches(STEPS),
                   STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1), dict(data=2, fsdp=4)])
def test_eight_devices_match_one(one_device_run, mesh):
  """The same global batches on meshes (8), (2 data x 4 fsdp) and (1): the same losses
  over STEPS steps, each after updates large enough to change it."""
  assert jax.device_count() == 8
  losses1, params1, _ = one_device_run
  losses8, params8, state8 = run_steps(fast_config(**mesh), jax.devices(),
                                       make_batches(STEPS), STEPS)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  assert abs(losses1[-1] - losses1[0]) > 1e-2  # the updates really moved the loss
  assert_trees_close(params8, params1, rtol=1e-4, atol=1e-6)
  kernel = state8.params["blocks"]["layers"]["mlp"]["fc1"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  if mesh["fsdp"] > 1:  # parameters really are split over the fsdp axis
    assert kernel.addressable_shards[0].data.size == kernel.size // 4


@pytest.mark.slow
@pytest.mark.parametrize("accum_steps", [2, 4])
def test_gradient_accumulation_matches_the_full_batch(one_device_run, accum_steps):
  """Micro-batches see the full batch's masks, so the update is the same up to rounding,
  on 8 devices (each micro-batch still split over all of them)."""
  losses1, params1, _ = one_device_run
  losses, params, _ = run_steps(fast_config(data=8, fsdp=1), jax.devices(),
                                make_batches(STEPS), STEPS, accum_steps=accum_steps)
  np.testing.assert_allclose(losses, losses1, rtol=1e-5)
  assert_trees_close(params, params1, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_is_a_mean_over_micro_batches():
  """The accumulated gradient equals the mean of the micro-batch gradients, each taken on
  its own rows (i, i + A, ...) and masks: checks the split, not just the total."""
  c = step_config(data=-1, fsdp=1)
  model = sizes.build_model(c, "cpu")
  params = jax.jit(model.init)({"params": jax.random.key(0), "mask": jax.random.key(1)},
                               np.zeros((1, 16, 16, 3), np.float32))["params"]
  images = np.random.default_rng(0).normal(size=(16, 16, 16, 3)).astype(np.float32)
  noise = np.random.default_rng(1).uniform(size=(16, 16)).astype(np.float32)
  loss_and_grads = jax.jit(ts.loss_and_grads, static_argnums=(1, 4, 5))
  loss4, grads4 = loss_and_grads(params, model, images, noise, False, 4)
  parts = [loss_and_grads(params, model, images[i::4], noise[i::4], False, 1)
           for i in range(4)]
  np.testing.assert_allclose(loss4, np.mean([p[0] for p in parts]), rtol=1e-6)
  mean_grads = jax.tree.map(lambda *g: sum(g) / 4, *[p[1] for p in parts])
  assert_trees_close(grads4, mean_grads, rtol=1e-5, atol=1e-7)
  # and a different split (first quarter, second quarter, ...) would not match
  wrong = loss_and_grads(params, model, images[:4], noise[:4], False, 1)[0]
  assert abs(float(wrong) - float(parts[0][0])) > 1e-4


def test_step_is_deterministic_and_rng_depends_on_step():
  rngs0 = ts.step_rngs(jax.random.key(0), 0)["mask"]
  rngs1 = ts.step_rngs(jax.random.key(0), 1)["mask"]
  assert not np.array_equal(jax.random.key_data(rngs0), jax.random.key_data(rngs1))
  np.testing.assert_array_equal(jax.random.key_data(rngs0),
                                jax.random.key_data(ts.step_rngs(jax.random.key(0), 0)["mask"]))


@pytest.mark.slow
def test_training_lowers_the_loss():
  """40 steps on a fixed set of smooth images: the reconstruction loss falls clearly."""
  c = step_config(data=-1, fsdp=1)
  with c.unlocked():
    c.model.norm_pix_loss = False
    c.optim.base_lr = 1e-2  # lr 6e-4 at batch 16
  yy, xx = np.mgrid[0:16, 0:16]
  rng = np.random.default_rng(0)
  imgs = []
  for _ in range(64):
    fx, fy, ph = rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.4), rng.uniform(0, 6)
    img = 127 + 120 * np.sin(fx * xx + fy * yy + ph)
    imgs.append(np.repeat(img[..., None], 3, -1).astype(np.uint8))
  imgs = np.stack(imgs)
  batches = [{"image": imgs[(i % 4) * 16:(i % 4 + 1) * 16], "label": np.zeros(16, np.int32)}
             for i in range(40)]
  losses, _, _ = run_steps(c, jax.devices()[:1], batches, 40)
  assert np.isfinite(losses).all()
  assert losses[-5:].mean() < 0.7 * losses[:5].mean()
