"""mae_jax.data: sources (IDX, folder, TFDS, synthetic) and the resumable host pipeline."""
import gzip
import math
import os
import shutil
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax import data
from mae_jax.data import augment, decode, idx, pipeline
from mae_jax.data.source import ArraySource

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def config(**overrides):
  fields = dict(name="fashion_mnist", data_dir=None, manual_dir=None, channels=1,
                synthetic_size=64, image_size=12)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def id_source(n=53, size=12, channels=1, seed=0):
  """Random images whose label is their index, so batches show which examples they hold."""
  images = np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8)
  return ArraySource(images, np.arange(n), channels=channels, num_classes=n)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# --- IDX / Fashion-MNIST ------------------------------------------------------------------


def write_idx(path, array, compress):
  codes = {np.uint8: 0x08, np.int32: 0x0C}
  header = bytes([0, 0, codes[array.dtype.type], array.ndim])
  raw = header + np.array(array.shape, ">u4").tobytes() + array.astype(
      array.dtype.newbyteorder(">")).tobytes()
  with (gzip.open if compress else open)(path + (".gz" if compress else ""), "wb") as f:
    f.write(raw)


def write_fashion_mnist(directory, compress, n_train=12, n_test=5):
  rng = np.random.default_rng(1)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    arrays[split] = (rng.integers(0, 256, (n, 28, 28), np.uint8),
                     rng.integers(0, 10, (n,), np.uint8))
    for name, array in zip(idx.FILES[split], arrays[split]):
      write_idx(os.path.join(directory, name), array, compress)
  return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_gz_and_plain(tmp_path, compress):
  values = np.arange(-60, 60, dtype=np.int32).reshape(4, 5, 6) * 1000
  write_idx(str(tmp_path / "x-idx3"), values, compress)
  out = idx.read_idx(str(tmp_path / ("x-idx3" + (".gz" if compress else ""))))
  assert out.shape == (4, 5, 6) and out.dtype == np.int32
  np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_idx_dir(tmp_path, compress):
  arrays = write_fashion_mnist(str(tmp_path), compress)
  for split, n in (("train", 12), ("test", 5)):
    source = data.load_source(config(data_dir=str(tmp_path)), split)
    assert len(source) == n and source.num_classes == 10
    images, labels = arrays[split]
    for i in (0, n - 1):
      np.testing.assert_array_equal(source[i]["image"], images[i][..., None])
      assert source[i]["label"] == labels[i]
    assert source.mean == (0.2860,) and source.std == (0.3530,)
  rgb = data.load_source(config(data_dir=str(tmp_path), channels=3), "test")
  assert rgb[2]["image"].shape == (28, 28, 3)
  np.testing.assert_array_equal(rgb[2]["image"], np.repeat(arrays["test"][0][2][..., None], 3, -1))
  assert rgb.mean == (0.2860,) * 3


def test_idx_bad_header_names_the_file(tmp_path):
  path = tmp_path / "broken-idx"
  path.write_bytes(b"\x12\x34\x08\x01" + bytes(8))
  with pytest.raises(data.DatasetError, match="broken-idx: not an IDX file"):
    idx.read_idx(str(path))
  write_idx(str(tmp_path / "short"), np.zeros((3, 4), np.uint8), compress=False)
  with open(tmp_path / "short", "ab") as f:
    f.write(b"\0")
  with pytest.raises(data.DatasetError, match=r"short: header says shape \(3, 4\)"):
    idx.read_idx(str(tmp_path / "short"))


def test_real_fashion_mnist_package():
  if not idx.has_idx_files(FASHION_MNIST_DIR):
    pytest.skip(f"Debian package dataset-fashion-mnist not installed ({FASHION_MNIST_DIR})")
  train, test = (data.load_source(config(), split) for split in ("train", "test"))
  assert (len(train), len(test)) == (60000, 10000)
  for source in (train, test):
    assert source[0]["image"].shape == (28, 28, 1) and source[0]["image"].dtype == np.uint8
  assert sorted(set(test.labels.tolist())) == list(range(10))
  assert np.bincount(train.labels).tolist() == [6000] * 10  # Fashion-MNIST is balanced
  assert abs(train.images.mean() / 255 - 0.2860) < 1e-3


