"""Stages of a pretraining run (config.schedule): where they start, what each step trains
on, one program per stage, exact resume in any stage, the benchmark's and the ahead-of-time
compiler's reports per stage, and a schedule that cannot work refused in one line."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import trainproc
from helpers import ROOT, TINY, run_train_py, synthetic_config, tiny_config
from mae_jax import data, trainer
from mae_jax.tools import aot, bench
from mae_jax.train import config as config_lib, stages, train_step as ts

RESOLUTION = ((0.0, 8), (0.5, 16))  # 8 px, then the recipe's 16 px from half way
MASK_RATIO = ((0.0, 0.5), (0.3, 0.75))


def scheduled(**overrides):
  config = synthetic_config(**overrides)
  with config.unlocked():
    config.schedule.resolution = RESOLUTION
    config.schedule.mask_ratio = MASK_RATIO
  return config


def test_stages_begin_where_either_schedule_changes():
  config = tiny_config({"data.image_size": 28, "model.patch_size": 4})
  with config.unlocked():
    config.schedule.resolution = ((0.0, 16), (0.5, 24), (0.8, 28))
    config.schedule.mask_ratio = ((0.0, 0.9), (0.25, 0.75))
  got = [(s.start, s.end, s.image_size, s.mask_ratio) for s in stages.of(config, 100)]
  assert got == [(0, 25, 16, 0.9), (25, 50, 16, 0.75), (50, 80, 24, 0.75),
                 (80, 100, 28, 0.75)]
  assert stages.stage_at(stages.of(config, 100), 25).mask_ratio == 0.9  # step 25: the first
  assert stages.stage_at(stages.of(config, 100), 26).mask_ratio == 0.75
  # no schedule: one stage, the recipe's size and ratio
  assert stages.of(tiny_config(), 7) == [stages.Stage(0, 7, 16, 0.75)]


def manual_run(config, num_steps):
  """The scheduled run written out by hand: each step's batch made at its stage's size
  from the same (seed, step) and trained by a plainly jitted train_step of a model with
  that stage's size and mask ratio. Returns (params, losses)."""
  run = trainer.build_run(config, None)
  state = run.init(jax.random.key(config.seed))
  losses = []

  @functools.cache
  def step_fn(size, ratio):
    return jax.jit(functools.partial(
        ts.train_step, model=run.model.clone(image_size=size, mask_ratio=ratio), tx=run.tx,
        schedule=run.schedule, mean=run.norm_stats[0], std=run.norm_stats[1],
        norm_pix_loss=False))

  for step in range(1, num_steps + 1):
    size, ratio = (8, 0.5) if step <= 2 else (8, 0.75) if step == 3 else (16, 0.75)
    batch = next(data.make_train_batches(run.train_src, image_size=size,
                                         global_batch_size=config.batch_size,
                                         seed=config.seed, start_step=step - 1))
    state, metrics = step_fn(size, ratio)(state, batch, jax.random.key(config.seed))
    losses.append(float(metrics["loss"]))
  return state.params, losses


def distance(a, b):
  return float(optax.tree.norm(jax.tree.map(lambda x, y: x - y, a, b)))


@pytest.mark.slow
def test_each_step_trains_at_its_stages_size_and_ratio(tmp_path, capsys):
  """A 6-step run with stages 8 px at mask 0.5 (steps 1-2), 8 px at 0.75 (step 3), 16 px
  (steps 4-6) equals the same steps written out by hand (to rounding: another compile),
  and differs from the run without the schedule; each stage's program is compiled once
  and said so."""
  config = scheduled()
  state, _ = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  params, losses = manual_run(config, 6)
  logged = [r["train/loss"] for r in trainproc.train_records(tmp_path / "run")]
  np.testing.assert_allclose(logged, losses, rtol=1e-5)
  scale = float(optax.tree.norm(params))
  assert distance(state.params, params) < 1e-5 * scale
  for line in ("stage 1/3: steps 1-2 at 8 px, mask ratio 0.5; compiled in",
               "stage 2/3: step 3 at 8 px, mask ratio 0.75; compiled in",
               "stage 3/3: steps 4-6 at 16 px, mask ratio 0.75; compiled in"):
    assert line in out
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert [(s["start"], s["end"], s["image_size"]) for s in summary["stages"]] == [
      (0, 2, 8), (2, 3, 8), (3, 6, 16)]
  assert all(s["compile_seconds"] > 0 for s in summary["stages"])
  fixed, _ = trainer.train_and_evaluate(synthetic_config(), str(tmp_path / "fixed"))
  assert distance(state.params, fixed.params) > 1e-3 * scale  # the schedule mattered


