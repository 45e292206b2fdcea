"""A convolutional masked autoencoder: the baseline the ViT MAE is compared with.

  python -m mae_jax.conv_mae --workdir DIR [--config configs/conv_mae.py]
      [--mode knn,linprobe] [--eval_config configs/eval.py] [--config.FIELD=VALUE ...]

Each pixel of the [0, 1] image is zeroed with probability model.mask_ratio (element-wise,
independently per image, the same for every channel). The encoder is 3 x 3 convolutions of
model.features channels (32-64-128) with ReLU and a 2 x 2 max-pool between them; the
decoder mirrors it with nearest-neighbour upsampling and ends in a 3 x 3 convolution to
the image channels and a sigmoid. The loss is the MSE over the whole image, masked and
visible pixels alike.

After training, DIR gets the files `train.py` + `python -m mae_jax.evaluate` write, so
both models are read alike (python -m mae_jax.sweep):
- summary.json: test_masked_mse (MSE on the masked pixels of the test split, [0, 1]
  pixels; ViT MAE: on the masked patches), test_mse (whole image), final_train_loss,
  steps, train_seconds, images_per_sec;
- eval_knn.json, eval_linprobe.json: top-1 of the `--eval_config` recipe on the encoder's
  features of the unmasked image, globally average-pooled (model.features[-1] dims).
Training runs on the one loop (mae_jax.train.loop) as pretraining does: DIR is locked, checkpointed
(every checkpoint_every_steps, at the end and on SIGTERM / SIGINT) and resumed exactly by
running the same command again; the linear probe is a job of its own in DIR/linprobe/.
DIR may be gs://BUCKET/PATH (mae_jax.paths).
"""
import functools
import json
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mae_jax import checks, data, paths
from mae_jax.evaluation import knn as knn_lib, linprobe
from mae_jax.train import config as config_lib, loop, optim, program, sharding
from mae_jax.tools import cli

MODES = ("knn", "linprobe")


class ConvMAE(nn.Module):
  """Conv encoder (features[i] channels, 2x2 max-pool between) and its mirror image."""
  features: tuple = (32, 64, 128)
  channels: int = 1

  def setup(self):
    conv = lambda f, name: nn.Conv(f, (3, 3), padding="SAME", name=name)
    self.encoder = [conv(f, f"enc_{i}") for i, f in enumerate(self.features)]
    self.decoder = [conv(f, f"dec_{i}") for i, f in enumerate(self.features[-2::-1])]
    self.head = conv(self.channels, "head")

  def encode(self, x_BHWC):
    """[0, 1] images -> feature maps (B, H / 2^(L-1), W / 2^(L-1), features[-1])."""
    for i, layer in enumerate(self.encoder):
      if i > 0:
        x_BHWC = nn.max_pool(x_BHWC, (2, 2), strides=(2, 2))
      x_BHWC = nn.relu(layer(x_BHWC))
    return x_BHWC

  def __call__(self, x_BHWC):
    """Masked [0, 1] images -> reconstructed [0, 1] images of the same shape."""
    z = self.encode(x_BHWC)
    for layer in self.decoder:
      z = jnp.repeat(jnp.repeat(z, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
      z = nn.relu(layer(z))
    return nn.sigmoid(self.head(z))


def to_unit(images_u8):
  return images_u8.astype(jnp.float32) / 255.0


def pixel_mask(rng, images_BHWC, ratio):
  """1.0 where a pixel is masked (probability `ratio`), shared by the channels: (B,H,W,1)."""
  b, h, w, _ = images_BHWC.shape
  return jax.random.bernoulli(rng, ratio, (b, h, w, 1)).astype(jnp.float32)


def loss_fn(params, x_BHWC, mask_BHW1, model):
  recon = model.apply({"params": params}, x_BHWC * (1.0 - mask_BHW1))
  return jnp.mean(jnp.square(recon - x_BHWC)), recon


@flax.struct.dataclass
class ConvState:
  step: jax.Array
  params: Any
  opt_state: Any


def init_state(rng, *, model, tx, image_shape):
  params = model.init(rng, jnp.zeros((1, *image_shape)))["params"]
  return ConvState(jnp.zeros((), jnp.int32), params, tx.init(params))


def train_step(state, batch, rng, *, model, tx, schedule, ratio):
  """One AdamW step on the whole-image MSE of a freshly masked batch {"image": uint8}."""
  x = to_unit(batch["image"])
  mask = pixel_mask(jax.random.fold_in(rng, state.step), x, ratio)
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x, mask, model)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.global_norm(grads)}
  return ConvState(state.step + 1, optax.apply_updates(state.params, updates),
                   opt_state), metrics


