"""Reliability guarantees (docs/reliability.md), each checked the hard way: train.py killed
with real signals and restarted, checkpoints damaged on disk, runs driven to NaN, broken
image files, bad configs and flags, unwritable and full workdirs. Real Orbax, no mocks.

train.py subprocesses run on DEVICES simulated CPU devices and share a persistent XLA
compilation cache, so only the first run of a config pays for compiling it.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import trainproc
from helpers import ROOT, TINY, run_train_py, tiny_config
from trainproc import assert_trees_equal, load_state, train_records, wait_stopped
from mae_jax import data, trainer
from mae_jax.train import checkpoints, config as config_lib, workdirs

TRAIN_PY = os.path.join(ROOT, "train.py")
RECIPE = os.path.join(ROOT, "configs", "default.py")
DEVICES = 2
STEPS = 18
# The tiny model on generated data: seconds per run once compiled.
SMALL = {**TINY, "num_steps": STEPS, "checkpoint_every_steps": 3}


def small_config(overrides=None):
  return tiny_config({**SMALL, **(overrides or {})})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("xla_cache")
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
              JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def train_cmd(workdir, fields=SMALL, extra=()):
  return [sys.executable, TRAIN_PY, "--config", RECIPE, "--workdir", str(workdir),
          *[f"--config.{k}={v}" for k, v in fields.items()], *extra]


def run_train(workdir, env, fields=SMALL, extra=(), **popen):
  return subprocess.run(train_cmd(workdir, fields, extra), env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=400, **popen)


def last_line(text):
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


def all_finite(tree):
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def tree_digest(directory):
  """sha256 over every file's path, bytes and mode below `directory`."""
  h = hashlib.sha256()
  for d, dirs, files in sorted(os.walk(directory)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(d, name)
      h.update(path.encode() + oct(os.stat(path).st_mode).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  """An uninterrupted run of STEPS steps (checkpoints at 12, 15, 18 kept)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  proc = run_train(workdir, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert checkpoints.complete_steps(workdir / "checkpoints") == [12, 15, 18]
  return workdir


def copy_run(reference, tmp_path, keep_steps=None):
  """A copy of the reference workdir, with only `keep_steps` checkpoints if given."""
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  for step in checkpoints.complete_steps(workdir / "checkpoints"):
    if keep_steps is not None and step not in keep_steps:
      shutil.rmtree(workdir / "checkpoints" / str(step))
  return workdir


# --- 1, 2: SIGKILL anywhere, then exact resume; half-written checkpoints never taken ------


def start_train(workdir, env, log_path):
  """(train.py started on `workdir` with its output in `log_path`, the number of train
  records the workdir already held)."""
  return trainproc.start_watched(train_cmd(workdir), workdir, env, log_path)


def run_and_kill(workdir, env, log_path, when, what, timeout=300):
  """train.py on `workdir`, SIGKILLed at the first moment `when(snapshot)` holds
  (trainproc.run_and_kill)."""
  return trainproc.run_and_kill(train_cmd(workdir), workdir, env, log_path, when, what,
                                timeout)


def run_and_stop(workdir, env, log_path, after_step, signum, timeout=300):
  """train.py on `workdir`, sent `signum` after `after_step` logged steps
  (trainproc.run_and_stop)."""
  return trainproc.run_and_stop(train_cmd(workdir), workdir, env, log_path, after_step,
                                signum, timeout)


@pytest.mark.slow
def test_sigkill_at_three_points_resumes_exactly(reference, env, tmp_path):
  workdir = tmp_path / "run"
  # 1: between checkpoints, with logged steps after the last one that must be redone
  k1, _ = run_and_kill(workdir, env, tmp_path / "1.log", lambda s: bool(
      s.complete and s.logged > s.complete[-1] + 1 and not s.writing), "between checkpoints")
  # 2: while an async checkpoint write is in progress (its temporary directory exists)
  k2, _ = run_and_kill(workdir, env, tmp_path / "2.log", lambda s: bool(
      s.writing and s.writing[-1] > max(s.complete, default=0) and s.writing[-1] > k1.logged),
      "during a checkpoint write")
  half = k2.writing[-1]
  assert os.path.isdir(workdir / "checkpoints" / f"{half}{checkpoints.TMP_SUFFIX}")
  # 3: between checkpoints again, later. This launch checkpoints every 6 steps (a launch
  # field), so the steps after the resume run with no write in flight: at every 3 a loaded
  # machine's async write can span the whole interval, leaving no such moment to catch.
  k3, log3 = trainproc.run_and_kill(
      train_cmd(workdir, extra=["--config.checkpoint_every_steps=6"]), workdir, env,
      tmp_path / "3.log", lambda s: bool(
          s.complete and s.logged > s.complete[-1] and not s.writing and s.logged > half + 1),
      "between checkpoints, after resuming from the interrupted write")
  assert k1.logged < half < k3.logged  # three different steps
  # the half-written step was not taken: the run fell back to the previous one, and said so
  assert f"resuming from step {k2.complete[-1]}" in log3
  assert (f"checkpoint step {half} was interrupted mid-write ({half}{checkpoints.TMP_SUFFIX})"
          f": ignored, resuming from step {k2.complete[-1]}") in log3
  final = run_train(workdir, env)
  assert final.returncode == 0, final.stderr[-3000:]
  assert f"resuming from step {k3.complete[-1]}" in final.stdout

  assert_trees_equal(load_state(workdir, STEPS), load_state(reference, STEPS))  # bitwise
  ref = {r["step"]: r for r in train_records(reference)}
  assert sorted(ref) == list(range(1, STEPS + 1))
  steps_redone = 0
  for r in train_records(workdir):  # every record, redone steps included, is the reference's
    assert r == ref[r["step"]], r["step"]
    steps_redone += 1
  assert steps_redone > STEPS  # work lost to the kills was redone (and logged again)
  assert {r["step"] for r in train_records(workdir)} == set(ref)
  summary = json.loads((workdir / "summary.json").read_text())
  ref_summary = json.loads((reference / "summary.json").read_text())
  for key in ("test_masked_mse", "baseline_masked_mse", "final_train_loss"):
    assert summary[key] == ref_summary[key], key
  assert checkpoints.interrupted_steps(workdir / "checkpoints") == []  # cleaned up


@pytest.mark.slow
def test_stop_then_restart_on_a_complete_workdir_changes_nothing(reference, env, tmp_path):
  """A finished run restarted (e.g. by a scheduler) restores the last step and trains no
  further; its checkpoints stay byte for byte as they were."""
  workdir = copy_run(reference, tmp_path)
  before = tree_digest(workdir / "checkpoints" / str(STEPS))
  proc = run_train(workdir, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resuming from step {STEPS}" in proc.stdout
  assert tree_digest(workdir / "checkpoints" / str(STEPS)) == before
  assert len(train_records(workdir)) == STEPS  # no step trained again


# --- 3: SIGTERM and SIGINT save and exit 0; a second Ctrl-C exits at once -----------------


def stopped_at(output, signal_name):
  match = re.search(rf"stopped at step (\d+) \({signal_name}\); run again to resume", output)
  assert match, output[-3000:]
  return int(match.group(1))


@pytest.mark.slow
def test_sigterm_and_sigint_save_exit_0_and_resume_exactly(reference, env, tmp_path):
  workdir = tmp_path / "run"
  code, out = run_and_stop(workdir, env, tmp_path / "term.log", 4, signal.SIGTERM)
  assert code == 0, out[-3000:]
  assert "SIGTERM: saving a checkpoint at the next step, then stopping" in out
  first = stopped_at(out, "SIGTERM")
  assert 4 <= first < STEPS and checkpoints.complete_steps(workdir / "checkpoints")[-1] == first
  assert "Traceback" not in out

  code, out = run_and_stop(workdir, env, tmp_path / "int.log", 2, signal.SIGINT)
  assert code == 0, out[-3000:]
  assert f"resuming from step {first}" in out
  assert "SIGINT: saving a checkpoint at the next step all processes reach" in out
  second = stopped_at(out, "SIGINT")
  assert first < second < STEPS
  assert checkpoints.complete_steps(workdir / "checkpoints")[-1] == second
  assert "Traceback" not in out

  final = run_train(workdir, env)
  assert final.returncode == 0, final.stderr[-3000:]
  assert f"resuming from step {second}" in final.stdout
  assert_trees_equal(load_state(workdir, STEPS), load_state(reference, STEPS))  # bitwise
  ref = {r["step"]: r for r in train_records(reference)}
  records = train_records(workdir)
  assert {r["step"] for r in records} == set(ref)
  for r in records:  # the same loss sequence, steps redone after a stop included
    assert r == ref[r["step"]], r["step"]


# The loop of a run whose step never ends: only a second Ctrl-C can stop it at once.
ENDLESS_STEP = """
import time
from mae_jax.train import distributed
with distributed.GracefulStop() as stop:
  print("training", flush=True)
  while not stop.reached(1):
    time.sleep(0.01)
  print("stop requested: saving", flush=True)
  while True:
    time.sleep(0.01)
"""


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path):
  with open(tmp_path / "out", "w") as out:
    proc = subprocess.Popen([sys.executable, "-c", ENDLESS_STEP], cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    def wait_for(text):
      deadline = time.monotonic() + 120
      while text not in (tmp_path / "out").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out").read_text()
        time.sleep(0.01)

    wait_for("training")
    proc.send_signal(signal.SIGINT)
    wait_for("stop requested: saving")  # the first Ctrl-C asks for a save, ending nothing
    time.sleep(0.2)
    assert proc.poll() is None
    assert "Ctrl-C again to quit at once" in (tmp_path / "out").read_text()
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == -signal.SIGINT  # ended by the signal itself
    assert time.monotonic() - t0 < 5
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


# --- 4: non-finite steps --------------------------------------------------------------------


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(reference, env, tmp_path):
  """A huge (finite) lr: step 19's update gives huge but finite params (saved), step 20's
  loss overflows: the run stops there, exit 1, and no non-finite params reach disk."""
  workdir = copy_run(reference, tmp_path)
  proc = run_train(workdir, env, {**SMALL, "optim.base_lr": 1e35, "num_steps": 22,
                                  "checkpoint_every_steps": 1, "allow_config_change": True})
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = last_line(proc.stderr)
  assert line.startswith("error: non-finite loss, gradients or update at step 20 "), line
  assert f"last good checkpoint: step 19 in {workdir}/checkpoints;" in line, line
  assert "Traceback" not in proc.stderr
  assert checkpoints.complete_steps(workdir / "checkpoints") == [15, 18, 19]
  for step in (15, 18, 19):
    assert all_finite(load_state(workdir, step)), step
  assert np.max(np.abs(load_state(workdir, 19)["params"]["patch_embed"]["kernel"])) > 1e20


@pytest.mark.slow
def test_skip_nonfinite_drops_and_counts_updates(reference, env, tmp_path):
  """lr overflows to inf: every update after step 18 is non-finite. With skip_nonfinite the
  run finishes, each such step keeps params and optimizer state bitwise and is counted."""
  workdir = copy_run(reference, tmp_path)
  proc = run_train(workdir, env, {**SMALL, "optim.base_lr": 1e40, "num_steps": 21,
                                  "checkpoint_every_steps": 1, "skip_nonfinite": True,
                                  "allow_config_change": True})
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert np.isfinite(summary["test_masked_mse"]) and summary["skipped_steps"] == 3
  assert "skipped: 3 non-finite update(s) (skip_nonfinite)" in proc.stdout
  good = load_state(reference, STEPS)
  for k, step in enumerate((19, 20, 21), 1):
    saved = load_state(workdir, step)
    assert int(saved["step"]) == step and int(saved["skipped"]) == k
    assert_trees_equal(saved["params"], good["params"])
    assert_trees_equal(saved["opt_state"], good["opt_state"])
  records = {r["step"]: r for r in train_records(workdir)}
  assert [records[s]["train/nonfinite"] for s in (18, 19, 20, 21)] == [0, 1, 1, 1]
  assert [records[s]["train/skipped"] for s in (18, 19, 20, 21)] == [0, 1, 2, 3]


# --- 5: damaged checkpoints, conflicting configs --------------------------------------------


def largest_file(step_dir):
  files = [os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names]
  return max(files, key=os.path.getsize)


def truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.slow  # the reference run is a train.py subprocess
@pytest.mark.parametrize("damage,expected", [
    (lambda d: truncate(largest_file(d)), "is truncated"),
    (lambda d: flip_byte(largest_file(d)), "is corrupted"),
    (lambda d: os.remove(os.path.join(d, "default", "_METADATA")), "is missing"),
    (lambda d: truncate(os.path.join(d, checkpoints.MANIFEST)), "unreadable manifest"),
])
def test_damaged_checkpoint_is_named(reference, tmp_path, damage, expected):
  workdir = copy_run(reference, tmp_path)
  step_dir = str(workdir / "checkpoints" / str(STEPS))
  victim = largest_file(step_dir)
  if "missing" in expected:
    victim = os.path.join(step_dir, "default", "_METADATA")
  elif "manifest" in expected:
    victim = os.path.join(step_dir, checkpoints.MANIFEST)
  damage(step_dir)
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", keep=3, every_steps=3)
  target = jax.tree.map(np.asarray, load_state(reference, STEPS))
  with pytest.raises(checkpoints.CheckpointError) as e:
    ckpt.restore_latest(target)
  message = str(e.value)
  assert message.startswith(f"checkpoint step {STEPS} is damaged: {victim}"), message
  assert expected in message and "\n" not in message
  assert message.endswith(f"delete {step_dir} to resume from step 15")
  ckpt.close()
  shutil.rmtree(step_dir)  # as the message says: the previous checkpoint then restores
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", keep=3, every_steps=3)
  state, step = ckpt.restore_latest(jax.tree.map(np.asarray, load_state(reference, 15)))
  assert step == 15
  assert_trees_equal(jax.device_get(state), load_state(reference, 15))
  ckpt.close()


@pytest.mark.slow
def test_train_py_on_a_truncated_checkpoint_names_the_file(reference, env, tmp_path):
  workdir = copy_run(reference, tmp_path)
  victim = largest_file(workdir / "checkpoints" / str(STEPS))
  truncate(victim)
  proc = run_train(workdir, env)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = last_line(proc.stderr)
  assert line.startswith(f"error: checkpoint step {STEPS} is damaged: {victim} is truncated")
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_workdir_of_another_model_refuses_to_resume(reference, tmp_path):
  workdir = copy_run(reference, tmp_path)
  before = tree_digest(workdir)
  config = small_config({"model.width": 64, "model.decoder_depth": 2})
  with pytest.raises(config_lib.ConfigError) as e, no_compilation():
    trainer.train_and_evaluate(config, str(workdir))
  message = str(e.value)
  assert message.startswith("config.model.width: the checkpoints in"), message
  assert "model.width 32 there, 64 here; model.decoder_depth 1 there, 2 here" in message
  assert "model.depth" not in message.replace("model.decoder_depth", "")
  assert tree_digest(workdir) == before


# --- 6: bad image files ---------------------------------------------------------------------


def write_bad_folder(root):
  """root/train/{a,b}/ with gray, 16-bit, RGBA, palette, CMYK and odd-sized images, and four
  bad files: zero bytes, a broken link, garbage bytes, a truncated PNG."""
  rng = np.random.default_rng(0)
  a, b = root / "train" / "a", root / "train" / "b"
  a.mkdir(parents=True)
  b.mkdir()
  arrays = {
      "a/0_gray.png": rng.integers(0, 256, (9, 13), np.uint8),
      "a/1_wide.png": rng.integers(0, 65536, (11, 7), np.uint16),  # 16-bit gray
      "a/2_rgba.png": rng.integers(0, 256, (12, 12, 4), np.uint8),
      "b/0_rgb.png": rng.integers(0, 256, (17, 5, 3), np.uint8),
      "b/1_palette.png": rng.integers(0, 256, (6, 6, 3), np.uint8),
      "b/2_cmyk.jpg": rng.integers(0, 256, (8, 10, 3), np.uint8),
  }
  for name, array in arrays.items():
    image = Image.fromarray(array)
    if "palette" in name:
      image = image.convert("P")
    if "cmyk" in name:
      image = image.convert("CMYK")
    image.save(root / "train" / name)
  (a / "3_empty.png").write_bytes(b"")
  os.symlink(root / "nowhere.png", a / "4_link.png")
  (b / "3_garbage.jpg").write_bytes(rng.integers(0, 256, 500, np.uint8).tobytes())
  good = (b / "0_rgb.png").read_bytes()
  (b / "4_truncated.png").write_bytes(good[:len(good) // 2])
  return arrays


def folder_config(root, **fields):
  defaults = dict(name="folder", data_dir=str(root), manual_dir=None, channels=3,
                  image_size=8, strict=False)
  return ml_collections.ConfigDict({**defaults, **fields})


def test_folder_bad_files_are_skipped_and_counted(tmp_path):
  arrays = write_bad_folder(tmp_path)
  (tmp_path / "test").mkdir()  # a test folder of its own: the train split is all of train/
  source = data.load_source(folder_config(tmp_path), "train")
  names = [os.path.relpath(p, tmp_path / "train") for p in source.paths]
  assert names == ["a/0_gray.png", "a/1_wide.png", "a/2_rgba.png", "b/0_rgb.png",
                   "b/1_palette.png", "b/2_cmyk.jpg", "b/3_garbage.jpg", "b/4_truncated.png"]
  assert sorted(os.path.basename(p) for p in source.skipped) == ["3_empty.png", "4_link.png"]
  images = [source[i]["image"] for i in range(len(source))]
  # the two files that do not decode are replaced by the next image that does (wrapping)
  assert sorted(os.path.basename(p) for p in source.skipped) == [
      "3_empty.png", "3_garbage.jpg", "4_link.png", "4_truncated.png"]
  assert "cannot identify image file" in source.skipped[str(tmp_path / "train/b/3_garbage.jpg")]
  np.testing.assert_array_equal(images[6], images[0])  # garbage, truncated -> a/0_gray
  np.testing.assert_array_equal(images[7], images[0])
  assert [source[i]["label"] for i in range(len(source))] == [0, 0, 0, 1, 1, 1, 0, 0]
  # conversions: every image RGB uint8, at its own size
  gray = arrays["a/0_gray.png"]
  np.testing.assert_array_equal(images[0], np.repeat(gray[..., None], 3, -1))
  wide = np.round(arrays["a/1_wide.png"] / 257).astype(np.uint8)  # scaled, not clipped
  np.testing.assert_array_equal(images[1], np.repeat(wide[..., None], 3, -1))
  assert images[1].max() > 200 and len(np.unique(images[1])) > 50
  np.testing.assert_array_equal(images[2], arrays["a/2_rgba.png"][..., :3])
  np.testing.assert_array_equal(images[3], arrays["b/0_rgb.png"])
  palette = Image.open(tmp_path / "train/b/1_palette.png").convert("RGB")
  np.testing.assert_array_equal(images[4], np.asarray(palette))
  assert images[5].shape == (8, 10, 3) and images[5].dtype == np.uint8
  # and odd sizes batch to the configured size
  batches = data.make_train_batches(source, image_size=8, global_batch_size=4, seed=0,
                                    augment="crop_flip")
  assert next(batches)["image"].shape == (4, 8, 8, 3)
  gray_source = data.load_source(folder_config(tmp_path, channels=1), "train")
  np.testing.assert_array_equal(gray_source[1]["image"][..., 0], wide)


def test_folder_strict_names_the_bad_file(tmp_path):
  write_bad_folder(tmp_path)
  (tmp_path / "test").mkdir()  # a test folder of its own: the train split is all of train/
  with pytest.raises(data.DatasetError, match=r"3_empty.png: cannot read image: empty file"):
    data.load_source(folder_config(tmp_path, strict=True), "train")
  os.remove(tmp_path / "train/a/3_empty.png")
  os.remove(tmp_path / "train/a/4_link.png")
  source = data.load_source(folder_config(tmp_path, strict=True), "train")
  assert source[0]["image"].shape == (9, 13, 3)
  with pytest.raises(data.DatasetError, match=r"3_garbage.jpg: cannot decode image: .*strict"):
    source[6]


def test_empty_dataset_or_split_is_a_clear_error(tmp_path):
  (tmp_path / "train" / "a").mkdir(parents=True)
  (tmp_path / "test").mkdir()
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "train" / "a" / "x.png")
  with pytest.raises(data.DatasetError, match=r"no images .* in .*test"):
    data.load_source(folder_config(tmp_path), "test")
  (tmp_path / "test" / "empty.png").write_bytes(b"")
  with pytest.raises(data.DatasetError, match=r"none of the 1 image files in .*test can be "
                     r"read"):
    data.load_source(folder_config(tmp_path), "test")
  os.remove(tmp_path / "test" / "empty.png")
  (tmp_path / "test" / "junk.png").write_bytes(b"not a png")
  source = data.load_source(folder_config(tmp_path), "test")
  with pytest.raises(data.DatasetError, match=r"none of the 1 images .*junk.png.* can be "
                     r"decoded"):
    source[0]


# --- 7: bad configs and flags ---------------------------------------------------------------


class no_compilation:
  """Asserts that no XLA compilation happens inside the block (raising or not)."""

  def __enter__(self):
    self.compiled = []
    self.listener = lambda name, *a, **k: self.compiled.append(name) if name.endswith(
        "backend_compile_duration") else None
    jax.monitoring.register_event_duration_secs_listener(self.listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self.listener)
    assert not self.compiled, "compiled before failing"
    return False


BAD_CONFIGS = [  # (overrides, the field the one line must name, what it must say)
    ({"model.variant": "XL/16", "model.width": None}, "model.variant", "expected SIZE/PATCH"),
    ({"model.patch_size": 0}, "model.patch_size", "must be an int >= 1"),
    ({"model.num_heads": 0}, "model.num_heads", "must be an int >= 1"),
    ({"model.num_heads": 3}, "model.num_heads", "does not divide width 32"),
    ({"model.width": 30, "model.num_heads": 1}, "model.width", "divisible by 4"),
    ({"model.decoder_depth": 0}, "model.decoder_depth", "must be an int >= 1"),
    ({"model.mlp_ratio": 0.0}, "model.mlp_ratio", "must be a finite number > 0"),
    ({"model.mask_ratio": 1.0}, "model.mask_ratio", "must be in (0, 1)"),
    ({"model.mask_ratio": 0.99}, "model.mask_ratio", "leaves no visible patch out of 16"),
    ({"model.dtype": "float16"}, "model.dtype", "valid values: bfloat16, float32"),
    ({"model.remat": "sometimes"}, "model.remat", "valid values"),
    ({"data.image_size": 18}, "data.image_size", "multiple of the patch size 4"),
    ({"data.channels": 2}, "data.channels", "valid values: 1, 3"),
    ({"data.augment": "rotate"}, "data.augment", "valid values: none, crop, crop_flip"),
    ({"data.crop_scale": (0.5,)}, "data.crop_scale", "must be (min, max)"),
    ({"data.crop_scale": (0.9, 0.2)}, "data.crop_scale", "0 < min <= max <= 1"),
    ({"data.num_workers": -1}, "data.num_workers", "must be an int >= 0"),
    ({"data.name": ""}, "data.name", "must name a dataset"),
    ({"data.synthetic_size": 0}, "data.synthetic_size", "must be an int >= 1"),
    ({"optim.base_lr": 0.0}, "optim.base_lr", "must be a finite number > 0"),
    ({"optim.base_lr": float("nan")}, "optim.base_lr", "must be a finite number > 0"),
    ({"optim.weight_decay": -0.1}, "optim.weight_decay", "must be a finite number >= 0"),
    ({"optim.b2": 1.0}, "optim.b2", "must be a finite number in [0, 1)"),
    ({"optim.eps": 0.0}, "optim.eps", "must be a finite number > 0"),
    ({"optim.grad_clip": -1.0}, "optim.grad_clip", "> 0 (or None)"),
    ({"optim.warmup_steps": -1}, "optim.warmup_steps", "must be an int >= 0 (or None)"),
    ({"num_steps": 0}, "num_steps", "must be an int >= 1"),
    ({"num_steps": None, "num_epochs": 0.0}, "num_epochs", "must be a positive number"),
    ({"checkpoint_every_steps": 0}, "checkpoint_every_steps", "must be an int >= 1"),
    ({"keep_checkpoints": 0}, "keep_checkpoints", "must be an int >= 1"),
    ({"batch_size": 12}, "batch_size", "multiple of the 8 data-parallel devices"),
    ({"batch_size": 128}, "batch_size", "larger than the 64 training images"),
    ({"eval_batch_size": 0}, "eval_batch_size", "positive multiple"),
    ({"mesh.data": 3}, "mesh", "does not cover the 8 devices"),
    ({"grad_accum_steps": 3}, "grad_accum_steps", "not divisible into 3 micro-batches"),
]


@pytest.mark.parametrize("overrides,field,expected", BAD_CONFIGS,
                         ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD_CONFIGS)])
def test_bad_config_is_one_line_before_anything_compiles(tmp_path, overrides, field,
                                                         expected):
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError) as e, no_compilation():
    trainer.train_and_evaluate(small_config(overrides), str(workdir))
  message = str(e.value)
  assert re.match(rf"config\.{re.escape(field)}(: |=)", message), message
  assert expected in message and "\n" not in message, message
  assert not workdir.exists()  # nothing written either


@pytest.mark.parametrize("flags,expected", [
    (["--config.batch_size=abc"], "error: config.batch_size: 'abc' is not valid; expected "
     "an int"),
    (["--config.model.widht=64"], "error: config.model.widht: unknown field 'widht'; did "
     "you mean 'width'?"),
    (["--config.optim.base_lr=fast"], "error: config.optim.base_lr: 'fast' is not valid; "
     "expected a float"),
    (["--config.model.mask_ratio=1.5"], "error: config.model.mask_ratio: 1.5 must be in "
     "(0, 1)"),
    (["--config=configs/no_such_recipe.py"], "error: --config: cannot load the recipe: "
     "[Errno 2] No such file or directory"),
    (["--config.model=vit"], "error: config.model: 'vit' is not valid; it is a group of "
     "fields"),
    (["--config={tmp}/raises.py"], "error: a recipe file fails to load: {tmp}/raises.py:3: "
     "ValueError: no such size"),
    (["--config={tmp}/typo.py"], "error: a recipe file fails to load: {tmp}/typo.py:1: "
     "NameError: name 'hi' is not defined"),
    (["--no_such_flag=1"], "error: Unknown command line flag 'no_such_flag'"),
    (["--num_processes=two"], "error: flag --num_processes=two: invalid literal for int()"),
    (["--num_processes=2", "--process_id=2"], "error: --process_id=2: must be in [0, "
     "--num_processes=2)"),
    (["--coordinator_address=localhost"], "error: --coordinator_address=localhost: "
     "expected host:port"),
    (["--heartbeat_timeout=0"], "error: --heartbeat_timeout=0: must be >= 1 second"),
])
def test_train_py_bad_flag_is_one_line_exit_2(tmp_path, capsys, monkeypatch, flags, expected):
  """train.py's flag parsing and checks in-process, from the repository root as a user runs
  it (the default recipe path is relative)."""
  monkeypatch.chdir(ROOT)
  (tmp_path / "raises.py").write_text("def get_config():\n  size = 'XXL'\n"
                                      "  raise ValueError('no such size')\n")
  (tmp_path / "typo.py").write_text("hi\n")
  flags = [f.format(tmp=tmp_path) for f in flags]
  expected = expected.format(tmp=tmp_path)
  code = run_train_py(["--workdir", str(tmp_path / "run"), *flags])
  stderr = capsys.readouterr().err
  assert code == 2, stderr[-2000:]
  assert stderr.strip().startswith(expected), stderr[-2000:]
  assert len(stderr.strip().splitlines()) == 1, stderr[-2000:]  # that line only
  assert not (tmp_path / "run").exists()


# --- 8: unwritable or full workdir ----------------------------------------------------------


def test_workdir_that_is_a_file_fails_before_training(tmp_path):
  (tmp_path / "taken").write_text("a file, not a directory")
  for workdir, says in ((tmp_path / "taken", "--workdir .*/taken: is a file; expected a "
                         "directory"), (tmp_path / "taken" / "run", "cannot write checkpoints "
                                        "there .Not a directory")):
    with pytest.raises(checkpoints.CheckpointError, match=says), no_compilation():
      trainer.train_and_evaluate(small_config(), str(workdir))
  assert (tmp_path / "taken").read_text() == "a file, not a directory"


def make_read_only(root):
  """Make the tree at `root` unwritable: modes 0444/0555 and, as root (whom modes do not
  bind), the immutable attribute. Returns an undo function; skips where neither binds."""
  for d, _, files in os.walk(root):
    for name in files:
      os.chmod(os.path.join(d, name), 0o444)
    os.chmod(d, 0o555)
  immutable = os.geteuid() == 0 and subprocess.run(
      ["chattr", "-R", "+i", str(root)], capture_output=True).returncode == 0

  def undo():
    if immutable:
      subprocess.run(["chattr", "-R", "-i", str(root)], check=True)
    for d, _, _ in os.walk(root):
      os.chmod(d, 0o755)

  try:
    open(os.path.join(root, "probe"), "w").close()
  except OSError:
    return undo
  undo()
  pytest.skip("cannot make a directory unwritable here (root without chattr +i)")


@pytest.mark.slow
def test_read_only_workdir_fails_before_training_and_keeps_its_checkpoints(reference,
                                                                           tmp_path):
  workdir = copy_run(reference, tmp_path)
  undo = make_read_only(workdir)
  try:
    before = tree_digest(workdir)
    with pytest.raises(checkpoints.CheckpointError) as e, no_compilation():
      trainer.train_and_evaluate(small_config(), str(workdir))
    assert re.fullmatch(rf"{workdir}/checkpoints: cannot write checkpoints there "
                        r"\((Permission denied|Operation not permitted)\); choose another "
                        r"--workdir, or fix its permissions or free space", str(e.value)), e.value
    assert tree_digest(workdir) == before
  finally:
    undo()


@pytest.mark.slow
def test_full_disk_mid_run_is_a_clear_error_and_keeps_the_last_checkpoint(reference, env,
                                                                          tmp_path):
  """Files may grow to 64 KiB only (RLIMIT_FSIZE, as a full disk would stop them): the
  checkpoint at step 15 cannot be written; step 12 stays complete and intact."""
  workdir = copy_run(reference, tmp_path, keep_steps=[12])
  before = tree_digest(workdir / "checkpoints" / "12")
  small_files = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
                 "(64 * 1024, resource.RLIM_INFINITY)); os.execv(sys.argv[1], sys.argv[1:])")
  proc = subprocess.run([sys.executable, "-c", small_files, *train_cmd(workdir)], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = last_line(proc.stderr)
  assert line.startswith(f"error: cannot write a checkpoint in {workdir}/checkpoints: "), line
  assert "File too large" in line and line.endswith("the last complete checkpoint, step 12, "
                                                    "is intact"), line
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, (
      proc.stderr[-3000:])  # the failed save's late writes and Orbax's log: one line
  assert "resuming from step 12" in proc.stdout
  assert checkpoints.complete_steps(workdir / "checkpoints") == [12]
  assert tree_digest(workdir / "checkpoints" / "12") == before
  assert checkpoints.verify(str(workdir / "checkpoints" / "12"), 12, "")  # manifest holds
  assert_trees_equal(load_state(workdir, 12), load_state(reference, 12))


def test_disk_space_is_checked_before_training(tmp_path):
  free = shutil.disk_usage(tmp_path).free
  checkpoints.check_space(str(tmp_path), free // 2)
  with pytest.raises(checkpoints.CheckpointError, match=r"MiB free, but one checkpoint of this "
                     r"run needs"):
    checkpoints.check_space(str(tmp_path), free + 2**40)


# --- 9: one run per workdir -------------------------------------------------------------


def wait_for(predicate, proc, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    assert proc.poll() is None, f"exited {proc.returncode} first"
    time.sleep(0.01)
  pytest.fail("timed out")


def lock_holder(workdir):
  try:
    return json.loads((workdir / workdirs.LOCK_FILE).read_text())
  except (OSError, ValueError):
    return None


@pytest.mark.slow
def test_one_run_per_workdir_and_a_dead_runs_lock_is_taken_over(reference, env, tmp_path):
  """A live run holds WORKDIR/run.lock: a second launch exits 2 naming it and changes
  nothing; once the holder is SIGKILLed, the next launch takes the lock over, says whose
  it was, finishes, and leaves no lock behind."""
  workdir = copy_run(reference, tmp_path, keep_steps=[12])
  first, _ = start_train(workdir, env, tmp_path / "first.log")
  try:
    wait_for(lambda: (lock_holder(workdir) or {}).get("pid") == first.pid, first)
    first.send_signal(signal.SIGSTOP)  # alive and holding the lock, writing nothing
    wait_stopped(first.pid)
    holder = lock_holder(workdir)
    assert holder["host"] == socket.gethostname()
    before = tree_digest(workdir)
    second = run_train(workdir, env)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    assert last_line(second.stderr) == (
        f"error: {workdir} is in use by another run (pid {first.pid} on host "
        f"{holder['host']}, started {holder['started']}; lock {workdir}/run.lock): wait for "
        "it to finish, stop it, or choose another --workdir")
    assert tree_digest(workdir) == before  # the live run's files untouched
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert lock_holder(workdir)["pid"] == first.pid  # left behind by the killed run
  third = run_train(workdir, env)
  assert third.returncode == 0, third.stderr[-3000:]
  assert (f"took over {workdir}/run.lock, left by a run that is no longer running (pid "
          f"{first.pid} on host {holder['host']}") in third.stdout
  assert not (workdir / workdirs.LOCK_FILE).exists()
  assert checkpoints.complete_steps(workdir / "checkpoints")[-1] == STEPS
  assert_trees_equal(load_state(workdir, STEPS), load_state(reference, STEPS))


def test_workdir_lock_in_process(tmp_path):
  """Held: a second holder in another process is refused; released: the file is gone and
  the workdir free again; a lock file whose holder died is taken over, naming it."""
  lock = workdirs.WorkdirLock(tmp_path).acquire()
  probe = ("import sys; from mae_jax.train import checkpoints, workdirs\n"
           "try:\n  workdirs.WorkdirLock(sys.argv[1]).acquire()\n"
           "except checkpoints.CheckpointError as e:\n  print(e); sys.exit(2)\n")
  other = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
  assert other.returncode == 2 and f"pid {os.getpid()} on host" in other.stdout, other
  lock.release()
  assert not (tmp_path / workdirs.LOCK_FILE).exists()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  (tmp_path / workdirs.LOCK_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "then"}))
  with workdirs.WorkdirLock(tmp_path) as again:
    assert f"pid {int(dead.stdout)} on host" in again.note
    assert lock_holder(tmp_path)["pid"] == os.getpid()
  assert not (tmp_path / workdirs.LOCK_FILE).exists()


# --- 10: resuming with a changed config ---------------------------------------------------


@pytest.mark.slow
def test_resume_with_changed_config_is_refused_listing_the_fields(reference, tmp_path):
  """Another seed, learning rate and dataset size: refused in one line naming each field
  with both values, before anything compiles, the workdir unchanged; fields that only
  steer a launch (stop_after_steps, log_every_steps, the mesh) are not changes."""
  workdir = copy_run(reference, tmp_path)
  before = tree_digest(workdir)
  changed = small_config({"seed": 1, "optim.base_lr": 3e-4, "data.synthetic_size": 128,
                          "stop_after_steps": 1, "log_every_steps": 5, "mesh.fsdp": 2})
  with pytest.raises(config_lib.ConfigError) as e, no_compilation():
    trainer.train_and_evaluate(changed, str(workdir))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"config: the run in {workdir} was launched with other values "
                            "(data.synthetic_size 64 there, 128 here; optim.base_lr 0.003 "
                            "there, 0.0003 here; seed 0 there, 1 here); "), message
  assert "--config.allow_config_change=True" in message
  assert tree_digest(workdir) == before
  same = small_config({"stop_after_steps": 1, "log_every_steps": 5, "mesh.fsdp": 2})
  assert config_lib.changed_fields(same, workdirs.load_config_dict(workdir)) == []


@pytest.mark.slow
def test_allowed_config_change_keeps_every_launchs_config(reference, tmp_path):
  """With allow_config_change the run goes on with the new values and says which changed;
  config.json (the first launch's) is never overwritten, each launch's config is kept with
  the step it started from, and the next resume compares with the latest launch."""
  workdir = copy_run(reference, tmp_path)
  first = (workdir / "config.json").read_bytes()
  changed = {"seed": 1, "num_steps": STEPS + 2, "allow_config_change": True}
  trainer.train_and_evaluate(small_config(changed), str(workdir))
  assert (workdir / "config.json").read_bytes() == first
  history = [os.path.basename(p) for p in workdirs.launch_configs(workdir)]
  assert history == ["launch-001-step-0.json", f"launch-002-step-{STEPS}.json"]
  second = json.loads((workdir / "configs" / history[1]).read_text())
  assert (second["seed"], second["num_steps"]) == (1, STEPS + 2)
  assert json.loads(first)["seed"] == 0
  log = (workdir / "log.txt").read_text() if (workdir / "log.txt").exists() else ""
  again = small_config({"seed": 1, "num_steps": STEPS + 2})  # the latest launch's values
  state, _ = trainer.train_and_evaluate(again, str(workdir))  # not refused: nothing changed
  assert int(state.step) == STEPS + 2
  assert len(workdirs.launch_configs(workdir)) == 3
  del log


# --- 11: restored state checked finite ------------------------------------------------------


def test_nonfinite_restored_state_is_a_damaged_checkpoint(tmp_path):
  """A step without a manifest whose optimizer state restores with a NaN (what a bit flip
  in an exponent gives) is reported as damaged, naming the leaf and the fallback step,
  instead of being trained on."""
  import jax.numpy as jnp
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), keep=3, every_steps=1,
                                 async_save=False)
  good = {"params": {"w": jnp.ones(4)}, "opt_state": {"mu": jnp.zeros(4)},
          "step": jnp.int32(1)}
  ckpt.save(1, good)
  ckpt.save(2, dict(good, opt_state={"mu": jnp.array([0.0, 0.0, jnp.nan, 0.0])}))
  ckpt.wait()
  (tmp_path / "c" / "2" / checkpoints.MANIFEST).unlink()
  with pytest.raises(checkpoints.CheckpointError) as e:
    ckpt.restore_latest(good)
  assert str(e.value) == (
      f"checkpoint step 2 is damaged ({tmp_path}/c/2): NaN or infinite values in "
      f"opt_state/mu; delete {tmp_path}/c/2 to resume from step 1")
  ckpt.close()
  shutil.rmtree(tmp_path / "c" / "2")  # as the message says; the next launch resumes
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), keep=3, every_steps=1)
  state, step = ckpt.restore_latest(good)
  assert step == 1 and all_finite(jax.device_get(state))
  ckpt.close()


def test_smoke_says_what_it_replaced():
  run = trainer.build_run(small_config({"smoke": True, "num_steps": 7}), "unused")
  assert run.config.num_steps == 4
  note = run.notes[0]
  assert note.startswith("smoke=True replaced ") and "num_steps 7 -> 4" in note, note
  assert "model.width 32" not in note  # unchanged fields are not listed
  # fields given on the command line keep their values
  run = trainer.build_run(small_config({"smoke": True, "num_steps": 7, "batch_size": 32}),
                          "unused", explicit=("num_steps", "batch_size", "seed"))
  assert (run.config.num_steps, run.config.batch_size, run.config.model.depth) == (7, 32, 1)
  assert run.notes[0].endswith("; kept the command line's batch_size, num_steps"), run.notes


@pytest.mark.slow
def test_skipped_images_are_counted_in_the_summary(tmp_path, capsys):
  """Unreadable image files: left out of the banner's count, and counted per split in
  summary.json (those found at listing and those that failed to decode during the run)."""
  write_bad_folder(tmp_path / "images")
  shutil.copytree(tmp_path / "images" / "train", tmp_path / "images" / "test", symlinks=True)
  config = small_config({"data.name": "folder", "data.data_dir": str(tmp_path / "images"),
                         "data.channels": 3, "data.image_size": 8, "batch_size": 8,
                         "eval_batch_size": 8, "num_steps": 2, "checkpoint_every_steps": 2})
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "(8 train images, 2 unreadable skipped)" in out, out
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  # 2 found at listing + 2 that do not decode: every image was read in 2 steps of 8
  assert summary["skipped_images"] == {"train": 4, "test": 4}
  assert summary["skipped_steps"] == 0
  assert "skipped: 0 non-finite update(s) (skip_nonfinite); 4 train and 4 test" in out


@pytest.mark.slow
def test_missing_config_json_never_leads_to_deleting_checkpoints(reference, tmp_path):
  """Checkpoints of another model in a workdir without config.json: the refusal says the
  config is unknown and advises no deletion (the checkpoints are not damaged)."""
  workdir = copy_run(reference, tmp_path, keep_steps=[15, 18])
  (workdir / "config.json").unlink()
  shutil.rmtree(workdir / "configs")
  before = tree_digest(workdir / "checkpoints")
  with pytest.raises(checkpoints.CheckpointError) as e:
    trainer.train_and_evaluate(small_config({"model.width": 64}), str(workdir))
  message = str(e.value)
  assert message.startswith("checkpoint step 18 cannot be restored: "), message
  assert message.endswith(f"{workdir} has no config.json to tell whether the checkpoint is "
                          "damaged or of another config: resume with the config of the run "
                          "that wrote it, or use a new --workdir"), message
  assert "delete" not in message
  assert tree_digest(workdir / "checkpoints") == before