@pytest.mark.slow
def test_a_stage_that_repeats_a_program_reuses_it(tmp_path, capsys):
  """16 px, then 8 px, then 16 px again: two programs for three stages."""
  config = synthetic_config()
  with config.unlocked():
    config.schedule.resolution = ((0.0, 16), (0.3, 8), (0.6, 16))
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert out.count("compiled in") == 2
  assert "stage 3/3: steps 5-6 at 16 px, mask ratio 0.75\n" in out  # no second compile


@pytest.mark.parametrize("field,value,says", [
    ("resolution", "((0.0,8),(0.5,14))", "resolution 14 is not a positive multiple of the "
     "patch size 4"),
    ("resolution", "((0.0,8),(0.6,16),(0.5,12))", "stages out of order: fraction 0.5 follows "
     "0.6"),
    ("resolution", "((0.2,8),)", "the first stage must start at fraction 0.0"),
    ("resolution", "((0.0,8),(1.0,16))", "fraction 1.0 must be in [0, 1)"),
    ("resolution", "(8,16)", "8 is not a (fraction, value) pair"),
    ("mask_ratio", "((0.0,0.9),(0.5,1.0))", "mask ratio 1.0 must be in (0, 1)"),
    ("mask_ratio", "((0.0,0.0),)", "mask ratio 0.0 must be in (0, 1)"),
])
def test_a_schedule_that_cannot_work_is_one_line_and_exit_2(field, value, says, tmp_path,
                                                            capsys):
  code = run_train_py(["--config", os.path.join(ROOT, "configs/default.py"),
                       "--workdir", str(tmp_path / "run"),
                       *[f"--config.{k}={v}" for k, v in TINY.items()],
                       f"--config.schedule.{field}={value}"])
  captured = capsys.readouterr()
  assert code == 2
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and f"config.schedule.{field}: " in lines[0] and says in lines[0], \
      captured.err
  assert "compiled" not in captured.out
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_the_benchmark_times_each_stage():
  """bench's records: one per stage at that stage's size, FLOPs growing with the size, and
  a whole-schedule figure weighted by each stage's share of the steps."""
  config = scheduled(num_steps=10)
  args = bench.Args(config, steps=2, warmup=0, peak_tflops=None, seed=0)
  results = bench.benchmark(args)
  assert [(r["image_size"], r["mask_ratio"]) for r in results] == [
      (8, 0.5), (8, 0.75), (16, 0.75)]
  assert [(r["stage"]["from"], r["stage"]["to"]) for r in results] == [
      (0.0, 0.3), (0.3, 0.5), (0.5, 1.0)]
  assert results[0]["flops_per_image"] > results[1]["flops_per_image"]  # more visible
  assert results[2]["flops_per_image"] > 2 * results[1]["flops_per_image"]  # 4x the patches
  summary = bench.schedule_summary(results)
  expected = sum(share * r["step_time_s"] for share, r in zip((0.3, 0.2, 0.5), results))
  assert summary["schedule_mean_step_time_s"] == pytest.approx(expected)


@pytest.mark.slow
def test_aot_reports_every_stage_for_a_tpu_slice():
  """mae_jax.aot on a schedule: one compiled program per (size, ratio), each with its
  memory, and the per-device batch search checks every stage."""
  config = scheduled(num_steps=10)
  with config.unlocked():
    config.mesh.fsdp = 2
  rep = aot.report(config, "v5e:2x2")
  assert [(s["image_size"], s["mask_ratio"], s["steps"]) for s in rep["stages"]] == [
      (8, 0.5, [[1, 3]]), (8, 0.75, [[4, 5]]), (16, 0.75, [[6, 10]])]
  totals = [s["memory"]["total"] for s in rep["stages"]]
  assert all(t > 0 for t in totals) and totals[2] > totals[1]
  assert "largest stage: 16 px" in aot.table(rep)


