"""Weights & Biases beside TensorBoard (config.logging.wandb): the same scalars and pictures,
every launch of a workdir in one W&B run, read back from W&B's offline mode (no network)
with its own reader (`wandb leet inspect --json`); and a run that asks for W&B without the
package stops at once, naming the extra."""
import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import trainproc
from helpers import ROOT, TINY, config_flags, synthetic_config
from mae_jax import trainer
from mae_jax.train import config as config_lib
from mae_jax.train.logger import WANDB_ID_FILE, Logger

PROJECT = "mae-jax-test"


@pytest.fixture
def offline(tmp_path, monkeypatch):
  """W&B in offline mode, its files in tmp_path/wandb; returns that folder. W&B reads its
  settings once per process, so its state is torn down after the test."""
  import wandb  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  monkeypatch.setenv("WANDB_SILENT", "true")
  yield tmp_path / "wandb"
  wandb.teardown()


def offline_runs(wandb_dir):
  """The offline run directories, oldest first."""
  return sorted(glob.glob(os.path.join(str(wandb_dir), "offline-run-*")))


def records(run_dir):
  """The records of an offline run's .wandb log, as `wandb leet inspect --json` prints them."""
  out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", run_dir, "--json"],
                       capture_output=True, text=True, check=True, timeout=120).stdout
  return [json.loads(line) for line in out.splitlines() if line.strip()]


def history(run_dirs):
  """[(run directory, history item)] of the runs, in the order they were logged."""
  return [(run_dir, r["history"]["item"]) for run_dir in run_dirs for r in records(run_dir)
          if r["type"] == "history"]


def run_ids(run_dirs):
  return [r["run"]["run_id"] for run_dir in run_dirs for r in records(run_dir)
          if r["type"] == "run"]


def pixels(path_or_bytes):
  """The RGB pixels of a PNG file or its bytes (TensorBoard stores gray pictures as RGB)."""
  f = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
  return np.asarray(Image.open(f).convert("RGB"))


def test_the_logger_sends_scalars_and_images_to_one_wandb_run_per_workdir(tmp_path, offline):
  """Two launches of a workdir: each one's scalars at their steps, an image, and both in
  the W&B run whose id the workdir keeps."""
  image = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
  for steps in ((1, 2), (3,)):
    logger = Logger(str(tmp_path), 3, steps[0] - 1)
    logger.start_wandb(PROJECT, "pretrain", {"seed": 7})
    for step in steps:
      logger.scalars(step, {"loss": 1.0 / step})
    logger.image(steps[-1], "reconstructions", image)
    logger.close()
  runs = offline_runs(offline)
  run_id = (tmp_path / WANDB_ID_FILE).read_text()
  assert len(runs) == 2 and run_ids(runs) == [run_id, run_id]
  items = history(runs)
  assert {i["step"]: i["train/loss"] for _, i in items if "train/loss" in i} == {
      1: 1.0, 2: 0.5, 3: 1 / 3}
  shots = {i["step"]: os.path.join(d, "files", i["reconstructions.path"])
           for d, i in items if "reconstructions.path" in i}
  assert sorted(shots) == [2, 3]
  np.testing.assert_array_equal(pixels(shots[3]), image)
  config = [r["run"]["config"]["update"] for r in records(runs[0]) if r["type"] == "run"][0]
  assert config["seed"] == 7 and config["workdir"] == str(tmp_path)


def test_a_failing_wandb_call_is_one_line_and_tensorboard_goes_on(tmp_path, offline):
  """W&B's log raising (its service gone, say): one line, W&B off for the rest of the
  launch, and the scalars still in metrics.jsonl."""
  del offline
  out = io.StringIO()
  logger = Logger(str(tmp_path), 2, stream=out)
  logger.start_wandb(PROJECT, "pretrain", {})
  run, calls = logger.wandb.run, []

  def broken(record):
    calls.append(record)
    raise ConnectionError("the W&B service is gone")
  run.log = broken
  logger.scalars(1, {"loss": 1.0})
  logger.scalars(2, {"loss": 0.5})
  logger.close()
  run.finish()
  assert len(calls) == 1
  assert out.getvalue() == ("W&B logging failed at step 1 (ConnectionError: the W&B service "
                            "is gone); W&B is off for the rest of this launch, TensorBoard "
                            "goes on\n")
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]


@pytest.mark.slow
def test_a_run_and_its_resume_log_what_tensorboard_gets_to_wandb(tmp_path, offline):
  """A 6-step run with pictures every 2 steps, stopped at step 3 and resumed: W&B's offline
  run holds the training loss of every step as metrics.jsonl has it, the test MSEs of the
  end, and the pictures of steps 2, 4 and 6, pixel for pixel TensorBoard's; both launches
  log to the W&B run of the workdir."""
  workdir = tmp_path / "run"
  for stop in (3, None):
    config = synthetic_config(vis_every_steps=2, num_vis_images=2, stop_after_steps=stop)
    with config.unlocked():
      config.logging.wandb = PROJECT
    trainer.train_and_evaluate(config, str(workdir))
  runs = offline_runs(offline)
  assert run_ids(runs) == [(workdir / WANDB_ID_FILE).read_text()] * 2
  items = history(runs)
  jsonl = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  expected = {r["step"]: r["train/loss"] for r in jsonl if "train/loss" in r}
  assert sorted(expected) == [1, 2, 3, 4, 5, 6]
  assert {i["step"]: i["train/loss"] for _, i in items if "train/loss" in i} == expected
  summary = json.loads((workdir / "summary.json").read_text())
  assert [(i["step"], i["test/test_masked_mse"]) for _, i in items
          if "test/test_masked_mse" in i] == [(6, summary["test_masked_mse"])]
  shots = {i["step"]: os.path.join(d, "files", i["reconstructions.path"])
           for d, i in items if "reconstructions.path" in i}
  tensorboard = trainproc.images(workdir, "reconstructions")
  assert sorted(shots) == sorted(tensorboard) == [2, 4, 6]
  for step, path in shots.items():
    np.testing.assert_array_equal(pixels(path), pixels(tensorboard[step]))


def test_a_run_that_asks_for_wandb_without_the_package_stops_at_once(tmp_path):
  """`import wandb` blocked in the process (as where it is not installed): exit 2 with one
  line naming the field and the extra, before the run writes anything."""
  block = ("import sys; sys.modules['wandb'] = None; sys.argv[0] = 'train.py'; "
           "from mae_jax.tools import pretrain; pretrain.run()")
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-c", block, "--workdir", str(workdir), *config_flags(TINY),
       f"--config.logging.wandb={PROJECT}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: config.logging.wandb: '{PROJECT}' logs to Weights & Biases, but `import "
      "wandb` fails"), proc.stderr
  assert "pip install 'mae_jax[wandb]'" in lines[0]
  assert not (workdir / "checkpoints").exists() and not glob.glob(str(workdir / "events.*"))


def test_wandb_is_a_launch_field_and_must_name_a_project():
  """Turning W&B on or off when resuming is not a change of the run; an empty name is one
  line naming the field."""
  with_wandb = synthetic_config()
  with with_wandb.unlocked():
    with_wandb.logging.wandb = PROJECT
  saved = json.loads(synthetic_config().to_json_best_effort())
  assert config_lib.changed_fields(with_wandb, saved) == []
  with with_wandb.unlocked():
    with_wandb.logging.wandb = " "
  with pytest.raises(config_lib.ConfigError, match=r"^config\.logging\.wandb: ' ' must name"):
    config_lib.validate_logging(with_wandb)
