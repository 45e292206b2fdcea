"""LARS for the linear probe and layer-wise lr decay for fine-tuning (paper Sec. A.2, A.3),
as the reference's `util/lars.py` and `util/lr_decay.py`, over our parameter pytrees (the
blocks stacked on a leading layer axis: `blocks/layers/...`, shape (depth, ...)).
"""
import flax
import jax
import jax.numpy as jnp
import optax

from mae_jax.train import optim

# Leaves at the bottom of the network for layer-wise decay (layer 0).
EMBED_LEAVES = ("patch_embed", "cls_token", "pos_embed")


def scale_by_trust_ratio(trust_coefficient=0.001, weight_decay=0.0):
  """The LARS direction of leaves with ndim > 1: (g + wd * p) * tc * ||p|| / ||g + wd * p||
  (1 where a norm is zero); biases and norm parameters pass unchanged, as in the reference."""

  def adapt(g, p):
    if g.ndim <= 1:
      return g
    g = g + weight_decay * p
    p_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
    ratio = jnp.where((p_norm > 0) & (g_norm > 0), trust_coefficient * p_norm / g_norm, 1.0)
    return g * ratio

  def direction(updates, params):
    if params is None:
      raise ValueError("LARS needs the parameters: tx.update(grads, state, params)")
    return jax.tree.map(adapt, updates, params)

  return optax.stateless(direction)


def lars(learning_rate, momentum=0.9, trust_coefficient=0.001, weight_decay=0.0):
  """LARS (You et al. 2017) as the reference: mu = momentum * mu + lars_direction(g);
  p -= lr * mu. `learning_rate` is a float or an optax schedule."""
  return optax.chain(
      scale_by_trust_ratio(trust_coefficient, weight_decay),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate))


def layerwise_scales(params, depth, decay):
  """Per-leaf lr multipliers decay ** (depth + 1 - layer): layer 0 for the patch embedding
  and tokens, depth + 1 above the blocks; the stacked blocks (block i is layer i + 1) get
  an array (depth, 1, ..., 1)."""
  block_scales_L = decay ** (depth - jnp.arange(depth, dtype=jnp.float32))

  def scale(path, leaf):
    if path[0] == "blocks":
      return block_scales_L.reshape((depth,) + (1,) * (leaf.ndim - 1))
    layer = 0 if path[0] in EMBED_LEAVES else depth + 1
    return jnp.float32(decay ** (depth + 1 - layer))

  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({p: scale(p, v) for p, v in flat.items()})


def scale_by_tree(scales):
  """Multiply each update leaf by the matching leaf of `scales` (broadcasting)."""
  return optax.stateless(
      lambda updates, _: jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales))


def finetune_optimizer(cfg, params, depth, global_batch_size, warmup_steps, total_steps):
  """(tx, schedule): AdamW (no decay on biases, norms, tokens), lr = base_lr * batch / 256,
  warmup then cosine, each update (decay included, as torch's per-group lr) layer-scaled."""
  peak = optim.scaled_lr(cfg.base_lr, global_batch_size)
  schedule = optim.lr_schedule(peak, warmup_steps, total_steps, cfg.min_lr)
  tx = optax.chain(
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=1e-8, weight_decay=cfg.weight_decay,
                  mask=optim.decay_mask),
      scale_by_tree(layerwise_scales(params, depth, cfg.layer_decay)))
  if cfg.get("grad_clip"):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx, schedule


def linprobe_optimizer(cfg, global_batch_size, warmup_steps, total_steps):
  """(tx, schedule): LARS with lr = base_lr * batch / 256, warmup then cosine to min_lr."""
  peak = optim.scaled_lr(cfg.base_lr, global_batch_size)
  schedule = optim.lr_schedule(peak, warmup_steps, total_steps, cfg.min_lr)
  return lars(schedule, cfg.momentum, cfg.trust_coefficient, cfg.weight_decay), schedule
