"""The ablation runner (python -m mae_jax.sweep), the conv MAE baseline and what they use:
a real 2-point sweep of real subprocesses (train.py + evaluate, conv_mae), its resume, its
table, commands file and errors."""
import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from configs.default import get_config
from helpers import ROOT, TINY, exit_code
from mae_jax import data
from mae_jax.model import mae, sizes
from mae_jax.tools import conv_mae, sweep
from mae_jax.train import config as config_lib

# The tiny run (helpers.TINY), 4 steps.
VIT_OVERRIDES = {**TINY, "num_steps": 4, "optim.warmup_steps": 1, "log_every_steps": 2,
                 "checkpoint_every_steps": 2}
TOY_SWEEP = '''
VIT = VIT_OVERRIDES
CONV = {"data.name": "synthetic", "data.synthetic_size": 64, "data.image_size": 16,
        "model.features": (8, 16), "batch_size": 16, "num_steps": 4,
        "optim.warmup_steps": 1, "eval_batch_size": 32, "log_every_steps": 2}
EVAL = {"eval_batch_size": 32, "data.train_examples": 48, "linprobe.batch_size": 16,
        "linprobe.num_steps": 30, "linprobe.optim.warmup_steps": 3}


def get_sweep():
  return dict(name=NAME, overrides=VIT, conv_overrides=CONV, eval_overrides=EVAL,
              evals="knn,linprobe", SPEC)
'''


def write_sweep(path, name, spec):
  path.write_text(TOY_SWEEP.replace("VIT_OVERRIDES", repr(VIT_OVERRIDES))
                  .replace("NAME", repr(name)).replace("SPEC", spec))
  return str(path)


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "mae_jax.sweep", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_toy_sweep_runs_resumes_and_shares_points(tmp_path):
  """A ViT point and a conv point run as subprocesses and give a row each (losses, MSE,
  kNN / probe top-1 on the synthetic classes, img/s, wall time); running again runs
  nothing; another sweep containing the same ViT point reuses it."""
  workdir = tmp_path / "sweeps"
  first = write_sweep(tmp_path / "toy.py", "toy", 'points=[{"label": "vit_mae", '
                      '"overrides": {"model.mask_ratio": 0.5}}, '
                      '{"label": "conv_mae", "program": "conv"}]')
  proc = run_cli(first, "--workdir", str(workdir))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = list(csv.DictReader(open(workdir / "toy" / "results.csv")))
  assert [r["label"] for r in rows] == ["vit_mae", "conv_mae"]
  assert [r["program"] for r in rows] == ["mae", "conv"]
  for r in rows:
    for key in ("knn_top1", "linprobe_top1"):
      assert 0.0 <= float(r[key]) <= 1.0
    assert 0.0 < float(r["test_masked_mse"]) < 1.0
    assert float(r["images_per_sec"]) > 0 and float(r["wall_seconds"]) > 0
    assert np.isfinite(float(r["final_train_loss"]))
  # Each row is what the point's own result files say.
  vit_dir = [d for d in (workdir / "points").iterdir() if (d / "eval_knn.json").exists()
             and json.loads((d / "config.json").read_text()).get("job") == "pretrain"]
  assert len(vit_dir) == 1
  summary = json.loads((vit_dir[0] / "summary.json").read_text())
  knn = json.loads((vit_dir[0] / "eval_knn.json").read_text())
  assert float(rows[0]["test_masked_mse"]) == pytest.approx(summary["test_masked_mse"])
  assert float(rows[0]["knn_top1"]) == pytest.approx(knn["top1"])
  assert summary["model"]["mask_ratio"] == 0.5
  table = (workdir / "toy" / "results.md").read_text()
  assert "| point | train loss | test masked MSE | kNN top-1 |" in table
  assert sorted(p.name for p in (workdir / "toy").glob("*.png")) == [
      "images_per_sec.png", "knn_top1.png", "linprobe_top1.png", "summary.png",
      "test_masked_mse.png"]

  stamps = {p: p.stat().st_mtime_ns for p in (workdir / "points").rglob("summary.json")}
  again = run_cli(first, "--workdir", str(workdir))
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("done before, skipped") == 2
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
  assert list(csv.DictReader(open(workdir / "toy" / "results.csv"))) == rows

  second = write_sweep(tmp_path / "ratio.py", "ratio",
                       'axes={"model.mask_ratio": [0.5]}')
  shared = run_cli(second, "--workdir", str(workdir))
  assert shared.returncode == 0, shared.stderr[-3000:]
  assert "done before, skipped" in shared.stdout
  ratio_rows = list(csv.DictReader(open(workdir / "ratio" / "results.csv")))
  assert ratio_rows[0]["model.mask_ratio"] == "0.5"
  assert ratio_rows[0]["knn_top1"] == rows[0]["knn_top1"]


