"""mae_jax.train.pretrained and python -m mae_jax.visualize: workdirs and converted checkpoints."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import model_fields, official_state, save_pth, synthetic_config
from mae_jax import trainer
from mae_jax.evaluation import pictures
from mae_jax.model import mae
from mae_jax.tools import convert, visualize
from mae_jax.train import pretrained, train_step as ts

FIELDS = model_fields(num_heads=4, mlp_ratio=4.0, decoder_width=16, mask_ratio=0.75)


def test_denormalize_pred_inverts_the_norm_pix_target():
  """A norm_pix model that predicts its target exactly reconstructs the image exactly."""
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3)) * 3 + 1
  target = mae.patch_targets(images, 4, norm_pix_loss=True)
  got = ts.denormalize_pred(target, images, 4, norm_pix_loss=True)
  np.testing.assert_allclose(got, mae.patch_targets(images, 4, False), atol=1e-4)
  assert ts.denormalize_pred(target, images, 4, norm_pix_loss=False) is target


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("run")
  state, results = trainer.train_and_evaluate(synthetic_config(num_steps=2, eval_batch_size=64),
                                              str(path))
  return path, jax.device_get(state.params), results


def test_load_workdir_gives_the_trained_params(workdir):
  path, params, _ = workdir
  pre = pretrained.load(str(path))
  assert pre.description.endswith("at step 2")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(pre.params))):
    np.testing.assert_array_equal(a, b)
  assert (pre.model.width, pre.model.image_size, pre.model.channels) == (32, 16, 1)


def test_visualize_a_workdir_reproduces_its_test_mse(workdir, tmp_path, capsys, caplog):
  """The loaded model, on the workdir's test images with the trainer's eval masks, gives
  the trainer's own test MSE (the split is 64 synthetic images, one eval batch)."""
  path, _, results = workdir
  out = tmp_path / "recon.png"
  seed = -1 % (2**31)  # the trainer's eval RNG: fold_in(key(seed), -1) of key(0)
  pre = pretrained.load(str(path))
  images = visualize.load_images(pre, None, 64)
  assert images.shape == (64, 16, 16, 1)
  rng_seed = jax.random.fold_in(jax.random.key(0), seed)
  step = jax.jit(lambda p, b: ts.eval_step(
      p, b, jax.random.fold_in(rng_seed, 0), model=pre.model, mean=pre.mean, std=pre.std,
      baseline_HWC=np.zeros((16, 16, 1), np.float32)))
  out_ = step(pre.params, {"image": images, "valid": np.ones(len(images), bool)})
  np.testing.assert_allclose(float(out_["sq_err"] / out_["count"]),
                             results["test_masked_mse"], rtol=1e-5)
  caplog.clear()
  assert visualize.main([str(path), "--out", str(out), "--num_images", "4"]) == 0
  assert "masked-patch MSE" in capsys.readouterr().out
  warnings = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
  assert not warnings  # reading a workdir says nothing about reading it
  with Image.open(out) as png:  # 4 rows x 4 images of 16 px + 2 px padding, scaled x7,
    grid = (4 * 18 + 2) * 7    # below a title and right of the row names
    assert png.size[1] == grid + pictures.TITLE_HEIGHT and png.size[0] > grid + 100


def write_pth(path, fields, seed=0):
  save_pth(official_state(fields, True, seed, scale=0.05), path)


@pytest.mark.slow
def test_visualize_a_converted_checkpoint_on_image_files(tmp_path, capsys):
  write_pth(tmp_path / "mae.pth", FIELDS)
  assert convert.main(["import", str(tmp_path / "mae.pth"), str(tmp_path / "conv"),
                       "--num_heads", "4", "--decoder_heads", "2"]) == 0
  pics = tmp_path / "pics"
  pics.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(pics / "a.png")
  Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(pics / "b.png")
  pre = pretrained.load(str(tmp_path / "conv"))
  assert pre.mean == pretrained.IMAGENET_STATS[0]  # official weights expect ImageNet stats
  images = visualize.load_images(pre, [str(pics)], 8)
  assert images.shape == (2, 16, 16, 3)
  pred, mask, mse = visualize.reconstruct(pre, images, seed=3, mask_ratio=0.5)
  assert mask.sum(axis=1).tolist() == [8, 8]  # the overridden ratio: 8 of 16 patches
  # the same model applied by hand on ImageNet-normalized inputs
  x = (images / 255.0 - np.array(pre.mean)) / np.array(pre.std)
  out = pre.model.clone(mask_ratio=0.5).apply({"params": pre.params}, jnp.asarray(x, jnp.float32),
                                              rngs={"mask": jax.random.key(3)})
  p2 = 16
  want = np.asarray(out["pred"]) * np.tile(pre.std, p2) + np.tile(pre.mean, p2)
  np.testing.assert_allclose(pred, want, rtol=1e-4, atol=1e-5)
  png = tmp_path / "r.png"
  assert visualize.main([str(tmp_path / "conv"), "--images", str(pics), "--out", str(png)]) == 0
  assert png.exists()


@pytest.mark.parametrize("args,message", [
    (["{tmp}"], "neither a train.py workdir"),
    (["{conv}"], "pass --images"),
    (["{conv}", "--images", "{tmp}/none"], "no such file"),
    (["{conv}", "--mask_ratio", "1.5", "--images", "{tmp}"], "expected a number in (0, 1)"),
])
def test_visualize_errors(tmp_path, capsys, args, message):
  write_pth(tmp_path / "mae.pth", FIELDS)
  convert.main(["import", str(tmp_path / "mae.pth"), str(tmp_path / "conv"),
                "--num_heads", "4", "--decoder_heads", "2"])
  capsys.readouterr()
  args = [a.format(tmp=tmp_path, conv=tmp_path / "conv") for a in args]
  try:
    code = visualize.main(args + ["--out", str(tmp_path / "x.png")])
  except SystemExit as e:  # argparse's refusal of a flag's value
    code = e.code
  assert code == 2
  assert message in capsys.readouterr().err
