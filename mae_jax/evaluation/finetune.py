"""End-to-end fine-tuning of the encoder as a classifier (paper Sec. A.3).

AdamW (0.9, 0.999) with layer-wise lr decay, warmup then cosine, drop path, label
smoothing, mixup / cutmix and RandAugment-style ops (on device, inside the jitted step);
random-resized crop and flip come from the host pipeline (`finetune.augment`).
The same code fine-tunes from scratch when no pretrained encoder is given.
"""
import functools
import json
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from mae_jax import config as config_lib, data, paths, sharding
from mae_jax.evaluation import augment, classifier, loop, optimizers


@flax.struct.dataclass
class FinetuneState:
  step: jax.Array
  params: Any
  opt_state: Any


def finetune_step(state, batch, base_rng, *, model, tx, schedule, mean, std, aug):
  """One AdamW step on the soft-target cross-entropy of an augmented, mixed batch."""
  k_aug, k_mix, k_drop = jax.random.split(jax.random.fold_in(base_rng, state.step), 3)
  x = augment.rand_augment(batch["image"].astype(jnp.float32) / 255.0, k_aug,
                           num_ops=aug.randaug_ops, magnitude=aug.randaug_magnitude,
                           prob=aug.randaug_prob)
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  targets = augment.smooth_targets(batch["label"], model.num_classes, aug.label_smoothing)
  x, targets = augment.mixup_cutmix(x, targets, k_mix, mixup_alpha=aug.mixup,
                                    cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                                    switch_prob=aug.mixup_switch_prob)

  def loss_fn(params):
    logits = model.apply({"params": params}, x, train=True, rngs={"dropout": k_drop})
    return optax.softmax_cross_entropy(logits, targets).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
  return FinetuneState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def correct_in_batch(params, batch, *, model, mean, std):
  logits = model.apply({"params": params}, data.normalize(batch["image"], mean, std))
  return loop.count_correct(logits, batch["label"], batch["valid"])


def init_params(model, image_shape, seed, mae_params, mesh):
  """Classifier params (the encoder from `mae_params` unless None) in their training
  layout on the mesh, and that layout."""
  init = lambda rng: model.init({"params": rng}, jnp.zeros((1, *image_shape)))["params"]
  shardings = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
  params = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  if mae_params is not None:
    params = jax.device_put(classifier.load_encoder(params, mae_params, model.pool), shardings)
  return params


