"""python -m mae_jax.prepare and data.name=prepared: counts, skipped files, exact batches,
resume after a real kill, and one-line errors for broken datasets."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax import data
from mae_jax.data import prepared
from mae_jax.tools import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(data_dir, name="prepared", channels=3):
  return ml_collections.ConfigDict(dict(name=name, data_dir=str(data_dir), manual_dir=None,
                                        channels=channels))


def smooth_image(rng, height, width, cell=8):
  """A colour field varying over `cell` pixels: JPEG keeps it close, as it does photographs."""
  coarse = rng.integers(0, 256, (height // cell + 2, width // cell + 2, 3), np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def write_jpeg_folder(root, counts=(("train", 14), ("val", 4)), size=(60, 80), seed=0):
  """root/<split>/c<k>/<i>.jpg, three classes, sizes varying around `size` (h, w)."""
  rng = np.random.default_rng(seed)
  for split, n in counts:
    for i in range(n):
      directory = root / split / f"c{i % 3}"
      directory.mkdir(parents=True, exist_ok=True)
      h, w = size[0] + i, size[1] - i
      Image.fromarray(smooth_image(rng, h, w)).save(directory / f"{i:03d}.jpg", quality=90)


def run_prepare(*args):
  return prepare.main([str(a) for a in args])


def test_prepare_counts_skips_and_shrinks(tmp_path, capsys):
  write_jpeg_folder(tmp_path / "in")
  train = tmp_path / "in" / "train"
  (train / "c0" / "empty.jpg").write_bytes(b"")
  (train / "c1" / "garbage.jpg").write_bytes(b"not an image at all")
  whole = (train / "c2" / "002.jpg").read_bytes()
  (train / "c2" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
  big = smooth_image(np.random.default_rng(5), 300, 200, cell=40)
  Image.fromarray(big).save(train / "c1" / "big.png")
  out = tmp_path / "out"
  assert run_prepare("--folder", tmp_path / "in", "--out", out, "--max_side", 100,
                     "--shard_size", 4, "--processes", 2) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  entry = manifest["splits"]["train"]
  assert entry["num_examples"] == 15 and entry["num_skipped"] == 3  # 14 + big.png
  assert {os.path.basename(p) for p in entry["skipped"]} == {"empty.jpg", "garbage.jpg",
                                                             "truncated.jpg"}
  assert manifest["splits"]["val"]["num_examples"] == 4
  assert manifest["num_classes"] == 3 and manifest["class_names"] == ["c0", "c1", "c2"]
  assert [s["file"] for s in entry["shards"]] == [f"train-0000{i}-of-00005.array_record"
                                                  for i in range(5)]
  for shard in entry["shards"]:
    digest = hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
    assert digest == shard["sha256"]
  assert "train: 15 images in 5 shards, 3 skipped" in capsys.readouterr().out
  source = data.load_source(config(out), "train")
  labels = [source[i]["label"] for i in range(len(source))]
  assert labels == sorted(labels) and set(labels) == {0, 1, 2}  # class folders in order
  records = source.records()
  shrunk = [prepared.unpack(records[i]) for i in range(len(source))
            if prepared.unpack(records[i])[1] == (300, 200)]
  assert len(shrunk) == 1 and shrunk[0][2] == (100, 67)  # original kept, stored at max side
  image = source.get([i for i in range(len(source))
                      if prepared.unpack(records[i])[1] == (300, 200)][0])[0]
  expected = np.asarray(Image.fromarray(big).resize((67, 100), Image.LANCZOS), np.float64)
  assert np.abs(image - expected).mean() < 3  # re-encoded at quality 90
  pixels = np.concatenate([source[i]["image"].reshape(-1, 3) / 255 for i in range(15)])
  np.testing.assert_allclose(source.mean, pixels.mean(0), atol=0.01)  # stats in the manifest
  np.testing.assert_allclose(source.std, pixels.std(0), atol=0.01)
  assert run_prepare("--verify", out) == 0


@pytest.mark.parametrize("repeat_samples,processes", [(1, 1), (2, 1), (1, 2)])
def test_prepared_batches_equal_the_folder_batches(tmp_path, repeat_samples, processes):
  """Stored JPEGs within max_side are the original bytes: same indices, same crops, same
  pixels as reading the folder, draft decoding (image_size well below the crops) included."""
  write_jpeg_folder(tmp_path / "in", counts=(("train", 20),), size=(150, 200))
  run_prepare("--folder", tmp_path / "in", "--out", tmp_path / "out", "--shard_size", 6,
              "--processes", 1)
  folder = data.load_source(config(tmp_path / "in", "folder"), "train")
  ours = data.load_source(config(tmp_path / "out"), "train")
  assert len(folder) == len(ours) == 18  # 2 of 20 held out as the test split
  for p in range(processes):
    kwargs = dict(image_size=24, global_batch_size=8, seed=3, repeat_samples=repeat_samples,
                  process_index=p, process_count=processes)
    a = data.make_train_batches(folder, **kwargs)
    b = data.make_train_batches(ours, **kwargs)
    for _ in range(4):  # more than an epoch
      x, y = next(a), next(b)
      np.testing.assert_array_equal(x["label"], y["label"])
      np.testing.assert_array_equal(x["image"], y["image"])


class MaeJaxPrepareImages(tfds.core.GeneratorBasedBuilder):
  """PNG-encoded RGB images in TFDS with labels; splits train and validation."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=["a", "b"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6), "validation": self._generate_examples(3)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      yield i, {"image": smooth_image(rng, 20 + i, 30, cell=15), "label": i % 2}