# --- Training batches: the exactness contract -----------------------------------------------


def train_batches(source, **kwargs):
  args = dict(image_size=12, global_batch_size=8, seed=3, augment="crop_flip")
  args.update(kwargs)
  return data.make_train_batches(source, **args)


def test_resume_equals_continuation():
  source = id_source()  # 53 examples, batch 8: 6 steps per epoch, epochs cross at 6, 12
  full = take(train_batches(source), 16)
  resumed = take(train_batches(source, start_step=7), 9)
  assert_batches_equal(full[7:], resumed)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_process_slices_concatenate_to_the_global_batch(num_workers):
  source = id_source()
  whole = take(train_batches(source), 8)
  parts = [take(train_batches(source, process_index=p, process_count=2,
                              num_workers=num_workers), 8) for p in range(2)]
  for step, batch in enumerate(whole):
    assert parts[0][step]["image"].shape == (4, 12, 12, 1)
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key])


def test_each_epoch_is_a_new_permutation():
  source = id_source(n=53)
  steps_per_epoch = 53 // 8
  batches = take(train_batches(source, augment="none"), 3 * steps_per_epoch)
  epochs = [np.concatenate([b["label"] for b in batches[e * 6:(e + 1) * 6]]) for e in range(3)]
  for order in epochs:
    assert len(order) == 48 and len(set(order.tolist())) == 48  # each example at most once
    assert set(order.tolist()) <= set(range(53))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  # augment='none' keeps the pixels: each image is its example's image
  np.testing.assert_array_equal(batches[0]["image"], source.images[batches[0]["label"]])


def test_divisible_epochs_hold_every_example_once():
  source = id_source(n=48)
  batches = take(train_batches(source), 12)
  for e in range(2):
    labels = np.concatenate([b["label"] for b in batches[e * 6:(e + 1) * 6]])
    assert sorted(labels.tolist()) == list(range(48))


def test_crop_flip_shapes_determinism_and_seed():
  source = id_source(size=20, channels=3)
  a = take(train_batches(source, image_size=16), 3)
  b = take(train_batches(source, image_size=16), 3)
  other = take(train_batches(source, image_size=16, seed=4), 3)
  assert a[0]["image"].shape == (8, 16, 16, 3) and a[0]["image"].dtype == np.uint8
  assert a[0]["label"].shape == (8,) and a[0]["label"].dtype == np.int32
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["image"], other[0]["image"])


def test_flip_mirrors_the_same_crop():
  source = id_source(size=20)
  crop = take(train_batches(source, augment="crop"), 4)
  flip = take(train_batches(source, augment="crop_flip"), 4)
  flipped = 0
  for c, f in zip(crop, flip):
    np.testing.assert_array_equal(c["label"], f["label"])
    for x, y in zip(c["image"], f["image"]):
      mirrored = np.array_equal(y, x[:, ::-1])
      assert mirrored or np.array_equal(y, x)
      flipped += mirrored
  assert 0 < flipped < 32  # p = 0.5 over 32 examples


