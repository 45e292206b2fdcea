"""End to end: train.py on generated data, exact resume, and clear config errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.default import get_config
from helpers import ROOT, run_train_py, synthetic_config
from mae_jax import trainer
from mae_jax.model import sizes
from mae_jax.train import checkpoints, config as config_lib


def params_of(state):
  return jax.tree.leaves(jax.device_get(state.params))


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted(tmp_path):
  full, _ = trainer.train_and_evaluate(synthetic_config(), str(tmp_path / "full"))
  part, results = trainer.train_and_evaluate(synthetic_config(stop_after_steps=3),
                                             str(tmp_path / "resumed"))
  assert int(part.step) == 3 and results is None
  resumed, results = trainer.train_and_evaluate(synthetic_config(), str(tmp_path / "resumed"))
  assert int(resumed.step) == 6
  for a, b in zip(params_of(full), params_of(resumed)):
    np.testing.assert_array_equal(a, b)  # bitwise: data and RNG are functions of the step
  assert results["test_masked_mse"] > 0


def test_save_restore_is_exact(tmp_path):
  state, _ = trainer.train_and_evaluate(synthetic_config(num_steps=2), str(tmp_path))
  ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints", keep=2, every_steps=1)
  assert ckpt.latest_step() == 2
  restored = ckpt.restore(2, state)
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
  ckpt.close()


def run_train(tmp_path, *flags):
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, "configs/default.py"), "--workdir", str(tmp_path / "run"), *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.slow
def test_train_py_end_to_end(tmp_path):
  """A smoke run whose explicit --config.num_steps and batch_size win over smoke's."""
  proc = run_train(tmp_path, "--config.data.name=synthetic", "--config.smoke=True",
                   "--config.data.image_size=16", "--config.num_steps=6",
                   "--config.batch_size=32")
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = tmp_path / "run"
  summary = json.loads((run / "summary.json").read_text())
  assert summary["steps"] == 6 and summary["baseline_masked_mse"] > 0
  assert (run / "reconstructions.png").stat().st_size > 0
  saved = json.loads((run / "config.json").read_text())
  assert (saved["batch_size"], saved["num_steps"], saved["model"]["width"]) == (32, 6, 32)
  assert sorted(os.listdir(run / "checkpoints"), key=int)[-1] == "6"
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(run))
  assert "step 6/6" in proc.stdout
  assert "kept the command line's batch_size, num_steps" in proc.stdout + proc.stderr


BAD_CONFIGS = [  # (overrides, the field the message must name)
    (dict(image_size=30, patch_size=4), "data.image_size"),
    (dict(mask_ratio=1.0), "model.mask_ratio"),
    (dict(mask_ratio=0.99), "model.mask_ratio"),  # leaves no visible patch
    (dict(batch_size=12), "batch_size"),  # conftest gives 8 devices
    (dict(mesh_data=3), "mesh"),
    (dict(variant="XL/16"), "model.variant"),
    (dict(mask_strategy="spiral"), "model.mask_strategy"),
    (dict(num_heads=5), "model.num_heads"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(augment="rotate"), "data.augment"),
]


def apply_overrides(c, o):
  with c.unlocked():
    c.data.image_size = o.get("image_size", c.data.image_size)
    c.data.augment = o.get("augment", c.data.augment)
    c.batch_size = o.get("batch_size", c.batch_size)
    c.mesh.data = o.get("mesh_data", c.mesh.data)
    for f in ("patch_size", "mask_ratio", "variant", "mask_strategy", "num_heads", "dtype"):
      if f in o:
        c.model[f] = o[f]
  return c


@pytest.mark.parametrize("overrides,field", BAD_CONFIGS)
def test_bad_config_names_the_field(overrides, field):
  config = apply_overrides(get_config(), overrides)
  with pytest.raises(config_lib.ConfigError) as e:
    sizes.check(config)  # the model's fields
    config_lib.validate(config)  # the others
  message = str(e.value)
  assert message.startswith(f"config.{field}") and "\n" not in message, message