def test_prepare_from_tfds(tmp_path):
  MaeJaxPrepareImages(data_dir=str(tmp_path / "tfds"),
                      file_format="array_record").download_and_prepare()
  assert run_prepare("--tfds", "mae_jax_prepare_images", "--tfds_data_dir", tmp_path / "tfds",
                     "--out", tmp_path / "out", "--processes", 1) == 0
  reference = data.load_source(config(tmp_path / "tfds", "mae_jax_prepare_images"), "train")
  ours = data.load_source(config(tmp_path / "out"), "train")
  test = data.load_source(config(tmp_path / "out"), "test")  # from 'validation'
  assert len(ours) == 6 and len(test) == 3 and ours.num_classes == 2
  for i in range(6):
    assert ours[i]["label"] == reference[i]["label"]
    diff = np.abs(ours[i]["image"].astype(int) - reference[i]["image"]).mean()
    assert ours[i]["image"].shape == reference[i]["image"].shape and diff < 4


def test_prepared_train_only_holds_out_its_test_split(tmp_path):
  """A prepared folder of train/ alone: every 10th image is the test split, not trained on."""
  write_jpeg_folder(tmp_path / "in", counts=(("train", 21),), size=(20, 24))
  assert run_prepare("--folder", tmp_path / "in", "--out", tmp_path / "out",
                     "--processes", 1) == 0
  train, test = (data.load_source(config(tmp_path / "out"), s) for s in ("train", "test"))
  assert (len(train), len(test)) == (19, 2)
  assert list(test.indices) == [0, 10] and 0 not in train.indices and 10 not in train.indices
  np.testing.assert_array_equal(test[1]["image"], test.base[10]["image"])
  assert "2 of its 21 images" in test.note and test.num_classes == 3


