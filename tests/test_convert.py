"""mae_jax.convert: official .pth and HF ViTMAE import/export, strict key checks."""
import argparse
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

import helpers
from helpers import save_pth
from mae_jax.model import patches
from mae_jax.tools import convert
from mae_jax.train import param_dirs

FIELDS = helpers.model_fields(depth=2, num_heads=4, mlp_ratio=4.0, decoder_width=16,
                              decoder_depth=2, mask_ratio=0.75)
HEADS = ["--num_heads", "4", "--decoder_heads", "2"]


def official_state(with_decoder=True, seed=0, fields=FIELDS):
  """A random official state dict (the sin-cos pos embeds are the real ones)."""
  return helpers.official_state(fields, with_decoder, seed)


def load_pth(path):
  return {k: v.numpy() for k, v in torch.load(path, weights_only=True)["model"].items()}


def assert_same_tensors(got, want):
  assert list(got) == list(want) or sorted(got) == sorted(want), (
      sorted(set(got) ^ set(want)))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def hf_model(cls=ViTMAEForPreTraining, seed=0):
  """A random HF model of FIELDS' size, with the fixed sin-cos position embeddings."""
  torch.manual_seed(seed)
  config = ViTMAEConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
      decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
      decoder_intermediate_size=64, image_size=16, patch_size=4, layer_norm_eps=1e-6)
  model = cls(config)
  tables = convert.sincos_tables(FIELDS)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.1)
    vit = model.vit if cls is ViTMAEForPreTraining else model
    vit.embeddings.position_embeddings.copy_(torch.from_numpy(tables["pos_embed"]))
    if cls is ViTMAEForPreTraining:
      model.decoder.decoder_pos_embed.copy_(torch.from_numpy(tables["decoder_pos_embed"]))
  return model