def train_cmd(workdir, **overrides):
  fields = {**TINY, "num_steps": 12, "checkpoint_every_steps": 2,
            "schedule.resolution": "((0.0,8),(0.34,12),(0.67,16))",
            "schedule.mask_ratio": "((0.0,0.5),(0.5,0.75))", **overrides}
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config",
          os.path.join(ROOT, "configs/default.py"), "--workdir", str(workdir),
          *[f"--config.{k}={v}" for k, v in fields.items()]]


@pytest.mark.slow
def test_a_run_stopped_in_any_stage_resumes_bitwise(tmp_path):
  """Stages 1-4 (8 px 0.5), 5-6 (12 px 0.5), 7-8 (12 px 0.75), 9-12 (16 px 0.75): stopped
  in stage 1 (stop_after_steps), SIGKILLed in stage 2 (resuming from step 4, the end of
  stage 1) and in stage 4, then finished: bitwise the uninterrupted run, every record
  equal."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  ref = tmp_path / "reference"
  proc = subprocess.run(train_cmd(ref), env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = tmp_path / "run"
  proc = subprocess.run(train_cmd(run, stop_after_steps=3), env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and "stopped at step 3" in proc.stdout, proc.stderr[-3000:]
  k1, _ = trainproc.run_and_kill(
      train_cmd(run), run, env, tmp_path / "1.log",
      lambda s: bool(s.logged >= 5 and not s.writing and s.complete and s.complete[-1] == 4),
      "in stage 2", timeout=900)
  k2, log2 = trainproc.run_and_kill(train_cmd(run), run, env, tmp_path / "2.log",
                                    lambda s: bool(s.logged >= 9 and not s.writing),
                                    "in stage 4", timeout=900)
  assert "resuming from step 4" in log2 and k2.logged >= 9
  proc = subprocess.run(train_cmd(run), env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resuming from step {k2.complete[-1]}" in proc.stdout
  trainproc.assert_trees_equal(trainproc.load_state(run, 12), trainproc.load_state(ref, 12))
  reference = {r["step"]: r for r in trainproc.train_records(ref)}
  for record in trainproc.train_records(run):
    assert record == reference[record["step"]], record["step"]
  assert k1.logged >= 5


def test_a_schedule_is_checked_before_the_data_is_read(tmp_path):
  """The check needs only the config: a bad schedule on a dataset that does not exist is
  blamed on the schedule."""
  config = synthetic_config()
  with config.unlocked():
    config.schedule.resolution = ((0.0, 6),)
    config.data.update(name="folder", data_dir=str(tmp_path / "missing"))
  with pytest.raises(config_lib.ConfigError, match=r"config.schedule.resolution: "
                     r"resolution 6 is not"):
    trainer.build_run(config, str(tmp_path / "run"))


def test_the_fast_imagenet_recipe_ends_at_the_papers_size():
  """configs/mae_imagenet_fast.py: 112, 160, then 224 px for the last fifth, each a
  multiple of the patch size; the rest is configs/mae_imagenet.py's."""
  from configs import mae_imagenet, mae_imagenet_fast  # pylint: disable=g-import-not-at-top
  fast, base = mae_imagenet_fast.get_config(), mae_imagenet.get_config()
  stages.check(fast, 16)
  total = config_lib.durations(fast, 1_281_167).total_steps
  got = [(s.image_size, round(s.start / total, 2)) for s in stages.of(fast, total)]
  assert got == [(112, 0.0), (160, 0.5), (224, 0.8)]
  assert got[-1][0] == base.data.image_size == fast.data.image_size
  with fast.unlocked():
    fast.schedule.resolution = ()
  assert fast.to_dict() == base.to_dict()
