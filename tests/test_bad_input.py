"""Every command answers bad input with one `error:` line on stderr and exit 2, before any
long work, never a traceback (docs/reliability.md, "Every command"). One table per command,
run in-process through the command's own main(argv); the files each row needs are made
here: truncated, empty, text and random-byte checkpoints, damaged workdirs, sweep files
with syntax errors, unwritable outputs.
"""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from mae_jax import trainer
from mae_jax.tools import cli
from mae_jax.tools import bench, convert, evaluate, prepare, sweep, visualize
from mae_jax.train import checkpoints, param_dirs, workdirs
from configs.eval import get_config as get_eval_config
from helpers import ROOT
from test_trainer import synthetic_config

FIELDS = dict(image_size=16, patch_size=4, channels=3, width=32, depth=1, num_heads=4,
              mlp_ratio=4.0, decoder_width=16, decoder_depth=1, decoder_heads=2,
              mask_ratio=0.75)
HEADS = ["--num_heads", "4", "--decoder_heads", "2"]


def exit_code(main, argv):
  """main(argv)'s return value, or the code of the SystemExit it raised."""
  try:
    return main(argv)
  except SystemExit as e:
    return e.code


def assert_one_line(capsys, expected):
  """stderr is exactly one `error: ...` line containing each of `expected`."""
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  for fragment in expected if isinstance(expected, tuple) else (expected,):
    assert fragment in lines[0], lines[0]
  return lines[0]