def torchvision_get_params(height, width, draws, scale, ratio=augment.RATIO):
  """torchvision.transforms.RandomResizedCrop.get_params, fed our uniform draws."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for a in range(augment.ATTEMPTS):
    target = area * (scale[0] + (scale[1] - scale[0]) * draws[augment.SCALE][a])
    aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[augment.LOG_RATIO][a])
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(draws[augment.TOP] * (height - h + 1))
      left = int(draws[augment.LEFT] * (width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def test_random_resized_crop_boxes_match_torchvision():
  rng = np.random.default_rng(0)
  sizes = np.array([[28, 28], [40, 30], [7, 90], [90, 5], [1, 1], [224, 300]] * 50)
  draws = rng.random((len(sizes), augment.NUM_DRAWS))
  for scale in ((0.2, 1.0), (0.9, 1.0)):
    boxes = augment.random_resized_crop_boxes(sizes, draws, scale)
    expected = [torchvision_get_params(h, w, d, scale) for (h, w), d in zip(sizes, draws)]
    np.testing.assert_array_equal(boxes, np.array(expected))
  assert (boxes[:, 0] + boxes[:, 2] <= sizes[:, 0]).all()
  assert (boxes[:, 1] + boxes[:, 3] <= sizes[:, 1]).all()


@pytest.mark.parametrize("height,width,size", [(28, 28, 28), (28, 28, 16), (20, 37, 48)])
def test_vectorised_resize_matches_pil_float_bicubic(height, width, size):
  """In-memory batches are resized in numpy; PIL's float ('F') bicubic is the reference."""
  rng = np.random.default_rng(size)
  images = rng.integers(0, 256, (32, height, width, 1), np.uint8)
  boxes = augment.random_resized_crop_boxes(np.tile([height, width], (32, 1)),
                                            rng.random((32, augment.NUM_DRAWS)), (0.2, 1.0))
  out = augment.crop_resize_array(images, boxes, size)
  for image, (top, left, h, w), o in zip(images, boxes, out):
    ref = Image.fromarray(image[..., 0].astype(np.float32), "F").resize(
        (size, size), augment.RESAMPLE, box=(left, top, left + w, top + h))
    np.testing.assert_allclose(o[..., 0], np.clip(np.rint(np.asarray(ref)), 0, 255), atol=1)
  listed = np.stack([augment.crop_resize(i, b, size) for i, b in zip(images, boxes)])
  assert np.abs(listed.astype(int) - out).mean() < 0.5  # PIL's uint8 path: fixed point


def test_bad_train_arguments():
  source = id_source()
  with pytest.raises(ValueError, match="data.augment='flip'.*none, crop, crop_flip"):
    train_batches(source, augment="flip")
  with pytest.raises(data.DatasetError, match="larger than the 53 training examples"):
    train_batches(source, global_batch_size=64)
  with pytest.raises(ValueError, match="multiple of process_count=3"):
    train_batches(source, process_count=3)


# --- Folder of images -----------------------------------------------------------------------


def write_folder(root):
  """root/{train,test}/{cat,dog}/ with gray, RGB, RGBA PNGs and a JPEG of odd sizes."""
  rng = np.random.default_rng(2)
  arrays = {}
  for split in ("train", "test"):
    for cls in ("dog", "cat"):
      os.makedirs(root / split / cls)
    specs = {"cat/a_gray.png": (17, 23), "cat/b_rgb.png": (30, 41, 3),
             "dog/c_rgba.png": (31, 31, 4), "dog/d_rgb.jpg": (40, 30, 3)}
    for name, shape in specs.items():
      array = rng.integers(0, 256, shape, np.uint8)
      Image.fromarray(array).save(root / split / name)
      arrays[split, name] = array
  return arrays


