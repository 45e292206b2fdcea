"""Watching a run learn: reconstructions of fixed test images in TensorBoard while it
trains, labelled pictures, only real images at the end, and a failing picture that never
stops the run."""
import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

import trainproc
from helpers import synthetic_config, write_pattern_folder
from mae_jax import trainer
from mae_jax.evaluation import pictures, watch
from mae_jax.train.logger import Logger


def png(data):
  return np.asarray(Image.open(io.BytesIO(data)))


def test_pictures_come_every_n_steps_of_the_same_images_without_recompiling(tmp_path):
  """Three calls of the monitor: three pictures in TensorBoard, one compiled program, the
  same images in the first row, masks drawn the same way (same second row), and the
  prediction rows those of each state."""
  run = trainer.build_run(synthetic_config(num_vis_images=4), str(tmp_path))
  monitor = watch.ReconstructionMonitor(run, every_steps=2)
  logger = Logger(str(tmp_path), 6)
  states = [run.init(jax.random.key(seed)) for seed in (0, 0, 1)]
  for step, state in zip((2, 4, 6), states):
    monitor(step, state, logger)
  monitor.close(logger, wall_seconds=10.0)
  logger.close()
  assert monitor.fn._cache_size() == 1  # compiled once, for every call  # pylint: disable=protected-access
  shots = {s: png(b)[pictures.TITLE_HEIGHT:]  # the grid below the title (which has the step)
           for s, b in trainproc.images(tmp_path, "reconstructions").items()}
  assert sorted(shots) == [2, 4, 6]
  np.testing.assert_array_equal(shots[2], shots[4])  # same images, masks and params
  assert not np.array_equal(shots[4], shots[6])  # other params: other predictions
  rows = {s: np.array_split(shot, 4) for s, shot in shots.items()}
  np.testing.assert_array_equal(rows[2][0], rows[6][0])  # the originals do not change
  np.testing.assert_array_equal(rows[2][1], rows[6][1])  # nor their masks
  assert monitor.drawn == 3


@pytest.mark.slow
def test_a_run_draws_its_pictures_and_ends_with_only_real_images(tmp_path, capsys):
  """A 6-step run with vis_every_steps=2 on a folder of 4 test images and num_vis_images
  8: pictures at steps 2, 4, 6, the cost logged, the test MSEs in TensorBoard, and a
  final reconstructions.png of the 4 real images (not 4 black columns more)."""
  write_pattern_folder(tmp_path / "data", per_class={"train": 8, "test": 1})
  config = synthetic_config(vis_every_steps=2, num_vis_images=8, eval_batch_size=16)
  with config.unlocked():
    config.data.update(name="folder", data_dir=str(tmp_path / "data"), channels=1)
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "at 16 px, 1 channel(s)" in out  # the start line names what it trains at
  assert "reconstruction pictures: 3 in TensorBoard" in out
  assert sorted(trainproc.images(tmp_path / "run", "reconstructions")) == [2, 4, 6]
  assert set(trainproc.scalars(tmp_path / "run", "test/test_masked_mse")) == {6}
  end = np.asarray(Image.open(tmp_path / "run" / "reconstructions.png"))
  four = pictures.reconstruction_picture(
      np.zeros((4, 16, 16, 1), np.uint8), np.zeros((4, 16, 16)), np.zeros((4, 16)), 4,
      title="x")
  assert end.shape[:2] == np.asarray(four).shape[:2]
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert np.isfinite(summary["test_masked_mse"])


@pytest.mark.slow
def test_a_failing_picture_never_stops_the_run(tmp_path, capsys, monkeypatch):
  def broken(*args, **kwargs):
    raise OSError("no space left for pictures")
  monkeypatch.setattr(pictures, "reconstruction_picture", broken)
  state, results = trainer.train_and_evaluate(
      synthetic_config(vis_every_steps=3, num_vis_images=2), str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert results is not None and int(state.step) == 6
  assert ("reconstruction picture at step 3 failed (OSError: no space left for pictures); "
          "training goes on") in out
  assert trainproc.images(tmp_path / "run", "reconstructions") == {}
  assert "reconstructions: not drawn (OSError: no space left for pictures)" in out
  assert (tmp_path / "run" / "summary.json").exists()
