"""Evaluation: kNN, linear probe and fine-tuning end to end on a generated labelled image
folder; LARS, layer-wise lr decay, the kNN vote, split-independent features, drop path and
the kNN monitor during pretraining, each against values computed here by hand."""
import functools
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from configs.eval import get_config as get_eval_config
from mae_jax import data, trainer
from mae_jax.evaluation import augment as eval_augment, features, finetune, knn, linprobe
from mae_jax.evaluation import optimizers
from mae_jax.model import posembed, vit
from mae_jax.tools import evaluate
from mae_jax.train import config as config_lib, param_dirs, pretrained, sharding, train_step as ts
from mae_jax.data.source import ArraySource
from helpers import (NUM_CLASSES, ROOT, pretrain_on_patterns, run_evaluate,
                     synthetic_config, tiny_model)
SIZE = 16
TINY = tiny_model(channels=1, depth=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A 4-step pretraining run (depth 2) on the pattern folder, with the kNN monitor on
  every 2 steps (128 train images / batch 16 = 8 steps per epoch)."""
  return pretrain_on_patterns(tmp_path_factory.mktemp("evaluate"),
                              checkpoint_every_steps=100, knn_every_epochs=0.25)


def eval_flags(*extra):
  """Small evaluation settings, as --config flags (also used in-process via eval_config)."""
  return ["--config.eval_batch_size=64", "--config.linprobe.batch_size=32",
          "--config.linprobe.num_steps=100", "--config.linprobe.log_every_steps=50",
          "--config.linprobe.optim.base_lr=30", *extra]


def eval_config(**finetune):
  c = get_eval_config()
  c.eval_batch_size = 64
  c.linprobe.update(batch_size=32, num_steps=100, log_every_steps=50)
  c.linprobe.optim.base_lr = 30.0
  c.finetune.update(batch_size=32, num_steps=24, log_every_steps=8, eval_every_epochs=4.0,
                    **finetune)
  c.finetune.crop_scale = (0.35, 1.0)  # at 0.08 a crop of the stripes can hold one stripe
  c.finetune.optim.update(base_lr=0.1, warmup_steps=3)
  return c


def read_json(path):
  with open(path) as f:
    return json.load(f)


def metrics_records(run_dir):
  with open(run_dir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------
# End to end on the pattern folder.


@pytest.mark.slow
def test_knn_monitor_logs_during_pretraining(run_dir):
  """knn_every_epochs=0.25 logs eval/knn_top1 at steps 2 and 4 (metrics.jsonl and
  TensorBoard), well above chance on the patterns."""
  knn_records = [r for r in metrics_records(run_dir) if "eval/knn_top1" in r]
  assert [r["step"] for r in knn_records] == [2, 4]
  assert all(r["eval/knn_top1"] >= 0.8 for r in knn_records), knn_records
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))


@pytest.mark.slow
def test_cli_knn_and_linprobe(run_dir):
  """`python -m mae_jax.evaluate --mode knn,linprobe` writes eval_knn.json and
  eval_linprobe.json, both well above chance; the kNN top-1 is the monitor's at step 4
  (same params, data, k and T)."""
  cmd = [sys.executable, "-m", "mae_jax.evaluate", "--workdir", str(run_dir),
         "--mode", "knn,linprobe", *eval_flags()]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  knn_result = read_json(run_dir / "eval_knn.json")
  probe = read_json(run_dir / "eval_linprobe.json")
  assert knn_result["subject"] == f"{run_dir} at step 4" and knn_result["k"] == 20
  assert knn_result["top1"] >= 0.8 and probe["top1"] >= 0.6, (knn_result, probe)
  assert probe["steps"] == 100 and probe["features"] == "cls"
  monitor = [r for r in metrics_records(run_dir) if "eval/knn_top1" in r][-1]
  assert knn_result["top1"] == pytest.approx(monitor["eval/knn_top1"], abs=1.5 / 64)
  assert "knn: top-1" in proc.stdout and "linprobe: top-1" in proc.stdout


@pytest.mark.slow
def test_random_init_and_pixel_baselines_have_their_own_results(run_dir):
  """init=random evaluates the run's step-0 encoder (eval_knn_random.json); pixel
  features give the logistic-regression baseline (eval_linprobe_pixels.json)."""
  config = eval_config()
  config.init = "random"
  config.linprobe.features = "pixels"
  results = evaluate.evaluate(config, str(run_dir), "knn,linprobe")
  assert results["knn"]["name"] == "knn_random" and results["knn"]["subject"].startswith(
      "random init")
  assert results["linprobe"]["name"] == "linprobe_pixels"
  for name in ("knn_random", "linprobe_pixels"):
    saved = read_json(run_dir / f"eval_{name}.json")
    assert saved["top1"] == results[name.split("_")[0]]["top1"] >= 0.6, saved
  # The random encoder is exactly the pretraining's initialization with that seed.
  model, run_config = pretrained.model_of(str(run_dir))
  image_shape = (SIZE, SIZE, 1)
  init = jax.jit(lambda rng: ts.init_state(model, optax.identity(), rng, image_shape).params)
  step0 = init(jax.random.key(run_config.seed))
  random = pretrained.random_params(model, run_config.seed)
  for a, b in zip(jax.tree.leaves(step0), jax.tree.leaves(random)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_knn_of_a_converted_checkpoint_into_a_new_directory(run_dir, tmp_path):
  """--config.params=IMPORT_DIR: the encoder of a `convert import` output, the dataset
  named by config.data, results in a directory that did not exist."""
  pre = pretrained.load(str(run_dir))
  fields = ("image_size", "patch_size", "channels", "width", "depth", "num_heads",
            "mlp_ratio", "decoder_width", "decoder_depth", "decoder_heads", "mask_ratio")
  param_dirs.save_params(str(tmp_path / "conv"), jax.device_get(pre.params),
                      {"model": {f: getattr(pre.model, f) for f in fields}, "source": "test"})
  config = eval_config()
  config.params = str(tmp_path / "conv")
  config.data.update(name="folder", data_dir=str(run_dir.parent / "data"))
  results = evaluate.evaluate(config, str(tmp_path / "new"), "knn")["knn"]
  assert results["subject"] == "converted test" and results["dataset"] == "folder"
  assert read_json(tmp_path / "new" / "eval_knn.json")["top1"] == results["top1"] >= 0.8


@pytest.mark.slow
def test_finetune_end_to_end_saves_a_loadable_classifier(run_dir):
  """Fine-tuning (mixup, cutmix, RandAugment, drop path, layer decay all on, blocks under
  the remat policy that overrides the pretraining model's) reaches well above chance; the
  saved classifier loads and scores the reported top-1 on the test split."""
  results = evaluate.evaluate(eval_config(remat="dots"), str(run_dir), "finetune")["finetune"]
  assert results["name"] == "finetune" and results["top1"] >= 0.7, results
  assert results["remat"] == "dots"
  assert [h["step"] for h in results["history"]] == [16, 24]
  assert read_json(run_dir / "eval_finetune.json")["top1"] == results["top1"]
  model, params = finetune.load(results["checkpoint"])
  assert (model.depth, model.num_classes, model.pool) == (2, NUM_CLASSES, "avg")
  test = data.load_source(ml_collections.ConfigDict(
      {"name": "folder", "data_dir": str(run_dir.parent / "data"), "channels": 1}), "test")
  images, labels = test.batch(np.arange(len(test)))
  train = data.load_source(ml_collections.ConfigDict(
      {"name": "folder", "data_dir": str(run_dir.parent / "data"), "channels": 1}), "train")
  logits = model.apply({"params": params}, data.normalize(np.stack(images), train.mean,
                                                         train.std))
  assert np.mean(np.argmax(logits, -1) == labels) == pytest.approx(results["top1"])


@pytest.mark.parametrize("flags,message", [
    (["--mode", "knnn"], "--mode: 'knnn' is not valid"),
    (["--mode", "knn", "--config.knn.kk=3"], "config.knn.kk: unknown field 'kk'"),
    (["--mode", "knn", "--num_processes=2", "--process_id=2"],
     "--process_id=2: must be in [0, --num_processes=2)"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, flags, message):
  """The command's flag parsing and checks, in-process (as its __main__ runs them)."""
  code = run_evaluate(["--workdir", str(tmp_path), *flags])
  stderr = capsys.readouterr().err
  assert code == 2, stderr[-2000:]
  assert stderr.strip().splitlines()[-1].startswith(f"error: {message}"), stderr
  assert "Traceback" not in stderr


def test_result_names():
  c = get_eval_config()
  assert [evaluate.config_result_name(m, c) for m in evaluate.MODES] == ["knn", "linprobe",
                                                                   "finetune"]
  c.init = "random"
  assert [evaluate.config_result_name(m, c) for m in evaluate.MODES] == [
      "knn_random", "linprobe_random", "finetune_scratch"]
  c.knn.features = "pixels"
  assert evaluate.config_result_name("knn", c) == "knn_pixels"


@pytest.mark.parametrize("field,value", [
    ("knn.k", 0), ("knn.features", "patch"), ("linprobe.optim.base_lr", 0.0),
    ("finetune.optim.layer_decay", 1.5), ("finetune.pool", "max"), ("eval_batch_size", 12),
    ("finetune.drop_path", 1.0), ("finetune.eval_every_epochs", -1.0),
    ("finetune.remat", "some"),
])
def test_bad_eval_config_names_the_field(field, value):
  c = get_eval_config()
  block, _, name = field.rpartition(".")
  target = c
  for part in block.split(".") if block else []:
    target = target[part]
  target[name] = value
  with pytest.raises(config_lib.ConfigError, match=rf"^config\.{field}"):
    evaluate.validate(c, ["knn"])


def test_knn_monitor_fields_are_checked(tmp_path):
  """knn_every_epochs >= 0 (0: off); a bank larger than the training split, or a monitor
  asked for on a dataset without labels, is one line before anything compiles; the
  recipe's own monitor is off, with a note, on such a dataset."""
  with pytest.raises(config_lib.ConfigError, match=r"^config\.knn_every_epochs"):
    config_lib.validate(synthetic_config(knn_every_epochs=-1.0))
  config_lib.validate(synthetic_config(knn_every_epochs=0.0))
  config_lib.validate(synthetic_config(knn_every_epochs=2.0))
  big = synthetic_config(knn_every_epochs=1.0, knn_bank_size=65)  # 64 synthetic images
  with pytest.raises(config_lib.ConfigError, match=r"^config\.knn_bank_size: 65 is larger "
                     "than the 64 training images"):
    trainer.train_and_evaluate(big, str(tmp_path / "big"), explicit=("knn_bank_size",))
  whole = knn.Monitor.for_run(trainer.build_run(big, str(tmp_path / "whole")))
  assert len(whole.bank) == 64  # the recipe's bank on a smaller split: all of it
  (tmp_path / "flat").mkdir()
  for i in range(40):  # a folder of images without class folders: no labels
    Image.fromarray(np.full((16, 16, 3), i * 6, np.uint8)).save(tmp_path / "flat" / f"{i}.png")
  flat = synthetic_config(knn_every_epochs=1.0)
  with flat.unlocked():
    flat.data.update(name="folder", data_dir=str(tmp_path / "flat"))
  with pytest.raises(config_lib.ConfigError, match="has no class labels"):
    trainer.train_and_evaluate(flat, str(tmp_path / "asked"), explicit=("knn_every_epochs",))
  run = trainer.build_run(flat, str(tmp_path / "default"))
  assert knn.Monitor.for_run(run) is None
  assert "kNN monitor off: data.name='folder' has no class labels" in run.notes


# ---------------------------------------------------------------------------
# Units against hand-computed values.


def reference_lars(params, grads_seq, lrs, *, momentum, tc, wd):
  """facebookresearch/mae util/lars.py, in numpy."""
  params = {k: v.copy() for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k, p in params.items():
      dp = grads[k].copy()
      if p.ndim > 1:
        dp = dp + wd * p
        p_norm, d_norm = np.linalg.norm(p), np.linalg.norm(dp)
        q = tc * p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0
        dp = dp * q
      mu[k] = momentum * mu[k] + dp
      params[k] = p - lr * mu[k]
  return params


def test_lars_matches_the_reference_for_two_steps():
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
            "zero_kernel": np.zeros((2, 2), np.float32),  # ||p|| = 0: trust ratio 1
            "bias": rng.normal(size=(3,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
               for _ in range(2)]
  lrs = [0.5, 0.25]
  tx = optimizers.lars(lambda step: jnp.where(step == 0, 0.5, 0.25), momentum=0.9,
                       trust_coefficient=0.1, weight_decay=0.3)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for grads in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
    p = optax.apply_updates(p, updates)
  want = reference_lars(params, grads_seq, lrs, momentum=0.9, tc=0.1, wd=0.3)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The 1-D leaf follows plain momentum SGD: no decay, no trust ratio.
  g0, g1 = grads_seq[0]["bias"], grads_seq[1]["bias"]
  np.testing.assert_allclose(np.asarray(p["bias"]),
                             params["bias"] - 0.5 * g0 - 0.25 * (0.9 * g0 + g1), rtol=1e-5)


def small_classifier(depth, **kw):
  return finetune.classifier.ViTClassifier(
      num_classes=3, image_size=8, patch_size=4, channels=1, width=8, depth=depth,
      num_heads=2, **kw)


def classifier_params(depth, **kw):
  return jax.jit(small_classifier(depth, **kw).init)(jax.random.key(0),
                                                      jnp.zeros((1, 8, 8, 1)))["params"]


@pytest.mark.slow
def test_learned_pos_embed_starts_at_the_sincos_table_and_is_trained():
  """The reference's fine-tuning: pos_embed is a parameter loaded with the fixed table, so
  the classifier computes what the fixed-table one does until it is trained."""
  learned, fixed = small_classifier(2, learned_pos_embed=True), small_classifier(2)
  params = classifier_params(2, learned_pos_embed=True)
  np.testing.assert_array_equal(params["pos_embed"][0], posembed.sincos_2d(8, (2, 2)))
  assert "pos_embed" not in classifier_params(2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  no_pos = {k: v for k, v in params.items() if k != "pos_embed"}
  np.testing.assert_allclose(learned.apply({"params": params}, x),
                             fixed.apply({"params": no_pos}, x), atol=1e-6)
  grad = jax.grad(lambda p: (learned.apply({"params": p}, x) ** 2).sum())(params)
  assert float(jnp.abs(grad["pos_embed"]).max()) > 0


def per_leaf(tree):
  return flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


def test_layer_decay_gives_the_reference_per_layer_learning_rates():
  """One AdamW step with unit gradients moves each parameter by lr * decay**(depth + 1 -
  layer): patch embedding and cls token layer 0, block i layer i + 1, fc_norm and head
  depth + 1 (reference util/lr_decay.py). With zero gradients only the decoupled weight
  decay moves kernels, by the same per-layer lr, and never biases or norms."""
  depth, decay = 3, 0.5
  params = classifier_params(depth, learned_pos_embed=True)
  cfg = ml_collections.ConfigDict(dict(base_lr=0.1, min_lr=0.0, layer_decay=decay,
                                       weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=None))
  tx, schedule = optimizers.finetune_optimizer(cfg, params, depth, 256, 0, 10)
  lr = float(schedule(0))
  assert lr == pytest.approx(0.1)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(ones, tx.init(params), params)
  effective = {k: -v / lr for k, v in per_leaf(updates).items()}  # Adam's first step: 1
  for name in ("patch_embed/kernel", "patch_embed/bias", "cls_token", "pos_embed"):
    np.testing.assert_allclose(effective[name], decay**(depth + 1), rtol=1e-5)
  for name in ("head/kernel", "head/bias", "fc_norm/scale"):
    np.testing.assert_allclose(effective[name], 1.0, rtol=1e-5)
  block_leaves = [k for k in effective if k.startswith("blocks/")]
  assert len(block_leaves) >= 8
  for name in block_leaves:
    for i in range(depth):
      np.testing.assert_allclose(effective[name][i], decay**(depth - i), rtol=1e-5,
                                 err_msg=f"{name} block {i}")

  cfg.weight_decay = 0.2
  tx, _ = optimizers.finetune_optimizer(cfg, params, depth, 256, 0, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = per_leaf(jax.jit(tx.update)(zeros, tx.init(params), params)[0])
  flat = per_leaf(params)
  np.testing.assert_allclose(updates["head/kernel"], -lr * 0.2 * flat["head/kernel"],
                             rtol=1e-5)
  np.testing.assert_allclose(updates["patch_embed/kernel"],
                             -lr * decay**(depth + 1) * 0.2 * flat["patch_embed/kernel"],
                             rtol=1e-5)
  qkv = next(k for k in updates if k.startswith("blocks/") and k.endswith("kernel"))
  np.testing.assert_allclose(updates[qkv][1], -lr * decay**(depth - 1) * 0.2 * flat[qkv][1],
                             rtol=1e-5)
  for name in ("head/bias", "fc_norm/scale", "cls_token", "pos_embed", "patch_embed/bias"):
    np.testing.assert_array_equal(updates[name], 0.0)


def numpy_knn(train_ND, train_labels, test_MD, k, temperature, num_classes, weighted=True,
              cosine=True):
  if cosine:
    train_ND = train_ND / np.linalg.norm(train_ND, axis=1, keepdims=True)
    test_MD = test_MD / np.linalg.norm(test_MD, axis=1, keepdims=True)
  sim = test_MD @ train_ND.T
  top = np.argsort(-sim, axis=1)[:, :k]
  votes = np.zeros((len(test_MD), num_classes))
  for m in range(len(test_MD)):
    for n in top[m]:  # exp((s - max) / T): the same argmax as exp(s / T), without overflow
      weight = np.exp((sim[m, n] - sim[m].max()) / temperature)
      votes[m, train_labels[n]] += weight if weighted else 1.0
  return votes.argmax(1)


def test_knn_top1_is_the_weighted_cosine_vote():
  """k = 20 neighbours by cosine similarity, votes exp(sim / 0.07). The features are made
  so that an unweighted vote or a dot-product similarity gives other answers."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 6))
  labels = rng.integers(0, 3, 60)
  train = centres[labels] + rng.normal(scale=1.2, size=(60, 6))
  train *= rng.uniform(0.2, 5, (60, 1))  # norms vary: cosine != dot product
  test = centres[rng.integers(0, 3, 37)] + rng.normal(scale=1.2, size=(37, 6))
  test_labels = numpy_knn(train, labels, test, 20, 0.07, 3)  # "truth" = the reference vote
  test_labels[::3] = (test_labels[::3] + 1) % 3  # a third of them wrong
  want = numpy_knn(train, labels, test, 20, 0.07, 3)
  assert (want != numpy_knn(train, labels, test, 20, 0.07, 3, weighted=False)).any()
  assert (want != numpy_knn(train, labels, test, 20, 0.07, 3, cosine=False)).any()
  got = knn.knn_predict(jnp.asarray(train, jnp.float32), jnp.asarray(labels),
                        jnp.asarray(test, jnp.float32), k=20, temperature=0.07, num_classes=3)
  np.testing.assert_array_equal(np.asarray(got), want)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
  top1 = knn.knn_top1((train, labels), (test, test_labels), k=20, temperature=0.07,
                      num_classes=3, mesh=mesh, batch_size=16)  # 37 rows: 3 padded batches
  assert top1 == pytest.approx(np.mean(want == test_labels)) and top1 == pytest.approx(24 / 37)


def mesh_of(num_devices):
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}),
                            jax.devices()[:num_devices])


def test_encode_features_do_not_depend_on_the_batch_split():
  """Tokens of 8 images at once == those of two batches of 4; `extract` over 20 images on
  8 devices in batches of 8 (the last one padded) == on 1 device in one batch of 24."""
  params = pretrained.random_params(TINY, 0)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (20, SIZE, SIZE, 1), np.uint8)
  encode = jax.jit(lambda x: TINY.apply({"params": params}, data.normalize(x, (0.5,), (0.25,)),
                                        method=TINY.encode))
  whole = np.asarray(encode(images[:8]))
  halves = np.concatenate([encode(images[:4]), encode(images[4:8])])
  np.testing.assert_allclose(whole, halves, rtol=1e-5, atol=1e-5)
  assert np.abs(whole[0] - whole[1]).max() > 1e-3  # the images do differ

  source = ArraySource(images, np.arange(20) % 4, channels=1, num_classes=4,
                       known_stats=((0.5,), (0.25,)))
  kw = dict(model=TINY, kind="avg", image_size=SIZE, log=lambda _: None)
  params8 = jax.device_put(params, sharding.replicated(mesh_of(8)))  # its training layout
  f8, labels8 = features.extract(params8, source, mesh=mesh_of(8), batch_size=8, **kw)
  f1, labels1 = features.extract(params, source, mesh=mesh_of(1), batch_size=24, **kw)
  assert f8.shape == (20, 32)
  np.testing.assert_array_equal(labels8, np.arange(20) % 4)
  np.testing.assert_array_equal(labels1, labels8)
  np.testing.assert_allclose(f8, f1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f8[:8], whole[:, 1:].mean(axis=1), rtol=1e-5, atol=1e-5)


def test_drop_path_statistics():
  """Rate r: each example's branch kept with probability 1 - r, kept ones scaled 1/(1-r)."""
  y = jnp.ones((4000, 3, 2))
  out = np.asarray(vit.drop_path(y, jnp.float32(0.3), jax.random.key(0)))
  kept = out[:, 0, 0] != 0
  assert abs(kept.mean() - 0.7) < 0.03
  np.testing.assert_allclose(out[kept], 1 / 0.7, rtol=1e-6)
  np.testing.assert_array_equal(out[~kept], 0)
  assert (out == out[:, :1, :1]).all()  # one draw per example


def test_drop_path_in_the_block_stack():
  """deterministic=True is the stack without drop path; in training the rates rise
  linearly from 0 (block 1 never dropped) to r (block 2's two branches each dropped with
  probability r), so identical inputs give exactly 4 distinct outputs, and "both dropped"
  (about r**2 of them) is block 1 alone."""
  depth, rate = 2, 0.5
  plain = vit.BlockStack(depth, num_heads=2, mlp_dim=32)
  dropping = vit.BlockStack(depth, num_heads=2, mlp_dim=32, drop_path=rate)
  x = jax.random.normal(jax.random.key(0), (1, 5, 16))
  params = jax.jit(plain.init)(jax.random.key(1), x)["params"]
  np.testing.assert_array_equal(jax.jit(dropping.apply)({"params": params}, x),
                                jax.jit(plain.apply)({"params": params}, x))
  batch = jnp.repeat(x, 256, axis=0)
  train = jax.jit(lambda p, b: dropping.apply({"params": p}, b, deterministic=False,
                                              rngs={"dropout": jax.random.key(2)}))
  out = np.asarray(train(params, batch))
  distinct = np.unique(out.round(5).reshape(256, -1), axis=0)
  assert len(distinct) == 4
  first = jax.tree.map(lambda a: a[:1], params)
  block1 = np.asarray(jax.jit(vit.BlockStack(1, num_heads=2, mlp_dim=32).apply)(
      {"params": first}, x))
  both_dropped = np.all(np.abs(out - block1) < 1e-5, axis=(1, 2))
  assert abs(both_dropped.mean() - rate**2) < 0.08


# ---------------------------------------------------------------------------
# Small, fast checks of the pieces the end-to-end runs above use (for `make test-fast`).


def test_linear_probe_steps_learn_a_separable_problem():
  """LARS-free probe steps (plain SGD) on two Gaussian blobs: the loss falls, the training
  accuracy reaches 1 and the BatchNorm running mean moves towards the features' mean."""
  rng = np.random.default_rng(0)
  labels = np.arange(32) % 2
  x = rng.normal(0, 0.3, (32, 4)).astype(np.float32) + 2.0
  x[:, 0] += np.where(labels == 1, 1.0, -1.0)
  batch = {"x": jnp.asarray(x), "label": jnp.asarray(labels, jnp.int32)}
  model, tx = linprobe.LinearProbe(num_classes=2), optax.sgd(0.5)
  state = linprobe.init_probe(model, tx, jax.random.key(0), 4)
  step = jax.jit(functools.partial(linprobe.probe_step, model=model, tx=tx,
                                   schedule=optax.constant_schedule(0.5)))
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0] and float(metrics["accuracy"]) == 1.0
  assert int(state.step) == 20
  mean = np.asarray(state.batch_stats["bn"]["mean"])
  assert np.all(np.abs(mean - x.mean(0)) < np.abs(x.mean(0)))  # moved from 0 towards it


def test_smoothed_targets_and_mixup_mix_images_and_targets_alike():
  targets = eval_augment.smooth_targets(jnp.array([1, 3]), 4, 0.1)
  np.testing.assert_allclose(targets, [[0.025, 0.925, 0.025, 0.025],
                                       [0.025, 0.025, 0.025, 0.925]], rtol=1e-6)
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  onehot = jax.nn.one_hot(jnp.arange(4), 4)
  mixed, mixed_targets = eval_augment.mixup_cutmix(
      images, onehot, jax.random.key(1), mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0,
      switch_prob=0.5)
  lam = float(mixed_targets[0, 0])  # image 0 is mixed with image 3 (the reversed batch)
  assert 0 < lam < 1 and float(mixed_targets[0, 3]) == pytest.approx(1 - lam)
  np.testing.assert_allclose(mixed[0], lam * images[0] + (1 - lam) * images[3], rtol=1e-5)
  same, same_targets = eval_augment.mixup_cutmix(
      images, onehot, jax.random.key(1), mixup_alpha=0.8, cutmix_alpha=0.0, prob=0.0,
      switch_prob=0.5)
  np.testing.assert_array_equal(same, images)
  np.testing.assert_array_equal(same_targets, onehot)


def test_finetuned_classifier_saves_and_loads(tmp_path):
  model = finetune.classifier.ViTClassifier(
      num_classes=3, image_size=8, patch_size=4, channels=1, width=8, depth=2, num_heads=2)
  params = classifier_params(2)
  finetune.save(str(tmp_path / "ft"), params, model, {"top1": 0.5})
  loaded_model, loaded = finetune.load(str(tmp_path / "ft"))
  assert (loaded_model.depth, loaded_model.num_classes, loaded_model.width) == (2, 3, 8)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  x = jax.random.uniform(jax.random.key(2), (2, 8, 8, 1))
  np.testing.assert_array_equal(loaded_model.apply({"params": loaded}, x),
                                model.apply({"params": params}, x))