def test_folder_rgb_and_gray(tmp_path):
  arrays = write_folder(tmp_path)
  rgb = data.load_source(config(name="folder", data_dir=str(tmp_path), channels=3), "test")
  assert len(rgb) == 4 and rgb.num_classes == 2
  assert [rgb[i]["label"] for i in range(4)] == [0, 0, 1, 1]  # cat, cat, dog, dog (sorted)
  gray, color, rgba = (arrays["test", n] for n in ("cat/a_gray.png", "cat/b_rgb.png",
                                                   "dog/c_rgba.png"))
  np.testing.assert_array_equal(rgb[0]["image"], np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(rgb[1]["image"], color)
  np.testing.assert_array_equal(rgb[2]["image"], rgba[..., :3])
  assert rgb[3]["image"].shape == (40, 30, 3)
  one = data.load_source(config(name="folder", data_dir=str(tmp_path), channels=1), "train")
  np.testing.assert_array_equal(one[0]["image"][..., 0], arrays["train", "cat/a_gray.png"])
  expected = np.asarray(Image.fromarray(arrays["train", "cat/b_rgb.png"]).convert("L"))
  np.testing.assert_array_equal(one[1]["image"][..., 0], expected)
  assert all(one[i]["image"].shape[-1] == 1 for i in range(4))


def test_folder_batches_in_worker_threads(tmp_path):
  write_folder(tmp_path)
  source = data.load_source(config(name="folder", data_dir=str(tmp_path), channels=3), "train")
  inline = take(train_batches(source, global_batch_size=2, image_size=16), 6)
  threaded = take(train_batches(source, global_batch_size=2, image_size=16, num_workers=2), 6)
  assert_batches_equal(inline, threaded)
  assert inline[0]["image"].shape == (2, 16, 16, 3)
  assert len(source.mean) == 3 and all(0 < m < 1 for m in source.mean)


def test_flat_folder_has_no_labels(tmp_path):
  for i, shape in enumerate([(9, 9), (12, 5, 3), (7, 8)]):
    Image.fromarray(np.full(shape, 10 * i, np.uint8)).save(tmp_path / f"{i}.png")
  source = data.load_source(config(name="folder", data_dir=str(tmp_path)), "train")
  assert len(source) == 2 and source.num_classes is None  # one of 3 held out as the test
  assert [source[i]["label"] for i in range(2)] == [-1, -1]


@pytest.mark.parametrize("layout", ["train", "classes"])
def test_folder_without_a_test_folder_holds_out_a_test_split(tmp_path, layout):
  """root/train/<class>/* alone, or root/<class>/*: every 10th image of the sorted list is
  the test split and is not trained on; the two splits partition the folder."""
  top = tmp_path / "train" if layout == "train" else tmp_path
  for cls, count in (("a", 12), ("b", 13)):
    (top / cls).mkdir(parents=True)
    for i in range(count):
      Image.fromarray(np.full((4, 4), i, np.uint8)).save(top / cls / f"{i:02d}.png")
  cfg = config(name="folder", data_dir=str(tmp_path))
  train, test = (data.load_source(cfg, split) for split in ("train", "test"))
  assert (len(train), len(test)) == (23, 2)
  assert set(train.paths).isdisjoint(test.paths)
  assert sorted(train.paths + test.paths) == sorted(str(p) for p in top.rglob("*.png"))
  # evenly spaced over the sorted list, so both classes are in the test split
  assert [os.path.relpath(p, top) for p in test.paths] == ["a/00.png", "b/00.png"]
  assert test.num_classes == train.num_classes == 2
  assert "has no test split: 2 of its 25 images" in test.note and test.note == train.note
  shutil.rmtree(top / "b")  # a folder of one image cannot be split
  for f in list((top / "a").iterdir())[1:]:
    f.unlink()
  with pytest.raises(data.DatasetError, match="1 image.*at least 2"):
    data.load_source(cfg, "test")


# --- TFDS -----------------------------------------------------------------------------------


class MaeJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """RGB images of varied sizes; splits train and validation (no test, like imagenet2012)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(10, 0), "validation": self._generate_examples(4, 1)}

  def _generate_examples(self, n, seed):
    for i, image in enumerate(tiny_images(n, seed)):
      yield i, {"image": image, "label": i % 3}


def tiny_images(n, seed):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (8 + i, 10, 3), np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  MaeJaxTinyImages(data_dir=str(directory), file_format="array_record").download_and_prepare()
  return str(directory)


def test_tfds_source(tfds_dir):
  train = data.load_source(config(name="mae_jax_tiny_images", data_dir=tfds_dir, channels=3),
                           "train")
  test = data.load_source(config(name="mae_jax_tiny_images", data_dir=tfds_dir, channels=3),
                          "test")  # no 'test' split: read from 'validation'
  assert (len(train), len(test), train.num_classes) == (10, 4, 3)
  images = tiny_images(4, 1)
  for i in range(4):  # TFDS shuffles by key; the height (8 + i) says which example it is
    k = test[i]["image"].shape[0] - 8
    np.testing.assert_array_equal(test[i]["image"], images[k])  # PNG: lossless
    assert test[i]["label"] == k % 3
  assert sorted(test[i]["image"].shape[0] for i in range(4)) == [8, 9, 10, 11]
  pixels = np.concatenate([im.reshape(-1, 3) for im in tiny_images(10, 0)]) / 255
  np.testing.assert_allclose(test.mean, pixels.mean(0), rtol=1e-6)  # from the train split
  np.testing.assert_allclose(test.std, pixels.std(0), rtol=1e-6)
  gray = data.load_source(config(name="mae_jax_tiny_images", data_dir=tfds_dir), "test")
  expected = np.asarray(Image.fromarray(test[1]["image"]).convert("L"))
  np.testing.assert_array_equal(gray[1]["image"][..., 0], expected)


def test_tfds_reading_needs_no_tensorflow(tfds_dir):
  """Reading never imports TensorFlow (only preparing does), so training needs none."""
  code = textwrap.dedent(f"""
      import sys
      import ml_collections
      from mae_jax import data
      c = ml_collections.ConfigDict(dict(name="mae_jax_tiny_images", data_dir={tfds_dir!r},
                                         manual_dir=None, channels=3))
      source = data.load_source(c, "train")
      print(len(source), sorted(source[i]["image"].shape for i in range(10))[-1],
            "tensorflow" in sys.modules)
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["10", "(17,", "10,", "3)", "False"]


# --- Eval batches, per-pixel mean, synthetic --------------------------------------------------


def test_eval_batches_pad_and_slice():
  source = id_source(n=23)
  batches = list(data.make_eval_batches(source, image_size=12, batch_size=8))
  assert len(batches) == 3
  assert [b["valid"].sum() for b in batches] == [8, 8, 7]
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[:23], np.arange(23))
  assert (labels[23:] == pipeline.PAD_LABEL).all() and not batches[-1]["valid"][-1]
  images = np.concatenate([b["image"] for b in batches])
  np.testing.assert_array_equal(images[:23], source.images)  # same size: no resampling
  assert not images[23:].any()
  parts = [list(data.make_eval_batches(source, image_size=12, batch_size=8, process_index=p,
                                       process_count=2)) for p in range(2)]
  for b, (p0, p1) in enumerate(zip(*parts)):
    assert p0["image"].shape == (4, 12, 12, 1)
    for key in ("image", "label", "valid"):
      np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), batches[b][key])