def official_state(fields=FIELDS):
  rng = np.random.default_rng(0)
  state = {k: rng.standard_normal(s).astype(np.float32) * 0.05
           for k, s in convert.official_shapes(fields, True).items()}
  state.update(convert.sincos_tables(fields, True))
  return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Good and bad inputs for every table: {name: path}."""
  root = tmp_path_factory.mktemp("inputs")
  good = root / "good.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in official_state().items()}}, good)
  data = good.read_bytes()
  paths = {"root": root, "good": good}
  contents = {"truncated": data[:len(data) // 2], "empty": b"", "text": b"hello\n",
              "fake_zip": b"PK\x03\x04" + b"\0" * 100,
              "random": np.random.default_rng(1).bytes(5000)}
  for name, content in contents.items():
    paths[name] = root / f"{name}.pth"
    paths[name].write_bytes(content)
  paths["pickled_object"] = root / "module.pth"
  torch.save(torch.nn.Linear(2, 2), paths["pickled_object"])
  paths["list"] = root / "list.pth"
  torch.save([torch.zeros(2)], paths["list"])
  paths["params"] = root / "params"
  assert convert.main(["import", str(good), str(paths["params"]), *HEADS]) == 0
  hf = root / "hf"
  hf.mkdir()
  (hf / "config.json").write_text("{not json")
  paths["hf_bad_config"] = hf
  hf2 = root / "hf2"
  hf2.mkdir()
  (hf2 / "config.json").write_text("{}")
  (hf2 / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{broken")
  paths["hf_bad_weights"] = hf2
  paths["readonly"] = read_only_dir(root / "readonly")
  paths["file"] = root / "a_file"
  paths["file"].write_text("not a directory")
  yield paths
  if os.geteuid() == 0:
    subprocess.run(["chattr", "-i", str(paths["readonly"])], check=False)


def read_only_dir(path):
  """A folder no one may write into: mode 0555 and, as root (whom modes do not bind), the
  immutable attribute."""
  path.mkdir()
  os.chmod(path, 0o555)
  if os.geteuid() == 0:
    subprocess.run(["chattr", "+i", str(path)], check=True)
  assert not os.access(path, os.W_OK)
  return path


def fill(args, files):
  return [a.format(**{k: str(v) for k, v in files.items()}) for a in args]


CONVERT_CASES = [
    (["import", "{root}/missing.pth", "{root}/o1"], "missing.pth: not found"),
    (["import", "{truncated}", "{root}/o2"], ("truncated.pth: not a readable PyTorch "
                                              "checkpoint", "truncated")),
    (["import", "{empty}", "{root}/o3"], ("empty.pth: not a readable PyTorch checkpoint",
                                          "(0 bytes")),
    (["import", "{text}", "{root}/o4"], "text.pth: not a readable PyTorch checkpoint"),
    (["import", "{fake_zip}", "{root}/o5"], "fake_zip.pth: not a readable PyTorch checkpoint"),
    (["import", "{random}", "{root}/o6"], "random.pth: not a readable PyTorch checkpoint"),
    (["import", "{pickled_object}", "{root}/o7"], ("holds a torch.nn.modules.linear.Linear "
                                                   "object", "re-save just the state dict")),
    (["import", "{list}", "{root}/o8"], "expected a state dict under 'model'"),
    (["import", "{root}", "{root}/o9", "--format", "official"], "is a directory"),
    (["import", "{good}", "{root}/o10", "--format", "hf"], "is a file"),
    (["import", "{hf_bad_config}", "{root}/o11"], ("config.json: unreadable Hugging Face "
                                                   "config")),
    (["import", "{hf_bad_weights}", "{root}/o12"], "not a readable safetensors file"),
    (["import", "{good}", "{params}"], "already exists"),
    (["import", "{good}", "{root}/no/such/dir/out"], "does not exist; create it first"),
    (["import", "{good}", "{root}/o13", "--num_heads", "0"], "--num_heads: '0' is not valid"),
    (["import", "{good}", "{root}/o14", "--mask_ratio", "nan"], "--mask_ratio: 'nan'"),
    (["import", "{good}", "{root}/o15", "--num_heads", "3"], "does not divide the width"),
    (["export", "{root}/missing", "{root}/x.pth"], "missing: not found"),
    (["export", "{good}", "{root}/x.pth"], "is a file; expected a parameter directory"),
    (["export", "{root}", "{root}/x.pth"], "neither a parameter directory"),
    (["export", "{params}", "{good}"], "exists; pass --overwrite"),
    (["export", "{params}", "{root}/no/such/x.pth"], "does not exist; create it first"),
    (["export", "{params}", "{file}", "--format", "hf", "--overwrite"], "is a file"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("args,expected", CONVERT_CASES,
                         ids=[f"{i}-{c[0][0]}" for i, c in enumerate(CONVERT_CASES)])
def test_convert_bad_input(files, capsys, args, expected):
  before = sorted(os.listdir(files["root"]))
  assert exit_code(convert.main, fill(args, files)) == 2
  assert_one_line(capsys, expected)
  assert sorted(os.listdir(files["root"])) == before  # no output left behind


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("run") / "w"
  trainer.train_and_evaluate(synthetic_config(num_steps=2, eval_batch_size=64), str(path))
  return path


def damaged_copy(workdir, dest, damage):
  """A copy of `workdir` whose step-2 checkpoint is damaged in one way."""
  shutil.copytree(workdir, dest)
  step_dir = dest / "checkpoints" / "2"
  if damage == "truncated":
    files = sorted((p for p in step_dir.rglob("*") if p.is_file()
                    and p.name != checkpoints.MANIFEST), key=lambda p: p.stat().st_size)
    files[-1].write_bytes(files[-1].read_bytes()[:files[-1].stat().st_size // 2])
  elif damage == "unmanifested_truncated":  # no manifest to catch it: Orbax's own error
    (step_dir / checkpoints.MANIFEST).unlink()
    for p in step_dir.rglob("*"):
      if p.is_file() and p.stat().st_size > 1000:
        p.write_bytes(p.read_bytes()[:100])
  elif damage == "bad_config":  # the saved config (the latest launch's) is not a dict
    for path in [dest / "config.json", *workdirs.launch_configs(dest)]:
      open(path, "w").write("[1, 2]")
  return dest


VISUALIZE_CASES = [
    (["{run}", "--out", "{root}/no/such/dir/v.png"], "does not exist; create it first"),
    (["{run}", "--out", "{readonly}/v.png"], "not writable"),
    (["{run}", "--out", "{root}"], "is a directory"),
    (["{run}", "--out", "{root}/v.jpg"], "expected a .png file name"),
    (["{truncated_run}", "--out", "{root}/v.png"], ("checkpoint step 2 is damaged",
                                                    "is truncated")),
    (["{unmanifested_run}", "--out", "{root}/v.png"], "checkpoint step 2 in"),
    (["{bad_config_run}", "--out", "{root}/v.png"], "expected a JSON object"),
    (["{run}", "--step", "7", "--out", "{root}/v.png"], "no checkpoint of step 7"),
    (["{run}", "--num_images", "0", "--out", "{root}/v.png"], "--num_images: '0'"),
    (["{run}", "--mask_ratio", "1", "--out", "{root}/v.png"], "--mask_ratio: '1'"),
    (["{run}", "--images", "{root}/none", "--out", "{root}/v.png"], "no such file"),
    (["{root}", "--out", "{root}/v.png"], "neither a train.py workdir"),
    (["{params}", "--out", "{root}/v.png"], "pass --images"),
]


@pytest.fixture(scope="module")
def runs(workdir, files, tmp_path_factory):
  root = tmp_path_factory.mktemp("damaged")
  return dict(files, run=workdir,
              truncated_run=damaged_copy(workdir, root / "t", "truncated"),
              unmanifested_run=damaged_copy(workdir, root / "u", "unmanifested_truncated"),
              bad_config_run=damaged_copy(workdir, root / "c", "bad_config"))


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", VISUALIZE_CASES,
                         ids=[str(i) for i in range(len(VISUALIZE_CASES))])
def test_visualize_bad_input(runs, capsys, args, expected):
  assert exit_code(visualize.main, fill(args, runs)) == 2
  assert_one_line(capsys, expected)
  assert not os.path.exists(runs["root"] / "v.png")


EVALUATE_CASES = [
    ("", {}, "--workdir: empty"),
    ("{truncated_run}", {}, ("checkpoint step 2 is damaged", "is truncated")),
    ("{unmanifested_run}", {}, "cannot be restored"),
    ("{bad_config_run}", {}, "expected a JSON object"),
    ("{file}", {}, "is a file"),
    ("{readonly}/new", {"params": "{params}", "data.name": "synthetic"}, "permission denied"),
    ("{root}/missing/new", {"params": "{params}", "data.name": "synthetic"},
     "does not exist"),
    ("{run}", {"checkpoint_step": 9}, "no checkpoint of step 9"),
    ("{root}", {"params": "{root}/missing"}, "neither a train.py workdir"),
    ("{root}", {}, "has no config.json"),
]


@pytest.mark.slow
@pytest.mark.parametrize("workdir_arg,fields,expected", EVALUATE_CASES,
                         ids=[str(i) for i in range(len(EVALUATE_CASES))])
def test_evaluate_bad_input(runs, capsys, workdir_arg, fields, expected):
  config = get_eval_config()
  for key, value in fields.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value.format(**{k: str(v) for k, v in runs.items()}) if isinstance(
        value, str) else value
  workdir_arg = workdir_arg.format(**{k: str(v) for k, v in runs.items()})
  assert evaluate.command(config, workdir_arg, "knn") == 2
  assert_one_line(capsys, expected)


BENCH_CASES = [
    (["--steps", "0"], "--steps=0: 0 is not a positive integer"),
    (["--config.batch_size=-4"], "config.batch_size: -4 is not a positive multiple"),
    (["--warmup", "-1"], "--warmup=-1: -1 is not a non-negative integer"),
    (["--peak_tflops", "inf"], "--peak_tflops: expected a positive, finite number"),
    (["--config.model.mask_ratio=1.5"], "config.model.mask_ratio: 1.5 must be in (0, 1)"),
    (["--config.data.image_size=0"], "config.data.image_size: 0 must be an int >= 1"),
    (["--config.model.variant=Q/16"], "config.model.variant='Q/16'"),
    (["--config.model.dtype=float8"], "config.model.dtype: 'float8' is not valid"),
    (["--config.model.remat=sometimes"], "config.model.remat: 'sometimes' is not valid"),
    (["--config.batch_sise=8"], "config.batch_sise: unknown field 'batch_sise'; did you mean"),
    (["--variant", "B/16"], "--variant: unknown flag; the benchmark takes a recipe"),
    (["--config", "{root}/syntax.py"], ("syntax.py:2: syntax error",)),
    (["--config", "{root}/raises.py"], "fails to load (RuntimeError: boom)"),
    (["--config", "{root}/missing.py"], "missing.py: no such file"),
    (["--config", "{root}"], "is a directory"),
    (["--config", "{root}/no_get.py"], "defines no get_config()"),
    (["--config", "{root}/not_a_recipe.py"], "must return a ConfigDict with an optim block"),
    (["--config.data.image_size=30", "--config.model.variant=Ti/16"],
     "config.data.image_size: 30"),
]


@pytest.fixture(scope="module")
def recipes(files):
  root = files["root"]
  (root / "syntax.py").write_text("def get_config():\n  return (\n")
  (root / "raises.py").write_text("raise RuntimeError('boom')\n")
  (root / "no_get.py").write_text("x = 1\n")
  (root / "not_a_recipe.py").write_text("def get_config():\n  return {'a': 1}\n")
  return files


@pytest.mark.parametrize("args,expected", BENCH_CASES,
                         ids=[str(i) for i in range(len(BENCH_CASES))])
def test_bench_bad_input(recipes, capsys, args, expected):
  assert exit_code(bench.main, fill(args, recipes)) == 2
  assert_one_line(capsys, expected)


SWEEP_CASES = [
    ("def get_sweep(:\n", ("bad.py:1: syntax error",)),
    ("raise ValueError('oops')\n", "fails to load (ValueError: oops)"),
    ("x = 1\n", "defines no get_sweep()"),
    ("def get_sweep():\n  return 1 / 0\n", "get_sweep() fails (ZeroDivisionError"),
    ("def get_sweep():\n  return [1]\n", "returned a list; expected a dict"),
    ("def get_sweep():\n  return {'name': 'x', 'axes': {'model.mask_ratio': 0.5}}\n",
     "axes['model.mask_ratio'] is 0.5; expected a non-empty list"),
    ("def get_sweep():\n  return {'name': 'x', 'axes': [1]}\n", "axes is [1]; expected a dict"),
    ("def get_sweep():\n  return {'name': 'x', 'points': ['a']}\n", "expected a list of dicts"),
    ("def get_sweep():\n  return {'name': 'x', 'evals': ['knn'], 'axes': {'seed': [1]}}\n",
     "evals is ['knn']; expected a comma-separated string"),
    ("def get_sweep():\n  return {'name': 'x', 'overrides': 3, 'axes': {'seed': [1]}}\n",
     "overrides is 3; expected a dict"),
    ("def get_sweep():\n  return {'name': 'x', 'base': 'nope.py', 'axes': {'seed': [1]}}\n",
     "nope.py: no such file"),
    ("def get_sweep():\n  return {'name': 'x', 'base': '{root}/syntax.py', "
     "'axes': {'seed': [1]}}\n", "syntax.py:2: syntax error"),
]


@pytest.mark.parametrize("source,expected", SWEEP_CASES,
                         ids=[str(i) for i in range(len(SWEEP_CASES))])
def test_sweep_bad_input(recipes, tmp_path, capsys, source, expected):
  path = tmp_path / "bad.py"
  path.write_text(source.replace("{root}", str(recipes["root"])))
  assert exit_code(sweep.main, [str(path), "--workdir", str(tmp_path / "w")]) == 2
  assert_one_line(capsys, expected)
  assert not (tmp_path / "w").exists()


def test_sweep_bad_workdir(recipes, tmp_path, capsys):
  path = tmp_path / "ok.py"
  path.write_text("def get_sweep():\n  return {'name': 'x', 'evals': '', "
                  "'axes': {'seed': [1]}}\n")
  for workdir, expected in (("", "--workdir: empty"),
                            (str(recipes["file"]), "cannot make"),
                            (str(recipes["readonly"]), "cannot make")):
    assert exit_code(sweep.main, [str(path), "--workdir", workdir, "--commands"]) == 2
    assert_one_line(capsys, expected)
  assert exit_code(sweep.main, [str(path), "--workdir", str(tmp_path / "w"),
                                "--commands"]) is None  # the same file works elsewhere


PREPARE_CASES = [
    ([], "one of the arguments --folder --tfds --verify is required"),
    (["--folder", "{images}"], "--out: required"),
    (["--folder", "{root}/nowhere", "--out", "{root}/p0"], "nowhere: not a directory"),
    (["--folder", "{file}", "--out", "{root}/p0"], "a_file: not a directory"),
    (["--folder", "{root}/hf", "--out", "{root}/p0"], "hf: no images"),
    (["--folder", "{images}", "--out", "{file}"], "a_file: is a file"),
    (["--folder", "{images}", "--out", "{file}/sub/dir"], "a_file is a file"),
    (["--folder", "{images}", "--out", "{readonly}/p"], "not writable"),
    (["--folder", "{images}", "--out", "{root}/p0", "--max_side", "0"], "--max_side=0"),
    (["--folder", "{images}", "--out", "{root}/p0", "--max_side", "big"],
     "--max_side: invalid int value: 'big'"),
    (["--folder", "{images}", "--out", "{root}/p0", "--quality", "101"], "--quality=101"),
    (["--folder", "{images}", "--out", "{root}/p0", "--shard_size", "0"], "--shard_size=0"),
    (["--folder", "{images}", "--out", "{root}/p0", "--processes", "-1"], "--processes=-1"),
    (["--folder", "{images}", "--tfds", "mnist", "--out", "{root}/p0"],
     "not allowed with argument --folder"),
    (["--tfds", "no_such_dataset", "--tfds_data_dir", "{root}/hf", "--out", "{root}/p0"],
     "'no_such_dataset': unknown dataset"),
    (["--verify", "{root}/nowhere"], "not a prepared dataset"),
    (["--verify", "{images}"], "not a prepared dataset"),
]


@pytest.fixture(scope="module")
def image_folder(files):
  """files + `images`: a folder of one JPEG in train/c/."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  (files["root"] / "images" / "train" / "c").mkdir(parents=True)
  Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(
      files["root"] / "images" / "train" / "c" / "a.jpg")
  return dict(files, images=files["root"] / "images")


