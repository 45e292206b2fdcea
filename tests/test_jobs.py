"""Fine-tuning, the linear probe and the conv baseline run on the one loop (mae_jax.train.loop)
with pretraining's guarantees: `python -m mae_jax.evaluate` SIGKILLed at random steps and
during a checkpoint write resumes to the bitwise result of an uninterrupted run; SIGTERM
saves and stops; a resume with another encoder or other classes, or in another kind of
job's workdir, is one line and exit 2; a killed sweep point resumes its fine-tuning."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import trainproc
from helpers import (ROOT, pretrain_on_patterns, run_evaluate, run_train_py,
                     write_pattern_folder)
from mae_jax.evaluation import finetune
from mae_jax.train import checkpoints

SEED = 20261207  # picks the kill steps; printed by the test on failure
EVAL = ["--config.eval_batch_size=64", "--config.keep_checkpoints=2"]
FINETUNE = ["--config.finetune.batch_size=32", "--config.finetune.num_steps=30",
            "--config.finetune.checkpoint_every_steps=3", "--config.finetune.log_every_steps=1",
            "--config.finetune.eval_every_epochs=2", "--config.finetune.optim.warmup_steps=3"]
PROBE = ["--config.linprobe.batch_size=32", "--config.linprobe.num_steps=240",
         "--config.linprobe.checkpoint_every_steps=8", "--config.linprobe.log_every_steps=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A pretraining workdir on the 4-class pattern folder (checkpoints at steps 2 and 4)."""
  return pretrain_on_patterns(tmp_path_factory.mktemp("jobs"), checkpoint_every_steps=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=2",
              JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def evaluate_cmd(workdir, mode, flags):
  return [sys.executable, "-m", "mae_jax.evaluate", "--workdir", str(workdir), "--mode", mode,
          *EVAL, *flags]


def copy_pretraining(pretrained, where):
  shutil.copytree(pretrained, where)
  return where


def run_to_end(cmd, env):
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def kill_twice_then_finish(cmd, job_dir, env, logs, total):
  """SIGKILL `cmd` at a random step between checkpoints, then again while a checkpoint is
  being written, then run it to the end; returns the last run's output."""
  rng = np.random.default_rng(SEED)
  target = int(rng.integers(4, total // 2))
  k1, _ = trainproc.run_and_kill(cmd, job_dir, env, logs / "1.log", lambda s: bool(
      s.complete and s.logged >= target and s.logged > s.complete[-1] and not s.writing),
      f"step {target} or later, between checkpoints (seed {SEED})")
  k2, _ = trainproc.run_and_kill(cmd, job_dir, env, logs / "2.log", lambda s: bool(
      s.writing and s.writing[-1] > max(s.complete, default=0) and s.writing[-1] > k1.logged),
      f"during a checkpoint write after step {k1.logged}")
  half = k2.writing[-1]
  assert os.path.isdir(job_dir / "checkpoints" / f"{half}{checkpoints.TMP_SUFFIX}")
  out = run_to_end(cmd, env)
  assert f"resuming from step {k2.complete[-1]}" in out  # not the half-written step
  assert k1.logged < half < total
  return out


def saved_state(job_dir, step):
  return trainproc.load_state(job_dir, step)


@pytest.mark.slow
def test_finetune_killed_twice_resumes_to_the_uninterrupted_result(pretrained, env,
                                                                   tmp_path):
  reference = copy_pretraining(pretrained, tmp_path / "reference")
  run_to_end(evaluate_cmd(reference, "finetune", FINETUNE), env)
  killed = copy_pretraining(pretrained, tmp_path / "killed")
  kill_twice_then_finish(evaluate_cmd(killed, "finetune", FINETUNE), killed / "finetune",
                         env, tmp_path, total=30)

  _, ref_params = finetune.load(reference / "finetune")
  _, params = finetune.load(killed / "finetune")
  trainproc.assert_trees_equal(params, ref_params)  # bitwise
  ref, got = (json.loads((d / "eval_finetune.json").read_text()) for d in (reference, killed))
  assert got["top1"] == ref["top1"] and got["history"] == ref["history"]
  assert [h["step"] for h in got["history"]] == [8, 16, 24, 30]
  assert got["resumed_from"] > 0 and ref["resumed_from"] is None
  records = {r["step"]: r for r in trainproc.train_records(reference / "finetune")}
  for r in trainproc.train_records(killed / "finetune"):  # redone steps included
    assert r == records[r["step"]], r["step"]


@pytest.mark.slow
def test_linear_probe_killed_twice_resumes_to_the_uninterrupted_result(pretrained, env,
                                                                       tmp_path):
  reference = copy_pretraining(pretrained, tmp_path / "reference")
  run_to_end(evaluate_cmd(reference, "linprobe", PROBE), env)
  killed = copy_pretraining(pretrained, tmp_path / "killed")
  kill_twice_then_finish(evaluate_cmd(killed, "linprobe", PROBE), killed / "linprobe", env,
                         tmp_path, total=240)
  trainproc.assert_trees_equal(saved_state(killed / "linprobe", 240),
                               saved_state(reference / "linprobe", 240))
  ref, got = (json.loads((d / "eval_linprobe.json").read_text()) for d in (reference, killed))
  assert got["top1"] == ref["top1"] and got["resumed_from"] > 0


@pytest.mark.slow
def test_sigterm_stops_a_finetune_with_a_checkpoint_and_rerunning_finishes_it(pretrained,
                                                                              env, tmp_path):
  workdir = copy_pretraining(pretrained, tmp_path / "run")
  cmd = evaluate_cmd(workdir, "knn,finetune", FINETUNE)
  code, out = trainproc.run_and_stop(cmd, workdir / "finetune", env, tmp_path / "term.log", 5,
                                     signal.SIGTERM)
  assert code == 0, out[-3000:]
  assert "SIGTERM: saving a checkpoint at the next step, then stopping" in out
  stopped = int(out.split("stopped at step ")[1].split(" ")[0])
  assert checkpoints.complete_steps(workdir / "finetune" / "checkpoints")[-1] == stopped
  assert not (workdir / "eval_finetune.json").exists()
  out = run_to_end(cmd, env)
  assert f"resuming from step {stopped}" in out
  assert json.loads((workdir / "eval_finetune.json").read_text())["steps"] == 30


def test_resume_with_another_encoder_or_other_classes_is_refused(pretrained, tmp_path,
                                                                 capsys):
  """A fine-tuning stopped at step 3 of the step-4 encoder: resuming it from the step-2
  encoder, or on a dataset with 3 classes, is one line naming both, exit 2."""
  workdir = copy_pretraining(pretrained, tmp_path / "run")
  base = ["--workdir", str(workdir), "--mode", "finetune", *EVAL, *FINETUNE]
  assert run_evaluate([*base, "--config.stop_after_steps=3"]) == 0
  capsys.readouterr()
  assert run_evaluate([*base, "--config.checkpoint_step=2"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("error: config.encoder:"), err
  assert "checkpoint at step 4" in err and "checkpoint at step 2" in err

  three = tmp_path / "three"
  write_pattern_folder(three)
  shutil.rmtree(three / "train" / "class3")
  shutil.rmtree(three / "test" / "class3")
  assert run_evaluate([*base, f"--config.data.data_dir={three}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("error: config.num_classes:"), err
  assert "num_classes 4" in err and "num_classes is 3" in err


def test_workdirs_of_another_kind_of_job_are_refused(pretrained, tmp_path, capsys):
  """train.py on a fine-tuning's workdir, and an evaluation of it as if it were a
  pretraining workdir: one line each, exit 2."""
  workdir = copy_pretraining(pretrained, tmp_path / "run")
  assert run_evaluate(["--workdir", str(workdir), "--mode", "finetune", *EVAL, *FINETUNE,
                       "--config.stop_after_steps=2"]) == 0
  capsys.readouterr()
  assert run_train_py(["--workdir", str(workdir / "finetune")]) == 2
  err = capsys.readouterr().err.strip()
  assert err == (f"error: --workdir {workdir / 'finetune'}: holds a fine-tuning run "
                 f"({workdir / 'finetune' / 'config.json'}), not a pretraining one; use "
                 "another --workdir"), err
  assert run_evaluate(["--workdir", str(workdir / "finetune"), "--mode", "knn"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == (f"error: --workdir {workdir / 'finetune'}: holds a fine-tuning run, not a "
                 "pretraining one; give the pretraining workdir it belongs to"), err


def test_a_finished_job_with_other_values_is_evaluated_afresh(pretrained, tmp_path, capsys):
  """A finished probe rerun with another learning rate is a new evaluation (its results
  replace the old), not a resume; an unfinished one with other values is refused."""
  workdir = copy_pretraining(pretrained, tmp_path / "run")
  probe = ["--workdir", str(workdir), "--mode", "linprobe", *EVAL, *PROBE]
  assert run_evaluate([*probe, "--config.linprobe.num_steps=16"]) == 0
  first = json.loads((workdir / "eval_linprobe.json").read_text())
  capsys.readouterr()
  assert run_evaluate([*probe, "--config.linprobe.num_steps=16",
                       "--config.linprobe.optim.base_lr=0.5"]) == 0
  out = capsys.readouterr().out
  assert "its finished linprobe had other values (optim.base_lr 0.1 there, 0.5 here)" in out
  assert "resuming" not in out
  second = json.loads((workdir / "eval_linprobe.json").read_text())
  assert second["config"]["optim"]["base_lr"] == 0.5 and first["config"]["optim"][
      "base_lr"] == 0.1

  assert run_evaluate([*probe, "--config.stop_after_steps=8"]) == 0  # 8 of 240 steps
  capsys.readouterr()
  assert run_evaluate([*probe, "--config.linprobe.optim.base_lr=0.2"]) == 2
  err = capsys.readouterr().err.strip()
  assert "launched with other values (optim.base_lr 0.1 there, 0.2 here)" in err, err


@pytest.mark.slow
def test_conv_baseline_stops_on_sigterm_and_resumes_exactly(env, tmp_path):
  """The conv baseline on the loop: stopped by SIGTERM, resumed, the same final state as
  an uninterrupted run."""
  flags = ["--config.data.name=synthetic", "--config.data.synthetic_size=64",
           "--config.data.image_size=16", "--config.model.features=(8, 16)",
           "--config.batch_size=16", "--config.num_steps=40", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=5", "--config.optim.warmup_steps=2",
           "--config.eval_batch_size=32", "--mode="]
  cmd = lambda w: [sys.executable, "-m", "mae_jax.conv_mae", "--workdir", str(w), *flags]
  run_to_end(cmd(tmp_path / "reference"), env)
  code, out = trainproc.run_and_stop(cmd(tmp_path / "run"), tmp_path / "run", env,
                                     tmp_path / "term.log", 7, signal.SIGTERM)
  assert code == 0 and "stopped at step" in out, out[-3000:]
  assert not (tmp_path / "run" / "summary.json").exists()
  assert "resuming from step" in run_to_end(cmd(tmp_path / "run"), env)
  trainproc.assert_trees_equal(saved_state(tmp_path / "run", 40),
                               saved_state(tmp_path / "reference", 40))
  ref, got = (json.loads((d / "summary.json").read_text())
              for d in (tmp_path / "reference", tmp_path / "run"))
  assert got["test_masked_mse"] == ref["test_masked_mse"]


@pytest.mark.slow
def test_a_sweep_resumes_its_killed_finetune_point(tmp_path, env):
  """SIGKILL a sweep (its whole process group) during a point's fine-tuning: running the
  sweep again resumes that fine-tuning from its checkpoint, and the point gets its row."""
  from test_sweep import VIT_OVERRIDES  # pylint: disable=g-import-not-at-top
  spec = tmp_path / "ft.py"
  spec.write_text(f"""
def get_sweep():
  return dict(name="ft", overrides={VIT_OVERRIDES!r},
              eval_overrides={{"eval_batch_size": 32, "finetune.batch_size": 16,
                              "finetune.num_steps": 60, "finetune.checkpoint_every_steps": 4,
                              "finetune.log_every_steps": 1}},
              evals="finetune", points=[{{"label": "vit", "overrides": {{}}}}])
""")
  cmd = [sys.executable, "-m", "mae_jax.sweep", str(spec), "--workdir", str(tmp_path / "w")]
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.STDOUT, start_new_session=True)
  try:
    trainproc.wait_until(lambda: any(trainproc.checkpoint_steps(d) for d in (
        tmp_path / "w" / "points").glob("*/finetune")), proc, timeout=600)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  (job_dir,) = (tmp_path / "w" / "points").glob("*/finetune")
  saved = trainproc.checkpoint_steps(job_dir)
  again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  log = (job_dir.parent / "log.txt").read_text()
  assert f"resuming from step {saved[-1]}" in log.split("mae_jax.evaluate")[-1], log[-3000:]
  row = json.loads((job_dir.parent / "point.json").read_text())
  assert 0.0 <= next(iter(row.values()))["finetune_top1"] <= 1.0


def test_a_diverging_finetune_stops_naming_the_step_and_last_good_checkpoint(pretrained,
                                                                              tmp_path, capsys):
  """A learning rate that overflows the classifier: exit 1, one line naming the step and
  the last checkpoint, which is finite (nothing of the bad step was saved)."""
  workdir = copy_pretraining(pretrained, tmp_path / "run")
  code = run_evaluate(["--workdir", str(workdir), "--mode", "finetune", *EVAL, *FINETUNE,
                       "--config.finetune.checkpoint_every_steps=1",
                       "--config.finetune.optim.base_lr=1e30",
                       "--config.finetune.optim.warmup_steps=0"])
  err = capsys.readouterr().err.strip()
  assert code == 1 and err.count("\n") == 0, err
  step, last = re.fullmatch(r"error: non-finite loss, gradients or update at step (\d+) "
                            r"\(loss \S+, grad_norm \S+\); nothing of it was saved; last good "
                            r"checkpoint: (?:step (\d+) in \S+|none); lower optim.base_lr, set "
                            r"optim.grad_clip", err).groups()
  saved = checkpoints.complete_steps(workdir / "finetune" / "checkpoints")
  assert last is not None and saved[-1] == int(last) == int(step) - 1, (saved, err)
  for s in saved:
    state = trainproc.load_state(workdir / "finetune", s)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_a_finetune_workdir_in_use_is_refused(pretrained, tmp_path, capsys):
  """While another process holds WORKDIR/finetune's lock, a second fine-tuning there is one
  line naming the holder, exit 2, before anything is computed."""
  workdir = copy_pretraining(pretrained, tmp_path / "run")
  (workdir / "finetune").mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from mae_jax.train import workdirs; "
       "workdirs.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); "
       "time.sleep(120)", str(workdir / "finetune")],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    code = run_evaluate(["--workdir", str(workdir), "--mode", "finetune", *EVAL, *FINETUNE])
  finally:
    holder.kill()
    holder.wait()
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.count("\n") == 0, err
  assert f"{workdir / 'finetune'} is in use by another run (pid {holder.pid} on host" in err
  assert not (workdir / "finetune" / "config.json").exists()  # nothing of the job written
  assert trainproc.checkpoint_steps(workdir / "finetune") == []