def state_of(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_official_layout_of_vit_base():
  """The timm names and shapes of mae_pretrain_vit_base.pth (150 encoder tensors)."""
  fields = dict(FIELDS, image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                decoder_width=512, decoder_depth=8, decoder_heads=16)
  shapes = convert.official_shapes(fields, with_decoder=False)
  assert len(shapes) == 150
  assert shapes["patch_embed.proj.weight"] == (768, 3, 16, 16)
  assert shapes["pos_embed"] == (1, 197, 768)
  assert shapes["blocks.11.attn.qkv.weight"] == (2304, 768)
  assert shapes["blocks.11.mlp.fc1.weight"] == (3072, 768)
  full = convert.official_shapes(fields, with_decoder=True)
  assert full["decoder_pred.weight"] == (768, 512) and full["mask_token"] == (1, 1, 512)
  assert len(full) - len(shapes) == 4 + 8 * 12 + 2 + 2  # tokens+embed, blocks, norm, pred


def test_patch_embedding_is_the_conv():
  """The converted kernel applied to patchify rows == the strided conv of the image."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal((8, 3, 4, 4)).astype(np.float32)
  x = rng.standard_normal((2, 3, 8, 12)).astype(np.float32)
  want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=4)
  want = want.flatten(2).transpose(1, 2).numpy()  # (B, N, D), raster order
  got = patches.patchify(x.transpose(0, 2, 3, 1), 4) @ convert.conv_to_kernel(w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(convert.kernel_to_conv(convert.conv_to_kernel(w), 4, 3), w)


def test_official_roundtrip_with_decoder(tmp_path, capsys):
  state = official_state(with_decoder=True)
  # As main_pretrain.py saves them: the run's args and epoch beside the weights.
  src = save_pth(state, tmp_path / "mae_visualize.pth", epoch=799,
                 args=argparse.Namespace(model="mae_vit_large_patch16"))
  assert convert.main(["import", src, str(tmp_path / "out"), *HEADS]) == 0
  params, fields = param_dirs.load_params(str(tmp_path / "out"))
  assert fields == FIELDS
  abstract = convert.abstract_params(fields)
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, abstract)
  # Scanned stacks keep the layer order; linear kernels are the transposed weights.
  np.testing.assert_array_equal(params["blocks"]["layers"]["attn"]["qkv"]["kernel"][1],
                                state["blocks.1.attn.qkv.weight"].T)
  assert convert.main(["export", str(tmp_path / "out"), str(tmp_path / "back.pth")]) == 0
  assert "with the decoder" in capsys.readouterr().out
  assert_same_tensors(load_pth(tmp_path / "back.pth"), state)


def test_encoder_only_checkpoint_gets_a_seeded_decoder(tmp_path, capsys):
  state = official_state(with_decoder=False)
  src = save_pth(state, tmp_path / "mae_pretrain.pth")
  args = ["import", src, None, "--num_heads", "4", "--decoder_width", "16",
          "--decoder_depth", "2", "--decoder_heads", "2", "--seed", "3"]
  for out in ("a", "b"):
    args[2] = str(tmp_path / out)
    assert convert.main(args) == 0
    assert "decoder" in capsys.readouterr().out.split("encoder-only checkpoint:")[1]
  (a, fields), (b, _) = (param_dirs.load_params(str(tmp_path / o)) for o in ("a", "b"))
  assert fields == FIELDS
  jax.tree.map(np.testing.assert_array_equal, a, b)  # seeded: the same decoder twice
  other = convert.init_decoder(fields, seed=4)
  assert not np.array_equal(a["decoder_pred"]["kernel"], other["decoder_pred"]["kernel"])
  assert np.std(a["decoder_pred"]["kernel"]) > 0.1  # xavier-uniform, not zeros
  np.testing.assert_array_equal(a["norm"]["scale"], state["norm.weight"])
  assert json.load(open(tmp_path / "a" / "model.json"))["decoder_from_checkpoint"] is False
  # Export leaves the untrained decoder out unless asked.
  convert.export_checkpoint(str(tmp_path / "a"), str(tmp_path / "enc.pth"))
  assert_same_tensors(load_pth(tmp_path / "enc.pth"), state)
  full = convert.export_checkpoint(str(tmp_path / "a"), str(tmp_path / "full.pth"),
                                   with_decoder=True)
  assert "decoder_blocks.1.mlp.fc2.bias" in full and "mask_token" in full


def test_hf_pretraining_roundtrip_loads_in_transformers(tmp_path):
  model = hf_model()
  model.save_pretrained(tmp_path / "hf")  # transformers' own file naming
  convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "out"))
  _, fields = param_dirs.load_params(str(tmp_path / "out"))
  assert fields == FIELDS  # heads and mask ratio from config.json
  convert.export_checkpoint(str(tmp_path / "out"), str(tmp_path / "hf_back"))
  back, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf_back",
                                                    output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  assert_same_tensors(state_of(back), state_of(model))
  config = json.load(open(tmp_path / "hf_back" / "config.json"))
  assert config["architectures"] == ["ViTMAEForPreTraining"]
  assert config["num_attention_heads"] == 4 and config["layer_norm_eps"] == 1e-6


def test_hf_legacy_names_roundtrip_exactly(tmp_path):
  """Hub files (transformers 4 names, e.g. attention.attention.query) come back as is."""
  legacy = convert.official_to_hf(official_state(with_decoder=True))
  assert "vit.encoder.layer.1.attention.attention.query.weight" in legacy
  assert "decoder.decoder_layers.0.intermediate.dense.bias" in legacy
  os.makedirs(tmp_path / "hf")
  from safetensors.numpy import save_file, load_file  # pylint: disable=import-outside-toplevel
  save_file(legacy, str(tmp_path / "hf" / "model.safetensors"))
  json.dump(convert.hf_config(FIELDS, True), open(tmp_path / "hf" / "config.json", "w"))
  convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "out"))
  convert.export_checkpoint(str(tmp_path / "out"), str(tmp_path / "back"), fmt="hf")
  assert_same_tensors(load_file(str(tmp_path / "back" / "model.safetensors")), legacy)


def test_hf_encoder_model_from_pytorch_bin(tmp_path, capsys):
  model = hf_model(ViTMAEModel)
  os.makedirs(tmp_path / "hf")
  torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
  model.config.to_json_file(tmp_path / "hf" / "config.json")
  convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "out"))
  assert "encoder-only checkpoint" in capsys.readouterr().out
  convert.export_checkpoint(str(tmp_path / "out"), str(tmp_path / "hf_back"))
  back = ViTMAEModel.from_pretrained(tmp_path / "hf_back")
  assert_same_tensors(state_of(back), state_of(model))


def test_official_to_hf_to_official(tmp_path):
  state = official_state(with_decoder=True, seed=1)
  convert.write_hf(state, FIELDS, str(tmp_path / "hf"))
  convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "out"))
  back = convert.export_checkpoint(str(tmp_path / "out"), str(tmp_path / "back.pth"))
  assert_same_tensors(back, state)


@pytest.mark.parametrize("edit,names", [
    (lambda s: s.pop("blocks.1.norm2.bias"), ["missing", "blocks.1.norm2.bias"]),
    (lambda s: s.update({"head.weight": np.zeros((10, 32), np.float32)}),
     ["unexpected", "head.weight"]),
    (lambda s: s.update({"blocks.0.attn.proj.weight": np.zeros((32, 31), np.float32)}),
     ["wrong shape", "blocks.0.attn.proj.weight (32, 31) (expected (32, 32))"]),
])
def test_bad_checkpoints_are_clear_errors(tmp_path, capsys, edit, names):
  state = official_state(with_decoder=True)
  edit(state)
  src = save_pth(state, tmp_path / "bad.pth")
  with pytest.raises(convert.ConversionError) as e:
    convert.import_checkpoint(src, str(tmp_path / "out"), num_heads=4, decoder_heads=2)
  for name in names:
    assert name in str(e.value)
  assert not os.path.exists(tmp_path / "out")  # nothing half-written
  assert convert.main(["import", src, str(tmp_path / "out"), *HEADS]) == 2
  assert names[-1] in capsys.readouterr().err


def test_hf_names_are_checked_too():
  state = convert.hf_to_official(state_of(hf_model()))
  del state["decoder_blocks.1.attn.qkv.weight"]
  state["decoder_blocks.1.attn.key.weight"] = np.zeros((16, 16), np.float32)
  with pytest.raises(convert.ConversionError, match="decoder_blocks.1.attn.key.weight"):
    convert.official_to_params(state, FIELDS)


def test_heads_need_a_flag_when_shapes_cannot_tell(tmp_path):
  src = save_pth(official_state(), tmp_path / "x.pth")
  with pytest.raises(convert.ConversionError, match="--num_heads or --variant"):
    convert.import_checkpoint(src, str(tmp_path / "out"))
  with pytest.raises(convert.ConversionError, match="variant B/16"):
    convert.import_checkpoint(src, str(tmp_path / "out"), variant="B/16")
  with pytest.raises(convert.ConversionError, match="--variant"):
    convert.import_checkpoint(src, str(tmp_path / "out"), variant="X/16")


def test_heads_from_the_official_size_table():
  fields = dict(FIELDS, width=768, depth=12)
  convert.resolve_heads(fields, decoder_heads=None)
  assert (fields["num_heads"], fields["decoder_heads"]) == (12, 16)


def test_wrong_position_embedding_is_refused(tmp_path):
  state = official_state()
  state["pos_embed"] = state["pos_embed"] + 0.1
  src = save_pth(state, tmp_path / "x.pth")
  with pytest.raises(convert.ConversionError, match="pos_embed is not the fixed"):
    convert.import_checkpoint(src, str(tmp_path / "out"), num_heads=4, decoder_heads=2)
  convert.import_checkpoint(src, str(tmp_path / "ok"), num_heads=4, decoder_heads=2,
                            check_pos=False)


def test_outputs_are_never_overwritten(tmp_path):
  src = save_pth(official_state(), tmp_path / "x.pth")
  convert.import_checkpoint(src, str(tmp_path / "out"), num_heads=4, decoder_heads=2)
  with pytest.raises(param_dirs.ParamsError, match="already exists"):
    convert.import_checkpoint(src, str(tmp_path / "out"), num_heads=4, decoder_heads=2)
  with pytest.raises(convert.ConversionError, match="--overwrite"):
    convert.export_checkpoint(str(tmp_path / "out"), src)
  convert.export_checkpoint(str(tmp_path / "out"), src, overwrite=True)


def test_load_params_onto_a_sharded_target(tmp_path):
  state = official_state()
  src = save_pth(state, tmp_path / "x.pth")
  convert.import_checkpoint(src, str(tmp_path / "out"), num_heads=4, decoder_heads=2)
  _, fields = param_dirs.load_params(str(tmp_path / "out"))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        convert.abstract_params(fields))
  params, _ = param_dirs.load_params(str(tmp_path / "out"), target=target)
  assert jax.tree.map(lambda x: (x.shape, x.sharding), params) == jax.tree.map(
      lambda x: (x.shape, x.sharding), target)
  np.testing.assert_array_equal(params["mask_token"], state["mask_token"])
  other = convert.abstract_params(dict(fields, depth=3))
  with pytest.raises(param_dirs.ParamsError, match=r"blocks/layers/norm1/scale \(2, 32\) "
                     r"vs \(3, 32\)"):
    param_dirs.load_params(str(tmp_path / "out"), target=other)


def test_encoder_only_defaults_to_the_papers_decoder():
  fields = convert.model_fields(official_state(with_decoder=False), {"num_heads": 4})
  assert fields == dict(FIELDS, decoder_width=512, decoder_depth=8, decoder_heads=16)


@pytest.mark.slow
def test_command_line_entry_point(tmp_path):
  src = save_pth(official_state(), tmp_path / "x.pth")
  run = subprocess.run(
      [sys.executable, "-m", "mae_jax.convert", "import", src, str(tmp_path / "out"),
       *HEADS], capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr
  assert "decoder: 2 blocks x 16, 2 heads" in run.stdout
  assert json.load(open(tmp_path / "out" / "model.json"))["model"] == FIELDS
  assert os.path.isdir(tmp_path / "out" / "params")


def finetuned_state(pool, num_classes=5, seed=3):
  """A random official fine-tuned ViT state dict (the reference's models_vit.py names)."""
  fields = dict(FIELDS, num_classes=num_classes, pool=pool)
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32)
          for k, s in convert.classifier_shapes(fields).items()}


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_finetuned_classifier_import_export_round_trip(tmp_path, pool):
  """An official fine-tuned checkpoint imports into a classifier directory that
  finetune.load reads (trained pos_embed and head kept, the right pool), computes what its
  tensors say, and exports back to the same tensors."""
  from mae_jax.evaluation import finetune  # pylint: disable=import-outside-toplevel
  state = finetuned_state(pool)
  src = save_pth(state, tmp_path / "ft.pth")
  assert convert.main(["import", src, str(tmp_path / "ft"), "--num_heads", "4"]) == 0
  model, params = finetune.load(str(tmp_path / "ft"))
  assert (model.pool, model.num_classes, model.learned_pos_embed) == (pool, 5, True)
  np.testing.assert_array_equal(params["pos_embed"], state["pos_embed"])
  np.testing.assert_array_equal(params["head"]["kernel"], state["head.weight"].T)
  np.testing.assert_array_equal(params["blocks"]["layers"]["mlp"]["fc2"]["bias"][1],
                                state["blocks.1.mlp.fc2.bias"])
  # the pooled features by hand: mean of patch tokens + fc_norm, or the normed cls token
  x = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32)
  logits = model.apply({"params": params}, x)
  features = model.apply({"params": params}, x, method=model.features)
  np.testing.assert_allclose(logits, features @ state["head.weight"].T + state["head.bias"],
                             rtol=1e-5, atol=1e-5)
  out = tmp_path / "back.pth"
  assert convert.main(["export", str(tmp_path / "ft"), str(out)]) == 0
  assert_same_tensors(load_pth(out), state)


def test_classifier_export_of_a_fixed_pos_embed_writes_the_table(tmp_path):
  """A classifier fine-tuned with the fixed table exports that table as its pos_embed."""
  from mae_jax.evaluation import classifier, finetune  # pylint: disable=import-outside-toplevel
  fields = {k: FIELDS[k] for k in ("image_size", "patch_size", "channels", "width", "depth",
                                    "num_heads", "mlp_ratio")}
  model = classifier.ViTClassifier(num_classes=3, **fields)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  finetune.save(str(tmp_path / "ft"), params["params"], model, {})
  state = convert.export_checkpoint(str(tmp_path / "ft"), str(tmp_path / "ft.pth"))
  np.testing.assert_allclose(state["pos_embed"], convert.sincos_tables(FIELDS)["pos_embed"])
  assert "fc_norm.weight" in state and "norm.weight" not in state
  with pytest.raises(convert.ConversionError, match="official .pth format only"):
    convert.export_checkpoint(str(tmp_path / "ft"), str(tmp_path / "hf"), fmt="hf")