def test_eval_resize_of_large_and_small_images():
  big = ArraySource(np.full((3, 40, 30, 3), 200, np.uint8), np.zeros(3), channels=3,
                    num_classes=1)
  (batch,) = data.make_eval_batches(big, image_size=16, batch_size=4)
  assert batch["image"].shape == (4, 16, 16, 3)
  assert (batch["image"][:3] == 200).all() and batch["valid"].tolist() == [True] * 3 + [False]
  box = augment.center_boxes(np.array([[40, 30], [10, 6]]), 16)
  np.testing.assert_allclose(box[0], [(40 - 26.25) / 2, (30 - 26.25) / 2, 26.25, 26.25])
  np.testing.assert_allclose(box[1], [0, 0, 10, 6])  # smaller than 16: the whole image


def test_per_pixel_mean_matches_numpy():
  source = id_source(n=30, channels=3)
  mean = data.per_pixel_mean(source, 12)
  assert mean.shape == (12, 12, 3) and mean.dtype == np.float32
  np.testing.assert_allclose(mean, source.images.mean(0) / 255, atol=1e-6)
  some = data.per_pixel_mean(source, 12, max_examples=10)
  np.testing.assert_allclose(some, source.images[::3].mean(0) / 255, atol=1e-6)


def test_synthetic_is_deterministic():
  a = data.load_source(config(name="synthetic", synthetic_size=20, channels=3), "train")
  b = data.load_source(config(name="synthetic", synthetic_size=20, channels=3), "train")
  test = data.load_source(config(name="synthetic", synthetic_size=20, channels=3), "test")
  assert len(a) == 20 and a[5]["image"].shape == (12, 12, 3) and a.num_classes == 10
  np.testing.assert_array_equal(a[5]["image"], b[5]["image"])
  assert not np.array_equal(a[5]["image"], test[5]["image"])
  assert {a[i]["label"] for i in range(20)} <= set(range(10))