def test_commands_file_has_one_line_per_point_and_runs_nothing(tmp_path):
  path = write_sweep(tmp_path / "grid.py", "grid",
                     'axes={"model.mask_ratio": [0.25, 0.75], "model.decoder_depth": [1, 2]}')
  rows = sweep.run_sweep(sweep.load_sweep(path), str(tmp_path / "w"), commands_only=True,
                         log=lambda m: None)
  assert rows == []
  lines = (tmp_path / "w" / "grid" / "commands.sh").read_text().splitlines()[1:]
  assert len(lines) == 4
  assert all("-m mae_jax.pretrain" in l and "-m mae_jax.evaluate" in l for l in lines)
  assert "--config.model.mask_ratio=0.25" in lines[0]
  assert "--config.model.decoder_depth=1" in lines[0]
  # 2 is the recipe's own value: the toy's decoder_depth=1 is dropped, not passed as 2.
  assert "decoder_depth" not in lines[1] and "--config.model.mask_ratio=0.25" in lines[1]
  assert not (tmp_path / "w" / "points").exists() or not any(
      (tmp_path / "w" / "points").rglob("summary.json"))


def test_exclude_leaves_out_the_matching_combinations(tmp_path):
  """An arm that does not depend on an axis runs once: exclude drops every combination
  that matches all fields of an entry, and no other."""
  path = write_sweep(tmp_path / "ex.py", "ex",
                     'axes={"model.mask_ratio": [0.25, 0.75], "seed": [0, 1], '
                     '"eval.init": ["pretrained", "random"]}, '
                     'exclude=[{"model.mask_ratio": 0.25, "eval.init": "random"}]')
  planned = sweep.plan(sweep.load_sweep(path), str(tmp_path / "w"))
  assert [p["label"] for p, _, _ in planned] == [
      "mask_ratio=0.25,seed=0,init=pretrained", "mask_ratio=0.25,seed=1,init=pretrained",
      "mask_ratio=0.75,seed=0,init=pretrained", "mask_ratio=0.75,seed=0,init=random",
      "mask_ratio=0.75,seed=1,init=pretrained", "mask_ratio=0.75,seed=1,init=random"]


def test_bars_are_named_by_the_whole_label_where_x_repeats():
  rows = [{"label": "n=2,init=pretrained"}, {"label": "n=10,init=pretrained"},
          {"label": "n=10,init=random"}]
  assert sweep.bar_names(rows, ["pretrained", "pretrained", "random"]) == [
      "n=2,init=pretrained", "n=10,init=pretrained", "n=10,init=random"]
  assert sweep.bar_names(rows[1:], ["pretrained", "random"]) == ["pretrained", "random"]


def test_a_default_value_is_the_same_point_in_every_sweep(tmp_path):
  """mask_ratio=0.75 (the recipe's own value) and decoder_depth=1 (the toy's) name the
  same pretraining; a changed value does not."""
  a = write_sweep(tmp_path / "a.py", "a", 'axes={"model.mask_ratio": [0.75, 0.5]}')
  b = write_sweep(tmp_path / "b.py", "b", 'axes={"model.decoder_depth": [1]}')
  (p75, d75, _), (p50, d50, _) = sweep.plan(sweep.load_sweep(a), str(tmp_path))
  ((_, d1, c1),) = sweep.plan(sweep.load_sweep(b), str(tmp_path))
  assert d75 == d1 and d50 != d75
  assert not any("mask_ratio" in arg for arg in c1[0])
  assert p75["label"] == "mask_ratio=0.75"


