"""AdamW with the paper's weight-decay exclusions, the lr scaling rule and warmup-cosine."""
import flax
import optax

# Leaves that never get weight decay: biases and norm scales by leaf name, tokens and the
# fine-tuning classifier's learned position embedding by name.
NO_DECAY_LEAVES = ("bias", "scale", "cls_token", "mask_token", "pos_embed")


def scaled_lr(base_lr, global_batch_size):
  """The paper's linear scaling rule: lr = base_lr * batch / 256."""
  return base_lr * global_batch_size / 256


def decay_mask(params):
  """Pytree of bools: True where weight decay applies (kernels of linear layers)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({p: p[-1] not in NO_DECAY_LEAVES for p in flat})


def lr_schedule(peak_lr, warmup_steps, total_steps, min_lr=0.0):
  """Linear warmup from 0 to peak_lr, then half-cosine to min_lr at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)


def make_optimizer(optim_config, global_batch_size, warmup_steps, total_steps):
  """(optax transform, schedule) for an `optim` config block."""
  peak = scaled_lr(optim_config.base_lr, global_batch_size)
  schedule = lr_schedule(peak, warmup_steps, total_steps, optim_config.min_lr)
  tx = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                   weight_decay=optim_config.weight_decay, mask=decay_mask)
  if optim_config.get("grad_clip"):
    tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), tx)
  return tx, schedule