@pytest.mark.parametrize("args,expected", PREPARE_CASES,
                         ids=[str(i) for i in range(len(PREPARE_CASES))])
def test_prepare_bad_input(image_folder, capsys, args, expected):
  assert exit_code(prepare.main, fill(args, image_folder)) == 2
  assert_one_line(capsys, expected)
  assert not os.path.exists(image_folder["root"] / "p0")  # nothing made


CONV_CASES = [
    ([], "Flag --workdir must have a value"),
    (["--workdir", "{file}"], "a_file': expected a directory"),
    (["--workdir", "{root}/c0", "--mode", "finetune"], "--mode: 'finetune'"),
    (["--workdir", "{root}/c0", "--config.batch_size=0"], "config.batch_size: 0"),
    (["--workdir", "{root}/c0", "--config.model.widht=3"], "unknown field 'widht'"),
    (["--workdir", "{root}/c0", "--config", "{root}/raises.py"],
     "raises.py:1: RuntimeError: boom"),
    (["--workdir", "{root}/c0", "--eval_config", "{root}/missing.py"], "No such file"),
]


@pytest.mark.slow
def test_conv_mae_bad_input(recipes, tmp_path):
  """python -m mae_jax.conv_mae, run from a directory without configs/ (its default recipes
  are the installed ones): one line and exit 2 per row, nothing made."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for args, expected in CONV_CASES:
    proc = subprocess.run([sys.executable, "-m", "mae_jax.conv_mae", *fill(args, recipes)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr[-2000:])
    assert lines[0].startswith("error: ") and expected in lines[0], (args, lines)
    assert not os.path.exists(recipes["root"] / "c0")


def test_default_recipes_are_found_outside_a_checkout(tmp_path, monkeypatch):
  """A command's default --config: configs/<name> of the working directory where there is
  one, else the one installed beside mae_jax, so the console scripts run anywhere."""
  monkeypatch.chdir(tmp_path)
  installed = cli.default_recipe("default.py")
  assert os.path.isabs(installed) and os.path.isfile(installed)
  assert open(installed).read() == open(os.path.join(ROOT, "configs", "default.py")).read()
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "default.py").write_text("# the user's own copy\n")
  assert cli.default_recipe("default.py") == os.path.join("configs", "default.py")
  assert cli.default_recipe("eval.py") == os.path.join(ROOT, "configs", "eval.py")


def test_train_empty_workdir_creates_nothing(tmp_path, monkeypatch):
  """`train.py --workdir ""` would mean the current directory: refused, nothing made."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(checkpoints.CheckpointError, match="--workdir: empty"):
    trainer.train_and_evaluate(synthetic_config(), "")
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_convert_export_of_a_train_workdir(workdir, tmp_path, capsys):
  """`convert export WORKDIR out.pth` writes the run's latest checkpoint's params in the
  official layout, and they import back to the same values."""
  from mae_jax.train import pretrained
  assert convert.main(["export", str(workdir), str(tmp_path / "run.pth")]) == 0
  assert "the params of checkpoint step 2" in capsys.readouterr().out
  assert convert.main(["import", str(tmp_path / "run.pth"), str(tmp_path / "back"),
                       "--num_heads", "2", "--decoder_heads", "2"]) == 0
  back, _ = param_dirs.load_params(str(tmp_path / "back"))
  ours = pretrained.load(str(workdir)).params
  flat_back = dict(jax.tree_util.tree_leaves_with_path(back))
  for path, value in jax.tree_util.tree_leaves_with_path(ours):
    np.testing.assert_array_equal(np.asarray(flat_back[path]), np.asarray(value),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("argv,says", [
    (["-m", "mae_jax.evaluate", "--workdir", "{tmp}", "--mode", "knn"],
     "has no config.json (not a train.py workdir)"),
    (["train.py", "--workdir", "{tmp}/run", "--config.data.name=folder",
      "--config.data.data_dir={tmp}/a_file"], "data.data_dir"),
])
def test_libtpu_adds_nothing_to_a_commands_stderr(tmp_path, argv, says):
  """With libtpu installed (the test extra has it) on a host without TPU chips, a command's
  bad input is the one line of its stderr, not the sixth after libtpu's errors."""
  from mae_jax import checks  # pylint: disable=g-import-not-at-top
  assert not checks.has_tpu_chips()
  (tmp_path / "a_file").write_text("x")
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  proc = subprocess.run([sys.executable, *[a.format(tmp=tmp_path) for a in argv]], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
  assert says in proc.stderr


def test_a_host_is_told_apart_by_its_pci_devices(tmp_path):
  """has_tpu_chips reads the PCI vendor ids: Google's (0x1ae0) is a TPU chip."""
  from mae_jax import checks  # pylint: disable=g-import-not-at-top
  for name, vendor in (("0000:00:04.0", "0x8086"), ("0000:00:05.0", "0x10de")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "vendor").write_text(vendor + "\n")
  assert not checks.has_tpu_chips(str(tmp_path))
  (tmp_path / "0000:00:06.0").mkdir()
  (tmp_path / "0000:00:06.0" / "vendor").write_text("0x1ae0\n")
  assert checks.has_tpu_chips(str(tmp_path))
  assert not checks.has_tpu_chips(str(tmp_path / "missing"))