def test_finished_points_count_in_another_checkout_and_workdir(tmp_path, monkeypatch):
  """A point's hash leaves out where the checkout and the workdir are: the finished point
  directories of one checkout, copied into another checkout's sweep workdir, are skipped
  there with their rows, and nothing runs."""
  import shutil  # pylint: disable=g-import-not-at-top
  checkouts = [tmp_path / "a", tmp_path / "elsewhere" / "b"]
  for c in checkouts:
    shutil.copytree(os.path.join(ROOT, "configs"), c / "configs")
  loaded = [sweep.load_sweep(str(c / "configs" / "ablations" / "pretrain_pays.py"))
            for c in checkouts]
  first = sweep.plan(loaded[0], str(tmp_path / "w1"))
  for point, directory, commands in first:
    fake_results(loaded[0], point, directory)
    sweep.record_done(directory, commands, sweep.collect(loaded[0], point, directory), 1.0)
  shutil.copytree(tmp_path / "w1" / "points", tmp_path / "w2" / "points")

  def must_not_run(*args):
    raise AssertionError(f"ran {args[0]['label']} again")
  monkeypatch.setattr(sweep, "run_point", must_not_run)
  logged = []
  rows = sweep.run_sweep(loaded[1], str(tmp_path / "w2"), log=logged.append)
  # 2-epoch pretrained arm of seeds 0-2, then the 10-epoch arms pretrained and scratch.
  assert [r["finetune_top1"] for r in rows] == pytest.approx(
      [0.9, 0.91, 0.92, 0.9, 0.8, 0.91, 0.81, 0.92, 0.82])
  # The scratch arm's row leaves out the pretraining that shares its directory.
  assert [r.get("test_masked_mse") for r in rows] == [0.03] * 4 + [None, 0.03, None, 0.03, None]
  assert [r["wall_seconds"] for r in rows] == [1.0] * 4 + [0.0, 1.0, 0.0, 1.0, 0.0]
  assert sum("done before, skipped" in m for m in logged) == 9
  assert [os.path.basename(d) for _, d, _ in first] == [
      os.path.basename(d) for _, d, _ in sweep.plan(loaded[1], str(tmp_path / "w2"))]


