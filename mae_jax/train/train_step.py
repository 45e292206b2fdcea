"""Pure training and evaluation steps: (state, batch, rng) -> (state, metrics), jitted once
by the trainer with explicit shardings and the old state donated; tests call them as is."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mae_jax.model import mae, masking, patches
from mae_jax.data.normalize import normalize


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  skipped: jax.Array  # int32 (): updates skipped as non-finite (skip_nonfinite), all steps


def init_state(model, tx, rng, image_shape):
  """Initialize parameters (float32) and optimizer state for (H, W, C) images."""
  params_rng, mask_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  params = model.init({"params": params_rng, "mask": mask_rng}, dummy)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    skipped=jnp.zeros((), jnp.int32))


def all_finite(tree):
  """Whether every element of every leaf is finite (a norm could overflow where none is)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def step_rngs(base_rng, step):
  """Per-step RNG streams, a pure function of (seed key, step): resumable."""
  return {"mask": jax.random.fold_in(jax.random.fold_in(base_rng, step), 0)}


def loss_fn(params, model, images_BHWC, noise_BN, norm_pix_loss):
  out = model.apply({"params": params}, images_BHWC, noise_BN)
  target = mae.patch_targets(images_BHWC, model.patch_size, norm_pix_loss)
  return mae.mae_loss(out["pred"], target, out["mask"]), out


def micro_batches(x, accum_steps):
  """(B, ...) -> (accum_steps, B / accum_steps, ...); micro-batch i holds rows i, i + A, ...
  so rows stay on their device (the batch axis is sharded in contiguous blocks)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)


def loss_and_grads(params, model, images_BHWC, noise_BN, norm_pix_loss, accum_steps=1):
  """Mean loss and gradients over `accum_steps` micro-batches, scanned inside the step.
  Every sample masks the same number of patches, so the mean of the micro-batch losses is
  the full batch's loss: accumulation changes the result only by rounding."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, _), grads = grad_fn(params, model, images_BHWC, noise_BN, norm_pix_loss)
    return loss, grads

  def one(carry, micro):
    (loss, _), grads = grad_fn(params, model, micro[0], micro[1], norm_pix_loss)
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  micro = (micro_batches(images_BHWC, accum_steps), micro_batches(noise_BN, accum_steps))
  (loss, grads), _ = jax.lax.scan(one, zeros, micro)
  return jax.tree.map(lambda x: x / accum_steps, (loss, grads))


def train_step(state, batch, base_rng, *, model, tx, schedule, mean, std, norm_pix_loss,
               accum_steps=1, skip_nonfinite=False):
  """One AdamW step on the masked-patch MSE; returns (new state, metrics).
  metrics["nonfinite"] is 1 where the loss, a gradient or a new parameter is not finite;
  with skip_nonfinite such an update is dropped (the step advances, state.skipped counts
  it). accum_steps > 1: the batch as that many micro-batches, one update."""
  images = normalize(batch["image"], mean, std)
  noise = masking.make_noise(model.mask_strategy, step_rngs(base_rng, state.step)["mask"],
                             images.shape[0], model.grid_size, model.mask_ratio)  # (B, N)
  loss, grads = loss_and_grads(state.params, model, images, noise, norm_pix_loss,
                               accum_steps)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
  skipped = state.skipped
  if skip_nonfinite:
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    skipped = skipped + (~finite).astype(jnp.int32)
  metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates),
             "nonfinite": (~finite).astype(jnp.int32), "skipped": skipped}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                    skipped=skipped), metrics


def denormalize_pred(pred_BNP, images_BHWC, patch_size, norm_pix_loss):
  """Predictions in the normalized-input space; a norm_pix_loss model's are per-patch
  standardized, so they get back each true patch's mean and std (the usual way to show
  such a model's reconstructions: structure from the model, the patch's level and
  contrast from the image)."""
  if not norm_pix_loss:
    return pred_BNP
  target = patches.patchify(images_BHWC.astype(jnp.float32), patch_size)
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return pred_BNP * (var + 1e-6)**0.5 + mean


def eval_step(params, batch, rng, *, model, mean, std, baseline_HWC, norm_pix_loss=False):
  """Masked-patch squared error on [0, 1] pixels for one batch, with the masks of `rng`:
  sums over masked pixels of valid examples for the model and for `baseline_HWC` (e.g. the
  per-pixel mean), their count, and the reconstructions (B, N, p*p*C) with their masks."""
  images = normalize(batch["image"], mean, std)
  out = model.apply({"params": params}, images, rngs={"mask": rng})
  pred = denormalize_pred(out["pred"], images, model.patch_size, norm_pix_loss)
  p2 = model.patch_size**2
  pred_pix = pred * jnp.tile(jnp.asarray(std, jnp.float32), p2) + jnp.tile(
      jnp.asarray(mean, jnp.float32), p2)
  true_pix = patches.patchify(batch["image"].astype(jnp.float32) / 255.0, model.patch_size)
  base_pix = patches.patchify(jnp.asarray(baseline_HWC, jnp.float32)[None], model.patch_size)
  mask_BN = out["mask"] * batch["valid"][:, None]

  def masked_sum(x_BNP):
    return jnp.sum(jnp.sum(jnp.square(x_BNP - true_pix), axis=-1) * mask_BN)

  return {"sq_err": masked_sum(pred_pix), "baseline_sq_err": masked_sum(base_pix),
          "count": jnp.sum(mask_BN) * pred_pix.shape[-1], "pred": pred_pix,
          "mask": out["mask"]}