def eval_sums(params, images_u8, valid_B, rng, *, model, ratio):
  """Sums of squared error over masked pixels and over all pixels, and their counts."""
  x = to_unit(images_u8)
  mask = pixel_mask(rng, x, ratio)
  _, recon = loss_fn(params, x, mask, model)
  sq = jnp.square(recon - x) * valid_B[:, None, None, None]
  masked = mask * valid_B[:, None, None, None]
  return {"masked_sq": jnp.sum(sq * masked), "masked_count": jnp.sum(masked) * x.shape[-1],
          "sq": jnp.sum(sq), "count": jnp.sum(valid_B) * x[0].size}


def validate(config, modes):
  """One line for the first field that cannot work, before anything compiles."""
  m = config.model
  checks.check(len(m.features) >= 1 and all(checks.is_int(f) and f >= 1 for f in m.features),
               "model.features", f"{tuple(m.features)} must be positive integers")
  checks.check(checks.is_number(m.mask_ratio) and 0 < m.mask_ratio < 1, "model.mask_ratio",
               f"{m.mask_ratio} must be in (0, 1)")
  factor = 2**(len(m.features) - 1)
  checks.check(config.data.image_size % factor == 0, "data.image_size",
               f"{config.data.image_size} is not a multiple of {factor} (one 2x2 "
               "max-pool between each of model.features)")
  config_lib.validate_data(config)
  config_lib.validate_optim(config)
  config_lib.validate_logging(config)
  checks.check_int(config.batch_size, "batch_size", 1)
  checks.check_int(config.checkpoint_every_steps, "checkpoint_every_steps", 1)
  checks.check_int(config.keep_checkpoints, "keep_checkpoints", 1)
  checks.check_int(config.stop_after_steps, "stop_after_steps", 1, optional=True)
  for mode in modes:
    if mode not in MODES:
      raise config_lib.ConfigError(f"--mode: {mode!r} is not valid; valid values: "
                                   f"{', '.join(MODES)}")


def extract(params, source, *, model, mesh, image_size, batch_size):
  """(avg-pooled encoder features (N, D) of the unmasked images, labels (N,))."""
  fn = program.jit(lambda p, x: model.apply({"params": p}, to_unit(x), method=model.encode)
                   .mean(axis=(1, 2)), mesh)
  feats, labels = [], []
  for batch in data.make_eval_batches(source, image_size=image_size, batch_size=batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count()):
    g = sharding.global_batch(batch, mesh)
    valid = sharding.to_host(g["valid"])
    feats.append(sharding.to_host(fn(params, g["image"]))[valid])
    labels.append(sharding.to_host(g["label"])[valid])
  return np.concatenate(feats), np.concatenate(labels).astype(np.int32)


def write_json(path, payload):
  if jax.process_index() == 0:
    paths.write_atomic(path, json.dumps(payload, indent=2, default=str))
  return path


def test_errors(params, test_src, *, model, config, mesh):
  """Summed squared errors (masked pixels, all pixels) and their counts over the test
  split, with fixed masks (seed + 2)."""
  sums_fn = program.jit(functools.partial(eval_sums, model=model, ratio=config.model.mask_ratio),
                        mesh)
  totals = {"masked_sq": 0.0, "masked_count": 0.0, "sq": 0.0, "count": 0.0}
  eval_rng = jax.random.key(config.seed + 2)
  for i, batch in enumerate(data.make_eval_batches(
      test_src, image_size=config.data.image_size, batch_size=config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())):
    g = sharding.global_batch({"image": batch["image"], "valid": batch["valid"]}, mesh)
    out = sums_fn(params, g["image"], g["valid"].astype(jnp.float32),
                  jax.random.fold_in(eval_rng, i))
    for key in totals:
      totals[key] += float(out[key])
  return totals


def build_program(config, model, tx, schedule, mesh):
  """The conv baseline's training program (mae_jax.train.program.build)."""
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  return program.build(
      mesh, functools.partial(init_state, model=model, tx=tx, image_shape=shape),
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        ratio=config.model.mask_ratio), batch_keys=("image",))


def host_batches(config, train_src, start_step):
  return ({"image": b["image"]} for b in data.make_train_batches(
      train_src, image_size=config.data.image_size, global_batch_size=config.batch_size,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      augment=config.data.augment, crop_scale=tuple(config.data.crop_scale),
      start_step=start_step, num_workers=config.data.num_workers))