@pytest.mark.parametrize("flags,field", [
    (["--config.model.mask_strategy=spiral"], "model.mask_strategy"),
    (["--config.data.name=no_such_dataset_xyz"], "data.name"),
    (["--config.data.data_dir=/nonexistent/dir"], "data.data_dir"),
    # a patch size that does not divide the image size: blamed on the field given
    (["--config.model.variant=B/15"], "config.model.variant: 'B/15' gives patch size 15"),
    (["--config.data.image_size=30"], "config.data.image_size: 30 is not a positive"),
    (["--config.model.patch_size=5"], "config.model.patch_size: 5 gives patch size 5"),
])
def test_train_py_bad_input_is_one_line_exit_2(tmp_path, capsys, flags, field):
  """train.py's flag parsing and main, in-process: the config is refused before any work."""
  code = run_train_py(["--config", os.path.join(ROOT, "configs/default.py"),
                       "--workdir", str(tmp_path / "run"), *flags])
  stderr = capsys.readouterr().err
  assert code == 2, stderr[-2000:]
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  assert lines[-1].startswith("error:") and field in lines[-1], stderr[-2000:]
  assert "Traceback" not in stderr


@pytest.mark.slow
def test_input_wait_is_reported_and_warned_once(tmp_path, capsys):
  """The share of wall time spent waiting for batches: in metrics.jsonl (TensorBoard's
  scalars), on the progress line and in summary.json; one note when above the threshold."""
  config = synthetic_config(num_steps=14)
  with config.unlocked():
    config.data.input_wait_warn = 0.0  # every run waits a little: the note must show, once
  trainer.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  # once, after the warm-up (the compiling step and 10 more), with advice for in-memory data
  (note,) = [l for l in out.splitlines() if l.startswith("input-bound:")]
  assert int(note.split(" at step ")[1].split()[0]) >= 11
  assert "data.worker_processes" in note and "prepared" not in note, note
  assert "input wait" in out
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  shares = [r["train/input_wait"] for r in records if "train/input_wait" in r]
  assert len(shares) == 14 and all(0 <= s < 1 for s in shares) and max(shares) > 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert 0 < summary["input_wait_share"] < 1


@pytest.mark.parametrize("field,value", [("repeat_samples", 3), ("repeat_samples", 0),
                                         ("worker_processes", -1), ("input_wait_warn", 1.5)])
def test_bad_input_pipeline_fields(field, value):
  c = get_config()  # batch 128: repeat_samples 3 does not divide it
  with c.unlocked():
    c.data[field] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert str(e.value).startswith(f"config.data.{field}") and "\n" not in str(e.value)


def test_the_logger_keeps_torch_out_of_a_training_process():
  """tensorboardX imports torch wherever it is installed (1 to 1.6 s of every start on
  this 2-core machine, docs/benchmarks.md); logger.summary_writer_class gets its writer
  without it. Both halves run in fresh processes: the library's shortfall, and ours."""
  plain = "import sys, tensorboardX; print('torch' in sys.modules)"
  ours = ("import sys; from mae_jax.train import logger; logger.summary_writer_class(); "
          "print('torch' in sys.modules)")
  run = lambda code: subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                                    capture_output=True, check=True).stdout.strip()
  assert run(plain) == "True"  # torch is installed here (the test extra)
  assert run(ours) == "False"


@pytest.mark.parametrize("data,platform,has,lacks", [
    ({"name": "synthetic"}, "cpu", ["data.worker_processes"], ["prepare", "num_workers",
                                                               "resize"]),
    ({"name": "folder"}, "cpu", ["data.num_workers", "mae_jax.prepare"], ["resize"]),
    ({"name": "imagenet2012", "resize": "host"}, "tpu", ["mae_jax.prepare",
                                                         "data.resize=device"], []),
])
def test_input_advice_fits_the_run(data, platform, has, lacks):
  config = get_config()
  config.data.update(data)
  advice = trainer.input_advice(config, platform)
  assert all(h in advice for h in has) and not any(l in advice for l in lacks), advice
