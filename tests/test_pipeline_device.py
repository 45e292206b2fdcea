"""data.resize='device': the host cuts crop regions, the accelerator resizes them. The same
crop boxes (one set of draws, drawn on the original image) and pixels within one level of
the host path's where Pillow resizes horizontally first (the landscape images here), a
few levels on a share of the pixels where Pillow 13 goes vertically first (some portrait
images); batches a pure function of the step; libjpeg-turbo decodes to PIL's pixels."""
import functools
import io

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from mae_jax import data
from mae_jax.data import augment, decode, device_resize, pipeline
from mae_jax.train import config as config_lib
from mae_jax.data.source import ArraySource


def textured(rng, height, width):
  """A smooth colour field with sharp-edged rectangles and fine noise: detail at every
  scale, so a wrong kernel, box or margin shows in the resized pixels."""
  coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), np.uint8)
  x = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(int)
  for _ in range(6):
    top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
    x[top:top + rng.integers(4, height // 3), left:left + rng.integers(4, width // 3)] = \
        rng.integers(0, 256, 3)
  x += rng.integers(-12, 13, x.shape)
  return np.clip(x, 0, 255).astype(np.uint8)


def write_folder(root, n=14):
  """root/train/c<k>/*: JPEGs of various sizes (some big enough for draft at 32 px crops),
  one grayscale JPEG, one CMYK JPEG and one PNG too large for a 64 px crop's bucket."""
  rng = np.random.default_rng(0)
  for i in range(n):
    d = root / "train" / f"c{i % 3}"
    d.mkdir(parents=True, exist_ok=True)
    h, w = int(rng.integers(120, 200)), int(rng.integers(150, 260))
    Image.fromarray(textured(rng, h, w)).save(d / f"{i:03d}.jpg", quality=90)
  d = root / "train" / "c0"
  Image.fromarray(textured(rng, 140, 180)[..., 0]).save(d / "gray.jpg", quality=90)
  Image.fromarray(textured(rng, 150, 130)).convert("CMYK").save(d / "cmyk.jpg", quality=90)
  Image.fromarray(textured(rng, 300, 300)).save(d / "big.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("device_resize")
  write_folder(root)
  cfg = dict(name="folder", data_dir=str(root), manual_dir=None, channels=3)
  return data.load_source(ml_collections.ConfigDict(cfg), "train")


def on_device(batch, image_size):
  return jax.jit(functools.partial(device_resize.crops_of, image_size=image_size))(batch)


def batches(source, resize, steps, **kwargs):
  it = data.make_train_batches(source, seed=7, resize=resize, **kwargs)
  return [next(it) for _ in range(steps)]


@pytest.mark.parametrize("image_size, repeat", [(64, 1), (48, 2), (32, 4)])
def test_device_crops_match_the_host_crops(folder, image_size, repeat):
  kwargs = dict(image_size=image_size, global_batch_size=8, repeat_samples=repeat)
  host = batches(folder, "host", 3, **kwargs)
  dev = batches(folder, "device", 3, **kwargs)
  fallback = 0
  for h, d in zip(host, dev):
    side = device_resize.bucket_side(image_size)
    assert d["region"].shape == (8, side, side, 3) and d["region"].dtype == np.uint8
    out = on_device(d, image_size)
    np.testing.assert_array_equal(np.asarray(out["label"]), h["label"])
    diff = np.abs(np.asarray(out["image"]).astype(int) - h["image"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).mean())
    aligned = (d["box"] == [0, 0, image_size, image_size]).all(1)
    fallback += int((aligned & (d["extent"] == image_size).all(1)).sum())
  if image_size == 64:
    assert fallback > 0  # a crop too large for its bucket went through the host resize


def test_device_crops_of_in_memory_images():
  """ArraySource (in-memory arrays, e.g. Fashion-MNIST): the device crops are PIL's resize
  of the host path's boxes (the host path itself resizes such arrays as float matmuls
  without PIL's rounding and clipping between the passes, so it differs more)."""
  rng = np.random.default_rng(1)
  images = np.stack([textured(rng, 40, 40) for _ in range(12)])
  source = ArraySource(images, np.arange(12), channels=3, num_classes=12)
  kwargs = dict(image_size=24, global_batch_size=6)
  (h,), (d,) = batches(source, "host", 1, **kwargs), batches(source, "device", 1, **kwargs)
  out = np.asarray(on_device(d, 24)["image"]).astype(int)
  indices = pipeline.global_indices(7, 0, 12, 6)
  draws = pipeline.augment_draws(7, 0, 6)
  boxes = augment.random_resized_crop_boxes(np.full((6, 2), 40), draws, (0.2, 1.0))
  pil = np.stack([augment.crop_resize(images[i], box, 24) for i, box in zip(indices, boxes)])
  flip = draws[:, augment.FLIP] < 0.5
  pil[flip] = pil[flip, :, ::-1]
  assert np.abs(out - pil).max() <= 1 and (out != pil).mean() < 0.005
  assert np.abs(out - h["image"]).mean() < 0.3
  np.testing.assert_array_equal(d["label"], h["label"])


def test_resize_regions_is_pils_bicubic_resize_of_the_box():
  """Float boxes anywhere in an image, shrinking and enlarging, at the image's edges: the
  cut region and the accelerator's resize give PIL's resize of the whole image's box."""
  rng = np.random.default_rng(2)
  image = textured(rng, 90, 130)
  boxes = np.array([[0, 0, 90, 130], [3.5, 7.25, 20, 31], [40, 60, 50, 70], [0, 100, 60, 30],
                    [10, 0, 80, 45.5], [44.5, 20, 45.5, 90]])
  size = 32
  regions = device_resize.regions_batch(len(boxes), size, 3)
  regions["box"], regions["extent"] = device_resize.cut_regions(image, boxes, size,
                                                                regions["region"])
  regions["flip"][:] = [False, True, False, True, False, False]
  out = np.asarray(device_resize.resize_regions(*(regions[k] for k in device_resize.KEYS),
                                                size))
  want = decode.resize_boxes(image, boxes, size)
  want[regions["flip"]] = want[regions["flip"], :, ::-1]
  diff = np.abs(out.astype(int) - want)
  assert diff.max() <= 1 and (diff > 0).mean() < 0.005
  # the regions are cuts, not the whole image: the 20 x 31 box's is a few pixels larger
  assert tuple(regions["extent"][1]) < (30, 42)


def test_device_batches_are_a_pure_function_of_the_step(folder):
  kwargs = dict(image_size=32, global_batch_size=8, repeat_samples=2, resize="device")
  from_zero = batches(folder, "device", 4, image_size=32, global_batch_size=8,
                      repeat_samples=2)
  it = data.make_train_batches(folder, seed=7, start_step=2, num_workers=2, **kwargs)
  resumed = [next(it), next(it)]
  parts = [next(data.make_train_batches(folder, seed=7, start_step=1, process_index=p,
                                        process_count=2, **kwargs)) for p in range(2)]
  for want, got in [(from_zero[2], resumed[0]), (from_zero[3], resumed[1]),
                    (from_zero[1], {k: np.concatenate([p[k] for p in parts])
                                    for k in parts[0]})]:
    assert set(want) == set(got) == {*device_resize.KEYS, "label"}
    for k in want:
      np.testing.assert_array_equal(want[k], got[k], err_msg=k)
  assert not np.array_equal(from_zero[0]["region"], from_zero[1]["region"])


def test_portrait_images_stay_close_where_pillow_resizes_vertically_first():
  """Pillow 13 resizes a 384 x 288 image vertically first (a 500 x 375 one horizontally):
  the device path, always horizontal first, rounds between its passes differently there,
  so some pixels move by a few levels; the crops stay the same crops."""
  rng = np.random.default_rng(4)
  sizes = [(384, 288), (500, 375)]
  boxes = np.array([[35, 3, 339, 271], [70, 112, 211, 166], [13, 62, 225, 181]], float)
  diffs = {}
  for size in sizes:
    image = textured(rng, *size)
    regions = device_resize.regions_batch(len(boxes), 224, 3)
    regions["box"], regions["extent"] = device_resize.cut_regions(image, boxes, 224,
                                                                  regions["region"])
    out = np.asarray(device_resize.resize_regions(*(regions[k] for k in device_resize.KEYS),
                                                  224)).astype(int)
    diffs[size] = np.abs(out - decode.resize_boxes(image, boxes, 224))
  assert diffs[500, 375].max() <= 1
  assert diffs[384, 288].max() <= 12 and diffs[384, 288].mean() < 0.5


@pytest.mark.parametrize("draft", [True, False])
def test_libjpeg_turbo_decodes_as_pil(folder, draft):
  """decode_for_boxes: simplejpeg for RGB and gray JPEGs (the same DCT scale as PIL's
  draft, the same pixels), PIL for the rest (CMYK, PNG), boxes drawn on the full size."""
  draws = np.random.default_rng(3).random((3, augment.NUM_DRAWS))
  crop = augment.AUGMENTS["crop_flip"]
  turbo, shrunk = 0, 0
  for path in folder.paths:
    jpeg = decode.jpeg_bytes(path)
    fast = None if jpeg is None else decode.turbo_for_boxes(jpeg, draws, crop, 24, (0.2, 1.0),
                                                            draft)
    array, boxes = decode.decode_for_boxes(path, draws, crop, 24, (0.2, 1.0), 3, draft)
    with Image.open(path) as image:
      width, height = image.size
      want = decode.crop_boxes(height, width, draws, crop, 24, (0.2, 1.0))
      wanted = decode.draft_size(width, height, want, 24)
      if draft and wanted and image.format == "JPEG":
        image.draft("RGB", wanted)
      image.load()
      pil = decode.to_array(image, 3)
    np.testing.assert_array_equal(array, pil, err_msg=path)
    np.testing.assert_allclose(boxes, want * np.array([pil.shape[0] / height,
                                                       pil.shape[1] / width] * 2))
    if fast is not None:
      turbo += 1
      np.testing.assert_array_equal(fast[0], pil, err_msg=path)
    shrunk += pil.shape[0] < height
  assert turbo == len(folder.paths) - 2  # all but the CMYK JPEG and the PNG
  assert (shrunk > 0) == draft  # the 24 px crops let draft shrink some images


def test_without_simplejpeg_pil_decodes_the_same(folder, monkeypatch):
  """simplejpeg is optional at import: without it every image goes through PIL."""
  draws = np.random.default_rng(5).random((2, augment.NUM_DRAWS))
  crop = augment.AUGMENTS["crop_flip"]
  fast = [decode.decode_for_boxes(p, draws, crop, 24, (0.2, 1.0), 3, True) for p in folder.paths]
  monkeypatch.setattr(decode, "simplejpeg", None)
  for path, (array, boxes) in zip(folder.paths, fast):
    pil_array, pil_boxes = decode.decode_for_boxes(path, draws, crop, 24, (0.2, 1.0), 3, True)
    np.testing.assert_array_equal(array, pil_array, err_msg=path)
    np.testing.assert_allclose(boxes, pil_boxes)


def test_resize_auto_and_bad_values():
  assert [device_resize.resolve(r, p) for r, p in [("auto", "cpu"), ("auto", "gpu"),
          ("auto", "tpu"), ("host", "gpu"), ("device", "cpu")]] == [
              "host", "device", "device", "host", "device"]
  c = tiny_config({"data.resize": "gpu"})
  with pytest.raises(config_lib.ConfigError, match=r"^config\.data\.resize: .*'gpu'"):
    config_lib.validate(c)
  with pytest.raises(data.DatasetError, match="data.resize='gpu': expected one of host"):
    pipeline.check_train_args(ArraySource(np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4),
                                          channels=1, num_classes=1), 8, 2, "crop", (0.2, 1),
                              0, 0, resize="gpu")


@pytest.mark.slow
def test_training_with_device_resize_follows_the_host_path(tmp_path, folder):
  """The trainer with data.resize='device': the train step gets the crops the host path
  makes (to one level), so the losses agree closely."""
  from mae_jax import trainer  # pylint: disable=import-outside-toplevel
  root = folder.paths[0].split("/train/")[0]
  losses = {}
  for resize in ("host", "device"):
    c = tiny_config({"data.name": "folder", "data.data_dir": root, "data.channels": 3,
                     "data.resize": resize, "data.image_size": 16, "batch_size": 8,
                     "num_steps": 3, "checkpoint_every_steps": 3, "eval_batch_size": 8,
                     "log_every_steps": 1})
    trainer.train_and_evaluate(c, str(tmp_path / resize))
    from trainproc import scalars  # pylint: disable=import-outside-toplevel
    losses[resize] = scalars(tmp_path / resize)
  assert sorted(losses["host"]) == sorted(losses["device"]) == [1, 2, 3]
  np.testing.assert_allclose([losses["device"][s] for s in (1, 2, 3)],
                             [losses["host"][s] for s in (1, 2, 3)], rtol=2e-3)