def train(config, workdir):
  """Train on the one loop (resuming `workdir` where it holds checkpoints) and write
  summary.json; returns (model, params, mesh, (train_src, test_src)), what `evaluate`
  takes, or None where the run stopped before its end."""
  train_src = data.load_source(config.data, "train")
  test_src = data.load_source(config.data, "test")
  config_lib.check_data_size(config, len(train_src))
  dur = config_lib.durations(config, len(train_src))
  model = ConvMAE(tuple(config.model.features), config.data.channels)
  tx, schedule = optim.make_optimizer(config.optim, config.batch_size, dur.warmup_steps,
                                      dur.total_steps)
  mesh = sharding.make_mesh(config.mesh)
  conv = build_program(config, model, tx, schedule, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(conv.abstract_state.params))
  job = loop.Job(
      kind="conv_mae", workdir=workdir, config=config, program=conv,
      total_steps=dur.total_steps, images_per_step=config.batch_size,
      batches=lambda start: sharding.device_batches(host_batches(config, train_src, start),
                                                    mesh),
      base_rng=jax.random.key(config.seed + 1),
      describe=lambda restored: (
          f"conv_mae: {num_params / 1e6:.2f}M-parameter conv MAE (features "
          f"{tuple(config.model.features)}, pixel mask ratio {config.model.mask_ratio}) on "
          f"{config.data.name} ({len(train_src)} train images), {dur.total_steps} steps of "
          f"batch {config.batch_size}, {jax.device_count()} device(s)"
          + (f"; resuming from step {restored}" if restored is not None else "")))

  def finish(outcome, logger):
    summary = write_summary(config, workdir, outcome, num_params, dur.total_steps,
                            test_errors(outcome.state.params, test_src, model=model,
                                        config=config, mesh=mesh))
    logger.info(f"test masked-pixel MSE {summary['test_masked_mse']:.4f} (whole image "
                f"{summary['test_mse']:.4f}) after {summary['train_seconds']:.0f} s")
    return model, outcome.state.params, mesh, (train_src, test_src)

  return loop.run(job, finish)[1]


def write_summary(config, workdir, outcome, num_params, total_steps, totals):
  """summary.json (the fields train.py's has where they apply) as a dict."""
  summary = {
      "test_masked_mse": totals["masked_sq"] / totals["masked_count"],
      "test_mse": totals["sq"] / totals["count"],
      "final_train_loss": outcome.final_loss,
      "steps": total_steps,
      "train_seconds": round(outcome.train_seconds, 1),
      "images_per_sec": outcome.images_per_sec and round(outcome.images_per_sec, 1),
      "devices": jax.device_count(),
      "model": {"kind": "conv_mae", "features": list(config.model.features),
                "mask_ratio": config.model.mask_ratio, "image_size": config.data.image_size,
                "channels": config.data.channels, "num_params": int(num_params)},
  }
  write_json(paths.join(workdir, "summary.json"), summary)
  return summary


def evaluate(model, params, mesh, sources, eval_config, workdir, modes, *, image_size):
  """kNN / linear probe on the avg-pooled encoder features; eval_<mode>.json each."""
  if not modes:
    return {}
  data_cfg = eval_config.data
  train_src, test_src = sources
  if data_cfg.get("train_examples"):
    train_src = data.Subset(train_src, data_cfg.train_examples)
  num_classes = train_src.num_classes
  checks.check(num_classes, "data.name", "the dataset has no class labels to evaluate against")
  t0 = time.perf_counter()
  kw = dict(model=model, mesh=mesh, image_size=image_size, batch_size=eval_config.eval_batch_size)
  train, test = extract(params, train_src, **kw), extract(params, test_src, **kw)
  feature_seconds = time.perf_counter() - t0
  results = {}
  for mode in modes:
    t0 = time.perf_counter()
    if mode == "knn":
      cfg = eval_config.knn
      out = {"top1": knn_lib.knn_top1(train, test, k=cfg.k, temperature=cfg.temperature,
                                      num_classes=num_classes, mesh=mesh,
                                      batch_size=eval_config.eval_batch_size),
             "k": cfg.k, "temperature": cfg.temperature}
    else:
      out = linprobe.train_and_test(
          train, test, eval_config.linprobe, num_classes=num_classes, mesh=mesh,
          eval_batch_size=eval_config.eval_batch_size, workdir=paths.join(workdir, "linprobe"),
          job_config=probe_config(eval_config, num_classes, workdir))
      if out is None:
        return results  # stopped by a signal: so does the command
    seconds = time.perf_counter() - t0 + (feature_seconds if not results else 0.0)
    out = dict(out, mode=mode, name=mode, features="avg", subject="conv_mae",
               train_examples=len(train[0]), seconds=round(seconds, 1),
               devices=jax.device_count(), config=eval_config[mode].to_dict())
    write_json(paths.join(workdir, f"eval_{mode}.json"), out)
    print(f"{mode}: top-1 {out['top1']:.4f}", flush=True)
    results[mode] = out
  return results


