"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018, as used
by DINO): the k most cosine-similar training features vote for their labels with weight
exp(similarity / T). `Monitor` runs it during pretraining (config.knn_every_epochs).
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import checks, data
from mae_jax.evaluation import features as features_lib
from mae_jax.train import program, sharding

# The monitor's vote (the evaluation's own values live in configs/eval.py).
MONITOR_K, MONITOR_TEMPERATURE, MONITOR_FEATURES = 20, 0.07, "cls"


def knn_predict(train_ND, train_labels_N, test_BD, *, k, temperature, num_classes):
  """Predicted labels (B,): the class of the heaviest vote of the k training features most
  cosine-similar to each test feature, each weighted exp(similarity / temperature)."""
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  sim_BN = unit(test_BD) @ unit(train_ND).T
  top_sim_BK, top_idx_BK = jax.lax.top_k(sim_BN, k)
  weights_BK = jnp.exp(top_sim_BK / temperature)
  onehot_BKC = jax.nn.one_hot(train_labels_N[top_idx_BK], num_classes, dtype=jnp.float32)
  return jnp.argmax(jnp.einsum("bk,bkc->bc", weights_BK, onehot_BKC), axis=-1)


def knn_top1(train, test, *, k, temperature, num_classes, mesh, batch_size):
  """Top-1 accuracy of test (features (M, D), labels (M,)) against train (N, D), (N,): the
  training features replicated, the test features in global batches of `batch_size`."""
  (train_ND, train_labels_N), (test_MD, test_labels_M) = train, test
  correct = compile_correct(min(k, len(train_ND)), temperature, num_classes, mesh)
  train_ND = jax.device_put(jnp.asarray(train_ND, jnp.float32), sharding.replicated(mesh))
  train_labels_N = jax.device_put(jnp.asarray(train_labels_N), sharding.replicated(mesh))
  batches = features_lib.row_batches(
      {"x": np.asarray(test_MD, np.float32), "label": test_labels_M}, batch_size, mesh)
  return sum(int(correct(train_ND, train_labels_N, b)) for b in batches) / len(test_MD)


@functools.lru_cache(maxsize=32)
def compile_correct(k, temperature, num_classes, mesh):
  """The correct predictions of a test batch, jitted once per setting: the memory bank
  replicated, test rows split."""

  def correct(train_ND, train_labels_N, batch):
    pred_B = knn_predict(train_ND, train_labels_N, batch["x"], k=k, temperature=temperature,
                         num_classes=num_classes)
    return ((pred_B == batch["label"]) & batch["valid"]).sum()

  return program.jit(correct, mesh, in_shardings=(sharding.replicated(mesh),) * 2 + (
      sharding.batch_sharding(mesh),))


BANK_STREAM, TEST_STREAM = 2**31 - 3, 2**31 - 4  # seeds of the monitor's subsets


def seeded_subset(source, size, seed, stream):
  """`size` examples of `source` drawn with (seed, stream), in index order (all: None)."""
  if size is None or size >= len(source):
    return source
  rng = np.random.default_rng([seed, stream])
  return data.Subset(source, indices=np.sort(rng.choice(len(source), size, replace=False)))


class Monitor:
  """kNN top-1 of the current encoder every `every_steps` pretraining steps (eval/knn_top1),
  a bank of config.knn_bank_size training and config.knn_test_size test images: subsets
  fixed by the seed (None: a whole split). docs/evaluation.md gives the cost."""

  def __init__(self, run, every_steps):
    cfg = run.config
    self.run, self.every_steps = run, every_steps
    self.bank = seeded_subset(run.train_src, cfg.get("knn_bank_size"), cfg.seed, BANK_STREAM)
    self.test = seeded_subset(run.test_src, cfg.get("knn_test_size"), cfg.seed, TEST_STREAM)

  @classmethod
  def for_run(cls, run, explicit=()):
    """A Monitor where config.knn_every_epochs is set, else None. No labels, or a bank larger
    than the training split: an error where the command line set it (`explicit`), else the
    monitor off with a note / the whole split as its bank."""
    cfg = run.config
    every = cfg.get("knn_every_epochs")
    if not every:
      return None
    if not run.train_src.num_classes and "knn_every_epochs" not in explicit:
      run.notes.append(f"kNN monitor off: data.name={cfg.data.name!r} has no class labels")
      return None
    checks.check(run.train_src.num_classes, "knn_every_epochs", f"data.name={cfg.data.name!r} "
                 "has no class labels for the kNN monitor; leave knn_every_epochs unset")
    bank = cfg.get("knn_bank_size")  # the recipe's, on a smaller split: the whole split
    checks.check("knn_bank_size" not in explicit or bank <= len(run.train_src), "knn_bank_size",
                 f"{bank} is larger than the {len(run.train_src)} training images; None for "
                 "the whole split")
    return cls(run, max(1, round(every * run.durations.steps_per_epoch)))

  def __call__(self, step, params, logger):
    run, t0 = self.run, time.perf_counter()
    kw = dict(model=run.model, kind=MONITOR_FEATURES, mesh=run.mesh,
              image_size=run.config.data.image_size, batch_size=run.config.eval_batch_size,
              log=lambda _: None)
    train, test = (features_lib.extract(params, split, **kw) for split in (self.bank, self.test))
    top1 = knn_top1(train, test, k=MONITOR_K, temperature=MONITOR_TEMPERATURE,
                    num_classes=run.train_src.num_classes, mesh=run.mesh,
                    batch_size=run.config.eval_batch_size)
    logger.scalars(step, {"knn_top1": top1}, prefix="eval")
    logger.info(f"step {step}: kNN top-1 {top1:.4f} (bank {len(self.bank)} train, "
                f"{len(self.test)} test images; k={MONITOR_K}, T={MONITOR_TEMPERATURE}, "
                f"{time.perf_counter() - t0:.0f} s)")
    return top1
