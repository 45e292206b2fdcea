"""End-to-end fine-tuning of the encoder as a classifier (paper Sec. A.3), or training it
from scratch: AdamW with layer-wise lr decay, drop path, label smoothing, mixup / cutmix and
RandAugment-style ops in the jitted step; crop and flip from the host pipeline.
"""
import dataclasses
import functools
import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from mae_jax import data, paths
from mae_jax.evaluation import augment, classifier, optimizers
from mae_jax.train import config as config_lib, loop, program, sharding


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
  return classifier.count_correct(logits, batch["label"], batch["valid"])


HISTORY_FILE = "history.json"  # test top-1 by step, kept across launches of one job


class Finetuner:
  """The classifier, its program and the loop's Job of one fine-tuning run."""

  def __init__(self, mae_model, cfg, *, train_src, test_src, mesh, seed, image_size,
               eval_batch_size, num_classes):
    self.cfg, self.mesh, self.seed, self.image_size = cfg, mesh, seed, image_size
    self.train_src, self.test_src, self.eval_batch_size = train_src, test_src, eval_batch_size
    self.model = classifier.from_mae(mae_model, num_classes, cfg.pool, cfg.drop_path,
                                     learned_pos_embed=cfg.pos_embed == "learned")
    if cfg.remat is not None:
      self.model = self.model.clone(kernels=dataclasses.replace(self.model.kernels,
                                                                remat=cfg.remat))
    self.dur = config_lib.durations(cfg, len(train_src))
    self.image_shape = (image_size, image_size, mae_model.channels)
    abstract = jax.eval_shape(self.init_params, jax.random.key(0))
    self.tx, self.schedule = optimizers.finetune_optimizer(
        cfg.optim, abstract, self.model.depth, cfg.batch_size, self.dur.warmup_steps,
        self.dur.total_steps)
    step = functools.partial(finetune_step, model=self.model, tx=self.tx,
                             schedule=self.schedule, mean=train_src.mean, std=train_src.std,
                             aug=cfg)
    self.program = program.build(mesh, self.init_state, step)
    self.history = []

  def init_params(self, rng):
    return self.model.init({"params": rng}, jnp.zeros((1, *self.image_shape)))["params"]

  def init_state(self, rng):
    params = self.init_params(rng)
    return FinetuneState(step=jnp.zeros((), jnp.int32), params=params,
                         opt_state=self.tx.init(params))

  def fresh_state(self, mae_params):
    """Step 0: the seed's classifier, its encoder from `mae_params` unless None (AdamW's
    moments start at zero whatever the parameters)."""
    state = self.program.init(jax.random.key(self.seed))
    if mae_params is None:
      return state
    params = classifier.load_encoder(state.params, mae_params, self.model.pool)
    return state.replace(params=jax.device_put(params, self.program.state_shardings.params))

  def batches(self, num_workers, start_step):
    host = data.make_train_batches(
        self.train_src, image_size=self.image_size, global_batch_size=self.cfg.batch_size,
        seed=self.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), augment=self.cfg.augment,
        crop_scale=tuple(self.cfg.crop_scale), start_step=start_step, num_workers=num_workers)
    return sharding.device_batches(host, self.mesh)

  @functools.cached_property
  def correct_fn(self):
    """correct_in_batch jitted once for all the test passes of a run."""
    return program.jit(functools.partial(correct_in_batch, model=self.model,
                                         mean=self.train_src.mean, std=self.train_src.std),
                       self.mesh, in_shardings=(self.program.state_shardings.params,
                                                sharding.batch_sharding(self.mesh)))

  def test_top1(self, params):
    correct = self.correct_fn
    batches = data.make_eval_batches(
        self.test_src, image_size=self.image_size, batch_size=self.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    total = sum(int(correct(params, sharding.global_batch(b, self.mesh))) for b in batches)
    return total / len(self.test_src)

  def evaluate(self, workdir, step, state, logger):
    """Test top-1 of `state`, logged and kept in WORKDIR/history.json."""
    top1 = self.test_top1(state.params)
    self.history = [h for h in self.history if h["step"] < step] + [
        {"step": step, "epoch": round(step / self.dur.steps_per_epoch, 3), "top1": top1}]
    logger.scalars(step, {"top1": top1}, prefix="test")
    logger.info(f"step {step}: test top-1 {top1:.4f}")
    if jax.process_index() == 0:
      paths.write_atomic(paths.join(workdir, HISTORY_FILE), json.dumps(self.history))

  def resume_history(self, workdir, restored):
    """The evaluations a resumed job made up to the step it resumes from."""
    saved = paths.join(workdir, HISTORY_FILE)
    if paths.exists(saved):
      self.history = [h for h in json.loads(paths.read_text(saved)) if h["step"] <= restored]

  def run(self, workdir, job_config, mae_params, num_workers=0):
    """Fine-tune in `workdir` (resuming its checkpoints; `job_config` is what a resume is
    compared against): (results, final params), or (None, None) where the job stopped
    early. Test top-1 every eval_every_epochs (if set) and at the end."""
    cfg, dur = self.cfg, self.dur
    every = cfg.eval_every_epochs and max(1, round(cfg.eval_every_epochs * dur.steps_per_epoch))

    def describe(restored):
      return (f"fine-tune: {dur.total_steps} steps of batch {cfg.batch_size} "
              f"({dur.steps_per_epoch}/epoch, warmup {dur.warmup_steps}), "
              f"{'pretrained' if mae_params is not None else 'random'} encoder, "
              f"pool {cfg.pool}, layer decay {cfg.optim.layer_decay}"
              + (f"; resuming from step {restored}" if restored is not None else ""))

    def finish(outcome, logger):
      if not self.history or self.history[-1]["step"] != dur.total_steps:
        self.evaluate(workdir, dur.total_steps, outcome.state, logger)
      return {"top1": self.history[-1]["top1"], "history": self.history,
              "steps": dur.total_steps, "final_train_loss": outcome.final_loss,
              "train_seconds": round(outcome.train_seconds, 1),
              "resumed_from": outcome.restored}, outcome.state.params

    job = loop.Job(
        kind="finetune", workdir=workdir, config=job_config, program=self.program,
        total_steps=dur.total_steps, images_per_step=cfg.batch_size,
        batches=functools.partial(self.batches, num_workers),
        fresh_state=lambda: self.fresh_state(mae_params),
        check_resume=functools.partial(loop.check_identity, job_config, workdir,
                                       ("encoder", "num_classes")),
        describe=describe, on_resume=functools.partial(self.resume_history, workdir),
        every=((every, functools.partial(self.evaluate, workdir)),) if every else ())
    return loop.run(job, finish)[1] or (None, None)


CLASSIFIER_FILE = "classifier.json"


def save(directory, params, model, results):
  """The fine-tuned params (Orbax, DIR/params) and DIR/classifier.json (model + results)."""
  directory = paths.absolute(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(paths.join(directory, "params"), params, force=True)
  if jax.process_index() == 0:
    fields = {f: getattr(model, f) for f in (
        "num_classes", "image_size", "patch_size", "channels", "width", "depth", "num_heads",
        "mlp_ratio", "pool", "drop_path", "learned_pos_embed")}
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