class Finetuner:
  """Builds the classifier, optimizer and jitted steps for one fine-tuning run."""

  def __init__(self, mae_model, cfg, *, train_src, test_src, mesh, seed, image_size,
               eval_batch_size, num_classes):
    self.cfg, self.mesh, self.seed = cfg, mesh, seed
    self.train_src, self.test_src = train_src, test_src
    self.image_size, self.eval_batch_size = image_size, eval_batch_size
    self.model = classifier.from_mae(mae_model, num_classes, cfg.pool, cfg.drop_path,
                                     learned_pos_embed=cfg.pos_embed == "learned")
    if cfg.remat is not None:
      self.model = self.model.clone(remat=cfg.remat)
    self.dur = config_lib.durations(cfg, len(train_src))
    self.image_shape = (image_size, image_size, mae_model.channels)

  def init_state(self, mae_params):
    params = init_params(self.model, self.image_shape, self.seed, mae_params, self.mesh)
    self.tx, self.schedule = optimizers.finetune_optimizer(
        self.cfg.optim, params, self.model.depth, self.cfg.batch_size, self.dur.warmup_steps,
        self.dur.total_steps)
    state = FinetuneState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params))
    self.state_shardings = sharding.state_shardings(jax.eval_shape(lambda: state), self.mesh)
    return jax.device_put(state, self.state_shardings)

  def compile_step(self):
    step = functools.partial(finetune_step, model=self.model, tx=self.tx,
                             schedule=self.schedule, mean=self.train_src.mean,
                             std=self.train_src.std, aug=self.cfg)
    batch_sh = {"image": sharding.batch_sharding(self.mesh),
                "label": sharding.batch_sharding(self.mesh)}
    return jax.jit(step, in_shardings=(self.state_shardings, batch_sh,
                                       sharding.replicated(self.mesh)),
                   out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                   donate_argnums=0)

  def host_batches(self, num_workers):
    return data.make_train_batches(
        self.train_src, image_size=self.image_size, global_batch_size=self.cfg.batch_size,
        seed=self.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), augment=self.cfg.augment,
        crop_scale=tuple(self.cfg.crop_scale), num_workers=num_workers)

  @functools.cached_property
  def correct_fn(self):
    """correct_in_batch jitted once for all the test passes of a run."""
    return jax.jit(functools.partial(correct_in_batch, model=self.model,
                                     mean=self.train_src.mean, std=self.train_src.std))

  def test_top1(self, params):
    correct = self.correct_fn
    batches = data.make_eval_batches(self.test_src, image_size=self.image_size,
                                     batch_size=self.eval_batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
    total = sum(int(correct(params, sharding.global_batch(b, self.mesh))) for b in batches)
    return total / len(self.test_src)

  def run(self, mae_params, logger, num_workers=0):
    """Fine-tune; returns (results dict, final params). Test top-1 every
    eval_every_epochs epochs (if set) and at the end."""
    cfg, dur = self.cfg, self.dur
    state = self.init_state(mae_params)
    logger.info(f"fine-tune: {dur.total_steps} steps of batch {cfg.batch_size} "
                f"({dur.steps_per_epoch}/epoch, warmup {dur.warmup_steps}), "
                f"{'pretrained' if mae_params is not None else 'random'} encoder, "
                f"pool {cfg.pool}, layer decay {cfg.optim.layer_decay}")
    history = []

    def evaluate(step, state):
      top1 = self.test_top1(state.params)
      history.append({"step": step, "epoch": round(step / dur.steps_per_epoch, 3),
                      "top1": top1})
      logger.scalars(step, {"top1": top1}, prefix="test")
      logger.info(f"step {step}: test top-1 {top1:.4f}")

    every = cfg.eval_every_epochs and max(1, round(cfg.eval_every_epochs * dur.steps_per_epoch))
    t0 = time.perf_counter()
    state, metrics = loop.run_steps(
        self.compile_step(), state, loop.device_batches(self.host_batches(num_workers),
                                                        self.mesh),
        total_steps=dur.total_steps, base_rng=jax.random.key(self.seed), logger=logger,
        log_every=cfg.log_every_steps, images_per_step=cfg.batch_size, every_steps=every,
        callback=evaluate)
    return {"top1": history[-1]["top1"], "history": history, "steps": dur.total_steps,
            "final_train_loss": float(metrics["loss"]),
            "train_seconds": round(time.perf_counter() - t0, 1)}, state.params


CLASSIFIER_FILE = "classifier.json"


def save(directory, params, model, results):
  """The fine-tuned params (Orbax, DIR/params) and DIR/classifier.json (model + results)."""
  directory = paths.absolute(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(paths.join(directory, "params"), params, force=True)
  if jax.process_index() == 0:
    fields = {f: getattr(model, f) for f in ("num_classes", "image_size", "patch_size",
                                              "channels", "width", "depth", "num_heads",
                                              "mlp_ratio", "pool", "drop_path",
                                              "learned_pos_embed")}
    paths.write_atomic(paths.join(directory, CLASSIFIER_FILE),
                       json.dumps({"model": fields, "results": results}, indent=2, default=str))
  return directory


def load(directory):
  """(ViTClassifier, params) of a checkpoint written by `save` (float32 compute)."""
  directory = paths.absolute(directory)
  meta = json.loads(paths.read_text(paths.join(directory, CLASSIFIER_FILE)))
  model = classifier.ViTClassifier(**meta["model"])
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(paths.join(directory, "params"))
  return model, params
