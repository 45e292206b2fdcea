"""Linear probing (paper Sec. A.2): BatchNorm without affine parameters + a linear head,
trained with LARS on frozen features computed once, without augmentation (the reference
recomputes them each epoch under RandomResizedCrop + flip).
"""
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mae_jax import data
from mae_jax.evaluation import classifier, features, optimizers
from mae_jax.train import config as config_lib, loop, program, sharding


class LinearProbe(nn.Module):
  """BatchNorm (no scale, no bias, eps 1e-6) -> Dense(num_classes), head std 0.01."""
  num_classes: int

  @nn.compact
  def __call__(self, x_BD, train=False):
    x_BD = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6,
                        use_bias=False, use_scale=False, use_fast_variance=False,
                        name="bn")(x_BD)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01),
                    name="head")(x_BD)


@flax.struct.dataclass
class ProbeState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def init_probe(model, tx, rng, dim):
  variables = model.init(rng, jnp.zeros((2, dim), jnp.float32))
  params = variables["params"]
  return ProbeState(jnp.zeros((), jnp.int32), params, variables["batch_stats"], tx.init(params))


def probe_step(state, batch, base_rng, *, model, tx, schedule):
  """One LARS step on the cross-entropy of a batch {'x': (B, D), 'label': (B,)}; the
  BatchNorm running statistics advance with it."""
  del base_rng  # nothing random inside the step

  def loss_fn(params):
    logits, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats},
                                   batch["x"], train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, (logits, new_vars["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
             "accuracy": (logits.argmax(-1) == batch["label"]).mean()}
  return ProbeState(state.step + 1, params, batch_stats, opt_state), metrics


def test_top1(state, model, test, mesh, batch_size):
  """Top-1 of the probe (running BatchNorm statistics) on test = (features, labels)."""
  feats_MD, labels_M = test

  def correct(state, batch):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["x"])
    return classifier.count_correct(logits, batch["label"], batch["valid"])

  correct = program.jit(correct, mesh, in_shardings=(sharding.replicated(mesh),
                                                     sharding.batch_sharding(mesh)))
  batches = features.row_batches({"x": feats_MD, "label": labels_M}, batch_size, mesh)
  return sum(int(correct(state, b)) for b in batches) / len(feats_MD)


def train_and_test(train, test, cfg, *, num_classes, mesh, eval_batch_size, workdir,
                   job_config):
  """Train the probe on train = (features (N, D), labels (N,)) in `workdir` (resuming its
  checkpoints, refused where `job_config` has another encoder, features or classes); test
  top-1 on test. None where the job stopped early."""
  feats_ND, labels_N = train
  dur = config_lib.durations(cfg, len(feats_ND))
  tx, schedule = optimizers.linprobe_optimizer(cfg.optim, cfg.batch_size, dur.warmup_steps,
                                               dur.total_steps)
  model = LinearProbe(num_classes)
  probe = program.build(mesh, functools.partial(init_probe, model, tx, dim=feats_ND.shape[1]),
                        functools.partial(probe_step, model=model, tx=tx, schedule=schedule),
                        batch_keys=("x", "label"))
  arrays = {"x": feats_ND, "label": labels_N}
  job = loop.Job(
      kind="linprobe", workdir=workdir, config=job_config, program=probe,
      total_steps=dur.total_steps, images_per_step=cfg.batch_size,
      batches=lambda start: sharding.device_batches(
          data.array_batches(arrays, cfg.batch_size, job_config.seed, start), mesh),
      check_resume=functools.partial(loop.check_identity, job_config, workdir,
                                     ("encoder", "features", "num_classes")),
      describe=lambda restored: (
          f"linear probe: {dur.total_steps} LARS steps of batch {cfg.batch_size} "
          f"({dur.steps_per_epoch}/epoch, warmup {dur.warmup_steps}) on "
          f"{feats_ND.shape[1]}-dim features of {len(feats_ND)} examples"
          + (f"; resuming from step {restored}" if restored is not None else "")))

  def finish(outcome, logger):
    top1 = test_top1(outcome.state, model, test, mesh, eval_batch_size)
    logger.info(f"linear probe: test top-1 {top1:.4f}")
    return {"top1": top1, "final_train_loss": outcome.final_loss,
            "steps": dur.total_steps, "resumed_from": outcome.restored}

  return loop.run(job, finish)[1]