def write_noise_folder(root, n, seed=0):
  """Large noisy JPEGs: slow to shrink and re-encode, so a run can be killed midway."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    (root / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), np.uint8)).save(
        root / "train" / f"c{i % 2}" / f"{i:04d}.jpg", quality=95)


def prepare_cmd(src, out):
  return [sys.executable, "-m", "mae_jax.prepare", "--folder", str(src), "--out", str(out),
          "--max_side", "160", "--shard_size", "4", "--processes", "1"]


@pytest.mark.slow
def test_killed_prepare_resumes(tmp_path):
  write_noise_folder(tmp_path / "in", 160)
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = tmp_path / "out"
  proc = subprocess.Popen(prepare_cmd(tmp_path / "in", out), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while time.time() < deadline and len(list(out.glob("*.done.json"))) < 3:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert not (out / "manifest.json").exists(), "the run finished before it was killed"
  # A shard is done once its .done.json is written after it; the kill may land between.
  finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")
              if (out / p.name.replace(".array_record", ".done.json")).exists()}
  assert 3 <= len(finished) < 40
  with pytest.raises(data.DatasetError, match="half-written"):
    data.load_source(config(out), "train")
  resumed = subprocess.run(prepare_cmd(tmp_path / "in", out), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resuming, {len(finished)} shards already done" in resumed.stderr
  for name, mtime in finished.items():  # done shards were not rewritten
    assert (out / name).stat().st_mtime_ns == mtime
  assert not list(out.glob("*.tmp.*"))
  clean = tmp_path / "clean"
  assert run_prepare(*prepare_cmd(tmp_path / "in", clean)[3:]) == 0
  ours, reference = (json.loads((d / "manifest.json").read_text()) for d in (out, clean))
  assert ours["splits"] == reference["splits"]  # same records, same checksums
  assert ours["splits"]["train"]["num_examples"] == 160


def test_broken_datasets_are_one_line_errors(tmp_path, capsys):
  with pytest.raises(data.DatasetError, match="not a directory"):
    data.load_source(config(tmp_path / "missing"), "train")
  (tmp_path / "empty").mkdir()
  with pytest.raises(data.DatasetError, match="not a prepared dataset"):
    data.load_source(config(tmp_path / "empty"), "train")
  write_jpeg_folder(tmp_path / "in", counts=(("train", 9),))
  out = tmp_path / "out"
  run_prepare("--folder", tmp_path / "in", "--out", out, "--shard_size", 4, "--processes", 1)
  shard = out / "train-00001-of-00003.array_record"
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(data.DatasetError, match="shard and manifest do not match") as e:
    data.load_source(config(out), "train")
  assert "\n" not in str(e.value) and "train-00001" in str(e.value)
  assert run_prepare("--verify", out) == 2
  (out / "manifest.json").unlink()
  with pytest.raises(data.DatasetError, match="half-written"):
    data.load_source(config(out), "train")
  capsys.readouterr()
  assert run_prepare("--folder", tmp_path / "in", "--out", out, "--max_side", 8) == 2
  assert run_prepare("--folder", tmp_path / "in", "--out", out, "--quality", 50,
                     "--processes", 1) == 2  # started with other settings
  assert run_prepare("--folder", tmp_path / "nowhere", "--out", out) == 2
  errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(errors) == 3
  assert "--max_side=8" in errors[0] and "quality" in errors[1] and "nowhere" in errors[2]


@pytest.mark.slow
def test_train_py_on_a_half_written_dataset_is_one_line_exit_2(tmp_path):
  write_jpeg_folder(tmp_path / "in", counts=(("train", 5),))
  run_prepare("--folder", tmp_path / "in", "--out", tmp_path / "out", "--processes", 1)
  (tmp_path / "out" / "manifest.json").unlink()
  proc = subprocess.run(
      [sys.executable, "train.py", "--workdir", str(tmp_path / "run"),
       "--config.data.name=prepared", f"--config.data.data_dir={tmp_path / 'out'}",
       "--config.data.channels=3"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert lines[-1].startswith("error: data.data_dir=") and "half-written" in lines[-1]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_trains_from_a_prepared_dataset(tmp_path):
  """data.name=prepared end to end: pretraining with repeated samples, then evaluation."""
  from configs.default import get_config  # pylint: disable=import-outside-toplevel
  from mae_jax import trainer  # pylint: disable=import-outside-toplevel
  write_jpeg_folder(tmp_path / "in", counts=(("train", 24), ("val", 8)), size=(40, 50))
  run_prepare("--folder", tmp_path / "in", "--out", tmp_path / "out", "--processes", 1)
  c = get_config()
  with c.unlocked():
    c.data.update(name="prepared", data_dir=str(tmp_path / "out"), channels=3, image_size=16,
                  repeat_samples=2)
    c.model.update(width=32, depth=1, num_heads=2, patch_size=4, decoder_width=32,
                   decoder_depth=1, decoder_heads=2)
    c.update(batch_size=8, num_steps=4, checkpoint_every_steps=2, log_every_steps=1,
             eval_batch_size=8)
    c.optim.warmup_steps = 1
  state, results = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  assert int(state.step) == 4 and np.isfinite(results["test_masked_mse"])
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert 0 <= summary["input_wait_share"] < 1