# --- Errors ---------------------------------------------------------------------------------


def test_unknown_dataset_name():
  with pytest.raises(data.DatasetError,
                     match="data.name='no_such_set': unknown dataset; valid: fashion_mnist, "
                           "synthetic, folder, prepared, or a TFDS dataset name"):
    data.load_source(config(name="no_such_set"), "train")


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
  with pytest.raises(data.DatasetError, match=r"data.data_dir=.*no Fashion-MNIST IDX files.*"
                                              r"apt-get install dataset-fashion-mnist"):
    data.load_source(config(data_dir=str(tmp_path)), "train")


def test_folder_errors(tmp_path):
  with pytest.raises(data.DatasetError, match="data.data_dir=.*missing: not a directory"):
    data.load_source(config(name="folder", data_dir=str(tmp_path / "missing")), "train")
  (tmp_path / "empty_class").mkdir()
  (tmp_path / "notes.txt").write_text("not an image")
  with pytest.raises(data.DatasetError, match="no images"):
    data.load_source(config(name="folder", data_dir=str(tmp_path)), "train")
  (tmp_path / "val").mkdir()
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "val" / "x.png")
  with pytest.raises(data.DatasetError, match=r"split folders \['val'\] but none for 'train'"):
    data.load_source(config(name="folder", data_dir=str(tmp_path)), "train")


def test_bad_channels_and_split():
  with pytest.raises(data.DatasetError, match="data.channels=2"):
    data.load_source(config(name="synthetic", channels=2), "train")
  with pytest.raises(data.DatasetError, match="split='val'"):
    data.load_source(config(name="synthetic"), "val")


# --- Crop distribution, crop-aware decoding, repeated sampling, worker processes -----------


def quantiles_of_density(grid, density, qs):
  cdf = np.cumsum(density)
  return np.interp(qs, cdf / cdf[-1], grid)


def test_crop_scale_and_aspect_distributions():
  """On a large square image, RandomResizedCrop accepts the first (area share s, aspect a)
  draw that fits, s ~ U(0.2, 1) and log a ~ U(log 3/4, log 4/3): the accepted pairs are
  uniform on {s <= exp(-|log a|)}. Their marginal quantiles, computed here from that
  region, must match the boxes'."""
  draws = np.random.default_rng(0).random((40000, augment.NUM_DRAWS))
  boxes = augment.random_resized_crop_boxes(np.full((40000, 2), 1000), draws, (0.2, 1.0))
  share = boxes[:, 2] * boxes[:, 3] / 1e6
  log_aspect = np.log(boxes[:, 3] / boxes[:, 2])
  lo, hi = np.log(augment.RATIO[0]), np.log(augment.RATIO[1])
  qs = np.linspace(0.1, 0.9, 9)
  s_grid = np.linspace(0.2, 1.0, 4001)  # density of s: share of log a with s <= e^-|log a|
  s_density = np.clip(-np.log(s_grid) / hi, 0, 1)
  np.testing.assert_allclose(np.quantile(share, qs), quantiles_of_density(s_grid, s_density, qs),
                             atol=0.01)
  a_grid = np.linspace(lo, hi, 4001)  # density of log a: share of s in [0.2, e^-|log a|]
  a_density = (np.exp(-np.abs(a_grid)) - 0.2) / 0.8
  np.testing.assert_allclose(np.quantile(log_aspect, qs),
                             quantiles_of_density(a_grid, a_density, qs), atol=0.01)
  assert share.min() > 0.19 and share.max() <= 1.0
  assert log_aspect.min() >= lo - 0.01 and log_aspect.max() <= hi + 0.01
  assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, :2] + boxes[:, 2:] <= 1000)