def probe_config(eval_config, num_classes, workdir):
  """The linear probe job's config (as mae_jax.evaluate's): its block, the shared fields,
  what it is of."""
  c = ml_collections.ConfigDict(eval_config.linprobe.to_dict())
  c.update(seed=eval_config.seed, encoder=f"conv_mae {paths.absolute(workdir)}",
           num_classes=num_classes, mesh=eval_config.mesh.to_dict(),
           eval_batch_size=eval_config.eval_batch_size,
           keep_checkpoints=eval_config.keep_checkpoints,
           stop_after_steps=eval_config.stop_after_steps,
           allow_config_change=eval_config.allow_config_change,
           logging=dict(eval_config.get("logging") or {}))
  return c


def train_and_evaluate(config, eval_config, workdir, modes):
  """Train, then evaluate in `modes` (eval_<mode>.json each); returns summary.json's dict,
  or None where training stopped before its end (run again to resume)."""
  validate(config, modes)
  config_lib.validate_logging(eval_config)  # its linear probe logs
  trained = train(config, workdir)
  if trained is None:
    return None
  model, params, mesh, sources = trained
  evaluate(model, params, mesh, sources, eval_config, workdir, modes,
           image_size=config.data.image_size)
  return json.loads(paths.read_text(paths.join(workdir, "summary.json")))


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  modes = [m.strip() for m in flags.FLAGS.mode.split(",") if m.strip()]
  workdir = flags.FLAGS.workdir
  try:
    check_workdir(workdir)
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.eval_config, workdir, modes)
  except (cli.UsageError, config_lib.ConfigError, data.DatasetError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def check_workdir(workdir):
  """--workdir is a directory (new, or this command's own) that takes a file: on gs://, a
  probe object is written and deleted, so a missing bucket, missing credentials or an
  unreachable server is one line before anything compiles."""
  expected = cli.UsageError(f"--workdir {workdir!r}: expected a directory (new, or this "
                            "command's own)")
  if not workdir:
    raise expected
  try:
    taken = paths.isfile(workdir)
    if paths.is_gcs(workdir) and not taken:
      paths.write_probe(workdir)
  except paths.PathError as e:
    raise cli.UsageError(f"--workdir {e}") from None
  except Exception as e:  # gcsfs, aiohttp and google-auth errors
    if not paths.is_gcs(workdir):
      raise
    if isinstance(e, FileNotFoundError):
      raise cli.UsageError(f"--workdir {workdir}: bucket {paths.bucket(workdir)} does not "
                           "exist (or these credentials cannot see it)") from None
    raise cli.UsageError(f"--workdir {workdir}: cannot write there ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
  if taken:
    raise expected


def parse_flags(argv):
  """absl's parsing; a bad flag, field or recipe file is one `error:` line and exit 2."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mae_jax.tools import pretrain  # pylint: disable=g-import-not-at-top
  try:
    argv = flags.FLAGS(argv)
    for name in ("config", "eval_config"):  # recipes load lazily: a bad one raises here
      flags.FLAGS[name].value.keys()
    return argv
  except Exception as e:  # pylint: disable=broad-except (absl, ml_collections, the recipe)
    pretrain.flag_failure(e)


def run():
  """`python -m mae_jax.conv_mae`, the console script `mae-conv`; relative recipe paths are
  read from the current directory (the defaults: cli.default_recipe)."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from mae_jax.tools import pretrain  # pylint: disable=g-import-not-at-top
  try:  # without --config, a recipe and its overrides load right here
    config_flags.DEFINE_config_file("config", cli.default_recipe("conv_mae.py"),
                                    "Conv MAE recipe.", lock_config=True)
    config_flags.DEFINE_config_file("eval_config", cli.default_recipe("eval.py"),
                                    "Evaluation recipe (knn, linprobe blocks).",
                                    lock_config=True)
  except Exception as e:  # pylint: disable=broad-except (absl, ml_collections, the recipe)
    pretrain.flag_failure(e)
  flags.DEFINE_string("workdir", None, "Results go here.", required=True)
  flags.DEFINE_string("mode", "knn,linprobe", "Comma-separated evaluations: knn, linprobe; "
                      "empty for none.")
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
