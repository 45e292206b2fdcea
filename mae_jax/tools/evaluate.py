"""Evaluate an MAE encoder: kNN, linear probe or fine-tuning (paper Sec. 4, A.2, A.3).

  python -m mae_jax.evaluate --workdir DIR --mode knn,linprobe [--config configs/eval.py]
      [--config.init=random] [--config.linprobe.features=pixels] [--config.FIELD=VALUE ...]
  python -m mae_jax.evaluate --workdir DIR --mode finetune

Several processes: as train.py (--coordinator_address, --num_processes, --process_id, or
nothing more under srun, mpirun or on a Cloud TPU VM).

DIR is a pretraining workdir (config.json + checkpoints/ of train.py), or any directory
with --config.params=IMPORT_DIR (an output of `python -m mae_jax.convert import`) and
--config.data.name=.... Results go to DIR/eval_<name>.json and are printed; fine-tuning
also saves its classifier to DIR/<name>/ (Orbax params + classifier.json). <name> is the
mode, + _random (random-init encoder) / _scratch (fine-tuning from scratch) / _pixels.
"""
import dataclasses
import json
import os
import sys
import time

import jax
import ml_collections

from mae_jax import data, paths
from mae_jax.data import augment as data_augment
from mae_jax.evaluation import classifier, features as features_lib, finetune, knn as knn_lib
from mae_jax.evaluation import linprobe
from mae_jax.model import vit
from mae_jax.train import checkpoints, config as config_lib, loop, param_dirs, pretrained, sharding, workdirs
from mae_jax.model.mae import MaskedAutoencoder
from mae_jax.tools import cli, pretrain

MODES = ("knn", "linprobe", "finetune")
INITS = ("pretrained", "random")


@dataclasses.dataclass
class Subject:
  """The encoder under evaluation and the data it is evaluated on."""
  model: MaskedAutoencoder
  params: object
  data_config: ml_collections.ConfigDict
  description: str
  # What a training evaluation's job is of (its saved config's `encoder`): the description,
  # with the workdir's own checkpoints named by step only, so that a workdir moved or
  # copied elsewhere resumes its jobs.
  identity: str = ""

  def __post_init__(self):
    self.identity = self.identity or self.description


def log(message):
  if jax.process_index() == 0:
    print(message, flush=True)


def check(ok, field, message):
  if not ok:
    raise config_lib.ConfigError(f"config.{field}: {message}")