def fake_results(loaded, point, directory):
  """Write the result files a finished pretraining and its fine-tuning leave."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "summary.json"), "w") as f:
    json.dump({"test_masked_mse": 0.03, "train_seconds": 1.0}, f)
  (name,) = sweep.result_names(loaded, point, ["finetune"]).values()
  top1 = 0.9 if point["values"]["eval.init"] == "pretrained" else 0.8
  with open(os.path.join(directory, f"eval_{name}.json"), "w") as f:
    json.dump({"top1": top1 + point["values"]["seed"] / 100}, f)


def test_only_runs_the_selected_points_and_tables_every_finished_one(tmp_path, monkeypatch):
  """--only seed=1 runs that seed's three points and nothing else; the table still has the
  points finished before (seed 0's 2-epoch pretrained arm), and a selector no label has is
  one error before anything runs."""
  loaded = sweep.load_sweep(os.path.join(ROOT, "configs", "ablations", "pretrain_pays.py"))
  planned = sweep.plan(loaded, str(tmp_path))
  point, directory, commands = planned[0]
  fake_results(loaded, point, directory)
  sweep.record_done(directory, commands, sweep.collect(loaded, point, directory), 1.0)
  ran = []

  def run_point(point, directory, commands, log, index, total):
    ran.append(point["label"])
    fake_results(loaded, point, directory)
    return 1.0
  monkeypatch.setattr(sweep, "run_point", run_point)
  rows = sweep.run_sweep(loaded, str(tmp_path), only=["seed=1"], log=lambda m: None)
  assert ran == ["num_epochs=2.0,seed=1,init=pretrained", "num_epochs=10.0,seed=1,init=pretrained",
                 "num_epochs=10.0,seed=1,init=random"]
  assert [r["label"] for r in rows] == ["num_epochs=2.0,seed=0,init=pretrained"] + ran
  assert [r["finetune_top1"] for r in rows] == pytest.approx([0.9, 0.91, 0.91, 0.81])
  ran.clear()
  sweep.run_sweep(loaded, str(tmp_path), only=["seed=2", "init=random"], log=lambda m: None)
  assert ran == ["num_epochs=10.0,seed=2,init=random"]
  with pytest.raises(sweep.SweepError, match="--only seed=7: no point's label has it"):
    sweep.run_sweep(loaded, str(tmp_path), only=["seed=7"], log=lambda m: None)
  sweep.run_sweep(loaded, str(tmp_path), commands_only=True, only=["seed=0,init=random"],
                  log=lambda m: None)
  lines = (tmp_path / "pretrain_pays" / "commands.sh").read_text().splitlines()[1:]
  assert len(lines) == 1 and "--config.init=random" in lines[0]


def test_results_table_format(tmp_path):
  rows = [
      {"label": "mask_ratio=0.5", "program": "mae", "model.mask_ratio": 0.5,
       "final_train_loss": 0.31234, "test_masked_mse": 0.04171, "knn_top1": 0.7951,
       "linprobe_top1": 0.763, "images_per_sec": 163.4, "wall_seconds": 125.2},
      {"label": "mask_ratio=0.9", "program": "mae", "model.mask_ratio": 0.9,
       "final_train_loss": 0.5, "test_masked_mse": 0.06, "knn_top1": None,
       "linprobe_top1": 0.7, "images_per_sec": 200.0, "wall_seconds": 99.0},
  ]
  md = sweep.write_table(rows, ["model.mask_ratio"], tmp_path / "r.csv", tmp_path / "r.md",
                         "mask ratio")
  assert md.splitlines() == [
      "**mask ratio**", "",
      "| mask_ratio | train loss | test masked MSE | kNN top-1 | lin. probe top-1 | img/s "
      "| wall s |",
      "|---|---|---|---|---|---|---|",
      "| 0.5 | 0.3123 | 0.0417 | 79.5% | 76.3% | 163 | 125 |",
      "| 0.9 | 0.5000 | 0.0600 | — | 70.0% | 200 | 99 |",
  ]
  csv_rows = list(csv.reader(open(tmp_path / "r.csv")))
  assert csv_rows[0] == ["label", "program", "model.mask_ratio", "final_train_loss",
                         "test_masked_mse", "knn_top1", "linprobe_top1", "images_per_sec",
                         "wall_seconds"]
  assert csv_rows[2][5] == ""  # missing stays empty, not a made-up number


def test_a_seed_axis_gets_mean_and_spread(tmp_path):
  """Rows over (mask_ratio x seed): one group per mask ratio with the mean and the sample
  standard deviation of each metric, in a table and as error bars."""
  knn = {0.5: [0.70, 0.74, 0.72], 0.75: [0.80, 0.80, 0.83]}
  rows = [{"label": f"r={r},s={s}", "program": "mae", "model.mask_ratio": r, "seed": s,
           "knn_top1": knn[r][s], "test_masked_mse": 0.04 + 0.01 * s}
          for r in (0.5, 0.75) for s in range(3)]
  groups = sweep.aggregate_seeds(rows, ["model.mask_ratio", "seed"])
  assert [(g["model.mask_ratio"], g["seeds"]) for g in groups] == [(0.5, 3), (0.75, 3)]
  for g, r in zip(groups, (0.5, 0.75)):
    assert g["knn_top1"] == pytest.approx(np.mean(knn[r]))
    assert g["knn_top1_std"] == pytest.approx(np.std(knn[r], ddof=1))
    assert g["test_masked_mse_std"] == pytest.approx(0.01)
  md = sweep.write_seed_table(groups, ["model.mask_ratio", "seed"], tmp_path / "s.csv", "t")
  assert "| 0.5 | 3 | 0.0500 ± 0.0100 | 72.0% ± 2.0% |" in md.splitlines()
  header, first = list(csv.reader(open(tmp_path / "s.csv")))[:2]
  assert header[:3] == ["model.mask_ratio", "seeds", "test_masked_mse"]
  assert float(first[header.index("knn_top1_std")]) == pytest.approx(0.02)
  paths = sweep.write_plots(groups, "model.mask_ratio", str(tmp_path), "t")
  assert os.path.basename(paths[0]) == "knn_top1.png" and os.path.getsize(paths[0]) > 0
  # A group with one seed has no spread: its mean alone, not "± 0".
  (single,) = sweep.aggregate_seeds(rows[:1], ["model.mask_ratio", "seed"])
  assert single["knn_top1"] == pytest.approx(0.70) and single["knn_top1_std"] is None
  md = sweep.write_seed_table(groups + [single], ["model.mask_ratio", "seed"],
                              tmp_path / "s1.csv", "t")
  assert "| 0.5 | 1 | 0.0400 | 70.0% |" in md.splitlines()
  assert sweep.write_plots(groups + [single], "model.mask_ratio", str(tmp_path), "t")


def test_eval_axes_share_the_pretraining_and_the_seed_seeds_the_evaluation(tmp_path):
  """eval.init x seed: both arms of a seed share one pretraining directory, only the
  scratch arm's evaluation says init=random, the seed reaches both commands, each arm reads
  its own results file, and point.json keeps both arms' finished runs apart."""
  path = write_sweep(tmp_path / "arms.py", "arms",
                     'axes={"seed": [0, 1], "eval.init": ["pretrained", "random"]}')
  planned = sweep.plan(sweep.load_sweep(path), str(tmp_path))
  assert [p["label"] for p, _, _ in planned] == [
      "seed=0,init=pretrained", "seed=0,init=random", "seed=1,init=pretrained",
      "seed=1,init=random"]
  (_, d0p, c0p), (_, d0r, c0r), (_, d1p, c1p), (_, d1r, c1r) = planned
  assert d0p == d0r != d1p == d1r
  assert c0p[0] == c0r[0] and not any("init" in a for a in c0p[0] + c0p[1])
  assert "--config.init=random" in c0r[1] and "--config.init=random" in c1r[1]
  assert "--config.seed=1" in c1p[0] and "--config.seed=1" in c1p[1]
  loaded = sweep.load_sweep(path)
  names = [sweep.result_names(loaded, p, ["finetune", "knn"]) for p, _, _ in planned[:2]]
  assert names == [{"finetune": "finetune", "knn": "knn"},
                   {"finetune": "finetune_scratch", "knn": "knn_random"}]
  os.makedirs(d0p)
  sweep.record_done(d0p, c0p, {"knn_top1": 0.5}, 1.0)
  sweep.record_done(d0r, c0r, {"knn_top1": 0.25}, 2.0)
  assert sweep.is_done(d0p, c0p)["knn_top1"] == 0.5
  assert sweep.is_done(d0r, c0r)["knn_top1"] == 0.25
  assert sweep.is_done(d0p, c1p) is None
  # a point.json of the one-run form (written before arms shared directories) still counts
  with open(os.path.join(d0p, "point.json"), "w") as f:
    json.dump({"knn_top1": 0.5, "commands": sweep.digest(c0p)}, f)
  assert sweep.is_done(d0p, c0p)["knn_top1"] == 0.5 and sweep.is_done(d0r, c0r) is None


def test_finetune_curves_get_mean_and_spread_per_arm(tmp_path):
  """Per-epoch fine-tuning curves of two arms x three seeds: the mean and sample standard
  deviation at each epoch all seeds reached, in a table and a plot."""
  curves = {"pretrained": [[0.80, 0.86], [0.82, 0.88], [0.81, 0.87, 0.9]],
            "random": [[0.70, 0.80], [0.74, 0.84], [0.72, 0.82]]}
  rows = [{"label": f"{arm},{s}", "program": "mae", "eval.init": arm, "seed": s,
           "finetune_top1": c[-1], "finetune_curve": [(e + 1.0, t) for e, t in enumerate(c)]}
          for arm, cs in curves.items() for s, c in enumerate(cs)]
  groups = sweep.aggregate_seeds(rows, ["seed", "eval.init"])
  pre, scratch = (g["finetune_curve"] for g in groups)
  assert [p[0] for p in pre] == [1.0, 2.0]  # epoch 3: one seed only
  assert pre[1][1:] == pytest.approx((0.87, 0.01))
  assert scratch[0][1:] == pytest.approx((0.72, 0.02))
  md = sweep.write_curves(groups, str(tmp_path), "pays")
  assert "| init=random | 72.0% ± 2.0% | 82.0% ± 2.0% |" in md.splitlines()
  assert os.path.getsize(tmp_path / "finetune_curves.png") > 0
  single = sweep.write_curves(rows[:1], str(tmp_path), "one")
  assert "| pretrained,0 | 80.0% | 86.0% |" in single.splitlines()


@pytest.mark.parametrize("spec, message", [
    ('axes={"model.mask_ratio": [0.5]}, points=[{"label": "x"}]', "exactly one of"),
    ('axes={"model.no_such_field": [1]}', "model.no_such_field: no such field"),
    ('points=[{"label": "x", "program": "tf"}]', "program 'tf'"),
    ('points=[{"label": "x"}, {"label": "x"}]', "unique"),
    ('axes={"model.mask_ratio": [0.5]}#probe', "'probe' is not one of"),
    ('axes={"seed": [0, 1]}, exclude=[{"model.mask_ratio": 0.5}]',
     "exclude[0]['model.mask_ratio'] is 0.5; expected an axis and one of its values"),
    ('axes={"seed": [0, 1]}, exclude=[{"seed": 2}]', "exclude[0]['seed'] is 2"),
    ('axes={"seed": [0, 1]}, exclude={"seed": 0}', "exclude is {'seed': 0}; expected a list"),
    ('axes={"seed": [0, 1]}, exclude=[{"seed": 0}, {"seed": 1}]', "exclude leaves no point"),
])
def test_bad_sweep_is_one_line_exit_2(tmp_path, capsys, spec, message):
  """The sweep command's checks, in-process: exit 2 and one line, before any point runs."""
  path = write_sweep(tmp_path / "bad.py", "bad", spec.split("#")[0])
  if spec.endswith("#probe"):
    (tmp_path / "bad.py").write_text((tmp_path / "bad.py").read_text().replace(
        'evals="knn,linprobe"', 'evals="knn,probe"'))
  code = exit_code(sweep.main, [path, "--workdir", str(tmp_path / "w")])
  stderr = capsys.readouterr().err
  assert code == 2
  assert stderr.startswith("error: ") and message in stderr, stderr
  assert len(stderr.strip().splitlines()) == 1


def test_every_shipped_ablation_sweep_loads_and_plans(tmp_path, monkeypatch):
  """configs/ablations/*.py: each loads, every override names a real field, and the
  default point (ratio 0.75, decoder 2 x 64, random, pixels, visible, crop_flip, seed 0)
  is one directory for all of them. Run from another directory: the recipes are found
  beside the sweep files and the commands are the installed package's modules."""
  monkeypatch.chdir(tmp_path)
  files = sorted(f for f in os.listdir(os.path.join(ROOT, "configs", "ablations"))
                 if f.endswith(".py") and f not in ("__init__.py", "common.py"))
  assert len(files) == 13
  default_dirs = set()
  for f in files:
    planned = sweep.plan(sweep.load_sweep(os.path.join(ROOT, "configs", "ablations", f)),
                         str(tmp_path))
    assert len(planned) >= 2
    for point, directory, commands in planned:
      module, recipe = commands[0][2], commands[0][4]
      assert module in ("mae_jax.pretrain", "mae_jax.conv_mae")
      assert os.path.dirname(recipe) == os.path.join(ROOT, "configs")
      if point["program"] == "mae" and "--config.num_steps=150" in commands[0] and not any(
          a.startswith(("--config.model.", "--config.data.augment", "--config.seed=",
                        "--config.data.repeat_samples", "--config.num_epochs="))
          for a in commands[0]):
        default_dirs.add(directory)
      if f == "pretrain_pays.py" and point["label"] == "num_epochs=2.0,seed=0,init=pretrained":
        demo = commands[0]  # the default recipe whole: the demo's pretraining
  assert len(default_dirs) == 1
  assert not any(a.startswith("--config.") for a in demo), demo


def test_conv_mae_masks_pixels_and_reconstructs_the_image_shape():
  model = conv_mae.ConvMAE((8, 16, 32), channels=1)
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  params = model.init(jax.random.key(1), x)["params"]
  assert sorted(params) == ["dec_0", "dec_1", "enc_0", "enc_1", "enc_2", "head"]
  out = model.apply({"params": params}, x)
  assert out.shape == x.shape and float(out.min()) > 0 and float(out.max()) < 1  # sigmoid
  assert model.apply({"params": params}, x, method=model.encode).shape == (4, 7, 7, 32)
  mask = conv_mae.pixel_mask(jax.random.key(2), jnp.zeros((64, 28, 28, 3)), 0.5)
  assert mask.shape == (64, 28, 28, 1) and abs(float(mask.mean()) - 0.5) < 0.01
  # The loss reconstructs from the masked input (masked pixels zeroed) and scores the
  # whole original image.
  m = conv_mae.pixel_mask(jax.random.key(4), x, 0.5)
  loss, recon = conv_mae.loss_fn(params, x, m, model)
  np.testing.assert_allclose(recon, model.apply({"params": params}, x * (1 - m)), rtol=1e-6)
  assert not np.allclose(recon, out, atol=1e-3)
  np.testing.assert_allclose(loss, jnp.mean((recon - x)**2), rtol=1e-6)


def test_conv_mae_bad_config_is_one_line():
  config = config_dict.ConfigDict(conv_config())
  with config.unlocked():
    config.data.image_size = 30
  with pytest.raises(config_lib.ConfigError, match="data.image_size: 30 is not a multiple"):
    conv_mae.validate(config, ["knn"])
  with pytest.raises(config_lib.ConfigError, match="--mode: 'finetune'"):
    conv_mae.validate(conv_config(), ["finetune"])


def conv_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("c", os.path.join(ROOT, "configs",
                                                                   "conv_mae.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_encoder_tokens_picks_the_w_mask_token_model():
  config = get_config()
  assert type(sizes.build_model(config, "cpu")) is mae.MaskedAutoencoder
  with config.unlocked():
    config.model.encoder_tokens = "all"
  model = sizes.build_model(config, "cpu")
  assert type(model) is mae.AllTokensMAE
  params = jax.jit(model.init)({"params": jax.random.key(0), "mask": jax.random.key(1)},
                               jnp.zeros((2, 28, 28, 1)))["params"]
  assert params["encoder_mask_token"].shape == (1, 1, 128)
  with config.unlocked():
    config.model.encoder_tokens = "some"
  with pytest.raises(config_lib.ConfigError, match="model.encoder_tokens"):
    sizes.check(config)


def test_train_examples_keeps_an_evenly_spaced_subset_with_the_split_stats():
  c = get_config()
  with c.unlocked():
    c.data.update(name="synthetic", synthetic_size=100, image_size=16)
  full = data.load_source(c.data, "train")
  with c.unlocked():
    c.data.train_examples = 10
  sub = data.load_source(c.data, "train")
  assert len(sub) == 10 and sub.stats() == full.stats()
  for i, j in enumerate(range(0, 100, 10)):
    np.testing.assert_array_equal(sub.get(i)[0], full.get(j)[0])
  images, labels = sub.batch([0, 3])
  np.testing.assert_array_equal(labels, [full.get(0)[1], full.get(30)[1]])
  assert len(data.load_source(c.data, "test")) == len(
      data.load_source(config_dict.ConfigDict(dict(c.data, train_examples=None)), "test"))
  with c.unlocked():
    c.data.train_examples = 0
  with pytest.raises(data.DatasetError, match="train_examples=0"):
    data.load_source(c.data, "train")


@pytest.mark.slow
def test_a_failing_point_is_reported_and_the_sweep_exits_1(tmp_path):
  """train.py refuses the point's config (exit 2): the runner names the point and its log,
  writes the (empty) table and exits 1."""
  path = write_sweep(tmp_path / "fail.py", "fail",
                     'points=[{"label": "no_visible", "overrides": {"model.mask_ratio": 0.99}}]')
  proc = run_cli(path, "--workdir", str(tmp_path / "w"))
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "no_visible: FAILED (mae_jax.pretrain exit 2)" in proc.stdout
  assert proc.stderr.strip() == "error: 1 point(s) without results: no_visible"
  (log,) = (tmp_path / "w" / "points").rglob("log.txt")
  assert "model.mask_ratio" in log.read_text()
  assert (tmp_path / "w" / "fail" / "results.csv").read_text().startswith("label,program")