def write_photo_like_jpeg(path, height=480, width=640, seed=0):
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), np.uint8)
  Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(path, quality=95)


def test_draft_decoding_crops_the_same_region(tmp_path):
  """JPEG draft (DCT-domain downscale) changes pixels only as much as the downscale filter
  does: the crops match the decode-everything crops closely, the boxes scaled right."""
  path = str(tmp_path / "photo.jpg")
  write_photo_like_jpeg(path)
  draws = np.random.default_rng(1).random((16, augment.NUM_DRAWS))
  kwargs = dict(augment=augment.AUGMENTS["crop_flip"], image_size=32, crop_scale=(0.2, 1.0),
                channels=3)
  drafted = decode.decode_crops(path, draws, draft=True, **kwargs)
  full = decode.decode_crops(path, draws, draft=False, **kwargs)
  reference = augment.augment_batch([decode.decode(path, 3)] * 16, draws,
                                    augment.AUGMENTS["crop_flip"], 32, (0.2, 1.0))
  np.testing.assert_array_equal(full, reference)  # without draft: exactly the old path
  assert not np.array_equal(drafted, full)  # 640 px crops to 32: draft did shrink
  diff = np.abs(drafted.astype(int) - full).mean(axis=(1, 2, 3))
  assert diff.max() < 4, diff


def test_repeat_samples_gives_independent_crops_of_the_same_images():
  source = id_source(n=40, size=20, channels=3)
  batches = take(train_batches(source, image_size=16, repeat_samples=2), 7)
  for batch in batches:
    labels = batch["label"]
    np.testing.assert_array_equal(labels[0::2], labels[1::2])  # neighbours: one example
    assert len(set(labels.tolist())) == 4  # batch 8, k = 2: 4 distinct examples
    assert all(not np.array_equal(batch["image"][i], batch["image"][i + 1])
               for i in range(0, 8, 2))  # independent crops
  epoch = np.concatenate([b["label"][0::2] for b in batches[:10]])  # 40 // 4 = 10 steps/epoch
  assert len(set(epoch.tolist())) == len(epoch) == 28
  resumed = take(train_batches(source, image_size=16, repeat_samples=2, start_step=3), 4)
  assert_batches_equal(batches[3:], resumed)
  with pytest.raises(data.DatasetError, match="repeat_samples"):
    train_batches(source, repeat_samples=3)


@pytest.mark.slow
def test_batches_are_pure_in_step_with_worker_processes(tmp_path):
  """Worker threads, worker processes and process slices: the same batches as inline."""
  write_folder(tmp_path)
  source = data.load_source(config(name="folder", data_dir=str(tmp_path), channels=3), "train")
  kwargs = dict(global_batch_size=4, image_size=16, repeat_samples=2)
  inline = take(train_batches(source, **kwargs), 6)
  threads = take(train_batches(source, num_workers=2, **kwargs), 6)
  processes = take(train_batches(source, worker_processes=2, num_workers=1, **kwargs), 6)
  assert_batches_equal(inline, threads)
  assert_batches_equal(inline, processes)
  half = [take(train_batches(source, worker_processes=2, process_index=p, process_count=2,
                             start_step=2, **kwargs), 4) for p in range(2)]
  for step, batch in enumerate(inline[2:]):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([h[step][key] for h in half]), batch[key])