def validate(config, modes, num_devices=None):
  """One clear line for the first field that cannot work, before anything compiles."""
  for mode in modes:
    if mode not in MODES:
      raise config_lib.ConfigError(f"--mode: {mode!r} is not valid; valid values: "
                                   f"{', '.join(MODES)}")
  config_lib.validate_logging(config)
  check(config.init in INITS, "init", f"{config.init!r} is not valid; valid values: "
        f"{', '.join(INITS)}")
  for block in ("knn", "linprobe"):
    check(config[block].features in features_lib.KINDS, f"{block}.features",
          f"{config[block].features!r} is not valid; valid values: "
          f"{', '.join(features_lib.KINDS)}")
  check(config.knn.k >= 1, "knn.k", f"{config.knn.k} must be >= 1")
  check(config.knn.temperature > 0, "knn.temperature", "must be positive")
  ft = config.finetune
  check(ft.pool in classifier.POOLS, "finetune.pool",
        f"{ft.pool!r} is not valid; valid values: {', '.join(classifier.POOLS)}")
  check(ft.pos_embed in classifier.POS_EMBEDS, "finetune.pos_embed",
        f"{ft.pos_embed!r} is not valid; valid values: {', '.join(classifier.POS_EMBEDS)}")
  check(ft.remat is None or ft.remat in vit.REMAT_POLICIES, "finetune.remat",
        f"{ft.remat!r} is not valid; valid values: {', '.join(sorted(vit.REMAT_POLICIES))}")
  check(ft.augment in data_augment.AUGMENTS, "finetune.augment",
        f"{ft.augment!r} is not valid; valid values: {', '.join(data_augment.AUGMENTS)}")
  check(0 < ft.optim.layer_decay <= 1, "finetune.optim.layer_decay", "must be in (0, 1]")
  check(0 <= ft.drop_path < 1, "finetune.drop_path", "must be in [0, 1)")
  check(0 <= ft.label_smoothing < 1, "finetune.label_smoothing", "must be in [0, 1)")
  check(ft.mixup >= 0 and ft.cutmix >= 0, "finetune.mixup", "mixup and cutmix must be >= 0")
  check(ft.randaug_ops >= 0, "finetune.randaug_ops", "must be >= 0")
  check(not ft.eval_every_epochs or ft.eval_every_epochs > 0, "finetune.eval_every_epochs",
        "must be >= 0 (0: test only at the end)")
  check(0 <= ft.randaug_magnitude <= 10, "finetune.randaug_magnitude", "must be in [0, 10]")
  check(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
  check(config.stop_after_steps is None or config.stop_after_steps >= 1, "stop_after_steps",
        "must be >= 1 (or None: run to the end)")
  for block in ("linprobe", "finetune"):
    check(config[block].checkpoint_every_steps >= 1, f"{block}.checkpoint_every_steps",
          "must be >= 1")
    check(config[block].optim.base_lr > 0, f"{block}.optim.base_lr", "must be positive")
    check(config[block].num_steps is not None or config[block].num_epochs > 0,
          f"{block}.num_epochs", "must be positive (or set num_steps)")
  n = config_lib.data_parallel_size(config.mesh, num_devices or jax.device_count())
  batch_sizes = {"eval_batch_size": config.eval_batch_size,
                 "linprobe.batch_size": config.linprobe.batch_size,
                 "finetune.batch_size": config.finetune.batch_size}
  for field, value in batch_sizes.items():
    check(value >= 1 and value % n == 0 and value % jax.process_count() == 0, field,
          f"{value} is not a positive multiple of the {n} data-parallel devices and "
          f"{jax.process_count()} processes")


def data_config(base, overrides, model):
  """The pretraining run's data block (or {}), overridden where the eval config sets a
  field; image size and channels are the model's."""
  merged = dict(base)
  merged.update({k: v for k, v in overrides.items() if v is not None})
  merged.update(image_size=model.image_size, channels=model.channels)
  check(merged.get("name"), "data.name", "no dataset: the workdir has no config.json to "
        "take it from; set --config.data.name")
  merged.setdefault("num_workers", 0)
  return ml_collections.ConfigDict(merged)


def run_kind(workdir):
  """The kind of job (mae_jax.train.loop.KINDS) whose config.json `workdir` holds, or None."""
  saved = workdirs.load_config_dict(workdir)
  return None if saved is None else saved.get("job", "pretrain")


def load_subject(config, workdir, mesh):
  """The model, its params (pretrained or random) and the dataset to evaluate on.

  The params come from config.params (a converted checkpoint) or the workdir's latest (or
  checkpoint_step) checkpoint, restored straight into their training layout on `mesh`.
  """
  has_run = paths.exists(paths.join(workdir, "config.json"))
  check(config.params or has_run, "params", f"{workdir} has no config.json (not a train.py "
        "workdir); give an imported checkpoint with --config.params")
  if run_kind(workdir) not in (None, "pretrain"):
    raise config_lib.ConfigError(
        f"--workdir {workdir}: holds a {loop.KINDS[run_kind(workdir)]} run, not a "
        "pretraining one; give the pretraining workdir it belongs to")
  source = config.params or workdir
  model, _ = pretrained.model_of(source, sharding.platform(mesh))
  run = workdirs.load_config_dict(workdir) if has_run else None
  dcfg = data_config(run["data"] if run else {}, config.data, model)
  if config.init == "random":
    return Subject(model, pretrained.random_params(model, config.seed, mesh), dcfg,
                   f"random init (seed {config.seed})")
  if config.params:
    pre = pretrained.load_converted(config.params, mesh)
    return Subject(model, pre.params, dcfg, pre.description)
  params, step = pretrained.restore_params(workdir, model, config.checkpoint_step, mesh)
  return Subject(model, params, dcfg, f"{paths.absolute(workdir)} at step {step}",
                 f"this workdir's checkpoint at step {step}")


def result_name(mode, init="pretrained", features=None):
  """The name of an evaluation's results (DIR/eval_<name>.json): the mode, + _pixels (raw
  pixel features) / _scratch (fine-tuning a random init) / _random (a random-init encoder)."""
  if features == "pixels":
    return f"{mode}_pixels"
  if init == "random":
    return mode + ("_scratch" if mode == "finetune" else "_random")
  return mode


def config_result_name(mode, config):
  """result_name of `mode` under an evaluation config."""
  return result_name(mode, config.init, config[mode].get("features"))


class Evaluation:
  """One subject, its splits and cached features, evaluated in any of the modes."""

  def __init__(self, config, workdir):
    self.config, self.workdir = config, workdir
    self.mesh = sharding.make_mesh(config.mesh)
    self.subject = load_subject(config, workdir, self.mesh)
    self.train_src = data.load_source(self.subject.data_config, "train")
    self.test_src = data.load_source(self.subject.data_config, "test")
    if self.test_src.note:
      log(self.test_src.note)
    self.num_classes = self.train_src.num_classes
    check(self.num_classes, "data.name", f"{self.subject.data_config.name}: the dataset has "
          "no class labels to evaluate against")
    self._features = {}

  def features(self, kind):
    """(train, test) pairs of (features, labels), computed once per kind."""
    if kind not in self._features:
      kw = dict(model=self.subject.model, kind=kind, mesh=self.mesh,
                image_size=self.subject.model.image_size,
                batch_size=self.config.eval_batch_size, log=log)
      self._features[kind] = tuple(
          features_lib.extract(self.subject.params, src, what=f"{kind} features ({split})",
                               **kw)
          for split, src in (("train", self.train_src), ("test", self.test_src)))
    return self._features[kind]

  def knn(self):
    cfg = self.config.knn
    train, test = self.features(cfg.features)
    top1 = knn_lib.knn_top1(train, test, k=cfg.k, temperature=cfg.temperature,
                        num_classes=self.num_classes, mesh=self.mesh,
                        batch_size=self.config.eval_batch_size)
    return {"top1": top1, "features": cfg.features, "k": cfg.k,
            "temperature": cfg.temperature}

  def job_config(self, mode):
    """The config of a linprobe / finetune job (in DIR/<name>/): its block of the eval
    config, the fields every job has, and what it is of (encoder, classes, dataset),
    which a resume must match (mae_jax.train.loop)."""
    c = ml_collections.ConfigDict(self.config[mode].to_dict())
    c.seed = self.config.seed
    c.encoder = self.subject.identity
    c.num_classes = self.num_classes
    c.data = self.subject.data_config.to_dict()
    c.mesh = self.config.mesh.to_dict()
    c.logging = dict(self.config.get("logging") or {})
    for field in ("eval_batch_size", "keep_checkpoints", "stop_after_steps",
                  "allow_config_change"):
      c[field] = self.config[field]
    return c

  def linprobe(self):
    cfg, name = self.config.linprobe, config_result_name("linprobe", self.config)
    train, test = self.features(cfg.features)
    job_config = self.job_config("linprobe")
    self.start_over_if_finished("linprobe", job_config)
    results = linprobe.train_and_test(
        train, test, cfg, num_classes=self.num_classes, mesh=self.mesh,
        eval_batch_size=self.config.eval_batch_size, workdir=self.job_dir(name),
        job_config=job_config)
    return results and dict(results, features=cfg.features)

  def finetune(self):
    cfg, name = self.config.finetune, config_result_name("finetune", self.config)
    tuner = finetune.Finetuner(
        self.subject.model, cfg, train_src=self.train_src, test_src=self.test_src,
        mesh=self.mesh, seed=self.config.seed, image_size=self.subject.model.image_size,
        eval_batch_size=self.config.eval_batch_size, num_classes=self.num_classes)
    pretrained = self.subject.params if self.config.init == "pretrained" else None
    job_config = self.job_config("finetune")
    self.start_over_if_finished("finetune", job_config)
    results, params = tuner.run(self.job_dir(name), job_config, pretrained,
                                num_workers=self.subject.data_config.num_workers)
    if results is None:
      return None
    path = finetune.save(self.job_dir(name), params, tuner.model, results)
    return dict(results, checkpoint=path, pool=cfg.pool, remat=tuner.model.kernels.remat)

  def job_dir(self, name):
    """DIR/<name>/: a training evaluation's own workdir (checkpoints, logs, results)."""
    return paths.join(self.workdir, name)

  def start_over_if_finished(self, mode, job_config):
    """A job in DIR/<name>/ that finished (DIR/eval_<name>.json holds its results) with
    other values, or of another encoder, is not resumed: this launch evaluates afresh,
    removing that job and its results. (An unfinished job of other values is refused by
    the loop instead.)"""
    name = config_result_name(mode, self.config)
    saved = workdirs.load_config_dict(self.job_dir(name))
    results = paths.join(self.workdir, f"eval_{name}.json")
    if (saved is None or not paths.exists(results)
        or not config_lib.changed_fields(job_config, saved)):
      return
    if jax.process_index() == 0:
      paths.resolve(self.job_dir(name)).rmtree()
      paths.resolve(results).unlink()
    log(f"{self.job_dir(name)}: its finished {mode} had other values ("
        + "; ".join(f"{f} {a!r} there, {b!r} here"
                    for f, a, b in config_lib.changed_fields(job_config, saved))
        + "): evaluating afresh")

  def run(self, mode):
    """Evaluate in `mode`; write DIR/eval_<name>.json and return the results."""
    t0 = time.perf_counter()
    name = config_result_name(mode, self.config)
    batch_size = self.config[mode].get("batch_size")
    check(batch_size is None or batch_size <= len(self.train_src), f"{mode}.batch_size",
          f"{batch_size} is larger than the {len(self.train_src)} training images")
    log(f"== {name}: {self.subject.description}, {self.subject.data_config.name} "
        f"({len(self.train_src)} train / {len(self.test_src)} test), "
        f"{jax.device_count()} device(s)")
    results = getattr(self, mode)()
    if results is None:  # stopped by a signal or stop_after_steps; rerun to resume
      return None
    results = dict(results, mode=mode, name=name, init=self.config.init,
                   subject=self.subject.description, dataset=self.subject.data_config.name,
                   seconds=round(time.perf_counter() - t0, 1), devices=jax.device_count(),
                   config=self.config[mode].to_dict())
    path = paths.join(self.workdir, f"eval_{name}.json")
    if jax.process_index() == 0:
      paths.makedirs(self.workdir)  # a new directory for a converted checkpoint
      paths.write_atomic(path, json.dumps(results, indent=2, default=str))
    log(f"{name}: top-1 {results['top1']:.4f} ({results['seconds']:.0f} s) -> {path}")
    return results


def check_results_dir(workdir):
  """Results go into `workdir` (made for a converted checkpoint): refuse one that cannot
  take them before anything is computed, not after (a gs:// workdir is checked when its
  run is read)."""
  if paths.is_gcs(workdir):
    return
  target = workdir if os.path.exists(workdir) else os.path.dirname(os.path.abspath(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise checkpoints.CheckpointError(f"--workdir {workdir}: is a file; expected a directory")
  if not os.path.isdir(target):
    raise checkpoints.CheckpointError(f"--workdir {workdir}: its folder {target} does not "
                                     "exist")
  if not os.access(target, os.W_OK | os.X_OK):
    raise checkpoints.CheckpointError(f"--workdir {workdir}: cannot write the results into "
                                     f"{target} (permission denied)")


def evaluate(config, workdir, modes):
  """Evaluate the workdir's encoder in each of `modes`; {mode: results}."""
  modes = [m.strip() for m in modes] if not isinstance(modes, str) else [
      m.strip() for m in modes.split(",")]
  validate(config, modes)
  checkpoints.check_workdir(workdir)
  check_results_dir(workdir)
  evaluation = Evaluation(config, workdir)
  results = {}
  for mode in modes:
    results[mode] = evaluation.run(mode)
    if results[mode] is None:
      break  # a job stopped early: so does the command
  return results


USAGE_ERRORS = (config_lib.ConfigError, data.DatasetError, param_dirs.ParamsError,
                pretrained.PretrainedError, checkpoints.CheckpointError, paths.PathError)


def command(config, workdir, modes):
  """The command's work: 0; 2 after one `error:` line for bad input; 1 after one for a
  training job that diverged (non-finite loss)."""
  try:
    evaluate(config, workdir, modes)
  except USAGE_ERRORS as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except loop.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  from mae_jax.train import distributed  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  pretrain.join_distributed()
  try:
    code = command(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.mode)
  except distributed.PEER_ERRORS as e:
    pretrain.exit_on_peer_failure(e)
  sys.exit(code)


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", cli.default_recipe("eval.py"), "Evaluation recipe.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Pretraining workdir; results go here.", required=True)
  flags.DEFINE_string("mode", None, f"Comma-separated: {', '.join(MODES)}.", required=True)
  pretrain.define_distributed_flags()


def flag_failure(error, argv):
  """One `error:` line naming the flag and what it expects; exit 2."""
  message = cli.flag_error(error, argv, recipe="configs/eval.py")
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parsing, with a bad flag (or --config.FIELD) as one `error:` line and exit 2."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    argv = flags.FLAGS(argv)
    flags.FLAGS.config  # the recipe file loads lazily; a failure to load it is a flag error
    return argv
  except Exception as e:  # pylint: disable=broad-except (absl, ml_collections, the recipe)
    flag_failure(e, argv)


def run():
  """`python -m mae_jax.evaluate`, the console script `mae-evaluate`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  try:  # without --config, the recipe and its overrides load right here
    define_flags()
  except Exception as e:  # pylint: disable=broad-except (absl, ml_collections, the recipe)
    flag_failure(e, sys.argv)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
