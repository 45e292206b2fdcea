"""Analytic FLOPs agree with XLA's compiled cost analysis; `python -m mae_jax.bench` runs.

XLA counts a while-loop (scanned block stack) body once, so the models here have one
encoder and one decoder block; the analytic count covers matmuls only, XLA also counts
norms, softmax, GELU, the loss and AdamW, hence a tolerance of 10 %.
"""
import functools
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest

from helpers import ROOT, exit_code
from mae_jax.model import mae, sizes
from mae_jax.tools import flops
from mae_jax.tools import bench
from mae_jax.train import train_step as ts

SIZES = {
    "32px_p4_w192": dict(image_size=32, patch_size=4, width=192, num_heads=3,
                         decoder_width=128, decoder_heads=4),
    "64px_p8_w256": dict(image_size=64, patch_size=8, width=256, num_heads=4,
                         decoder_width=128, decoder_heads=4),
}
BATCH = 8
TOLERANCE = 0.10


def one_block_model(size, cls=mae.MaskedAutoencoder):
  return cls(depth=1, decoder_depth=1, **SIZES[size])


def xla_flops(compiled):
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def xla_forward_flops_per_image(model):
  images = jax.ShapeDtypeStruct((BATCH, model.image_size, model.image_size, 3), jnp.float32)
  noise = jax.ShapeDtypeStruct((BATCH, model.num_patches), jnp.float32)
  init = functools.partial(model.init, {"params": jax.random.key(0), "mask": jax.random.key(1)})
  variables = jax.eval_shape(init, images, noise)
  compiled = jax.jit(model.apply).lower(variables, images, noise).compile()
  return xla_flops(compiled) / BATCH


def assert_close(analytic, xla):
  assert abs(xla / analytic - 1) < TOLERANCE, f"analytic {analytic:.4g} vs XLA {xla:.4g}"


@pytest.mark.parametrize("size", sorted(SIZES))
def test_forward_flops_match_xla(size):
  model = one_block_model(size)
  assert_close(flops.forward_flops(model), xla_forward_flops_per_image(model))


def test_all_tokens_forward_flops_match_xla():
  """The encoder-on-all-tokens benchmark variant computes what flops counts for it."""
  model = one_block_model("32px_p4_w192", bench.AllTokensMAE)
  xla = xla_forward_flops_per_image(model)
  assert_close(flops.forward_flops(model, "all"), xla)
  assert xla > 2 * flops.forward_flops(model)  # the masked-token encoder is far cheaper


@pytest.mark.slow
def test_train_step_flops_match_xla():
  """The real train step with SGD (AdamW's many small kernels double the CPU compile
  time; test_bench_cli_json_line checks a step with AdamW at the other size)."""
  model = one_block_model("32px_p4_w192")
  tx = optax.sgd(1e-3)
  state = jax.eval_shape(functools.partial(ts.init_state, model, tx, image_shape=(32, 32, 3)),
                         jax.random.key(0))
  batch = {"image": jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.uint8)}
  step = functools.partial(ts.train_step, model=model, tx=tx,
                           schedule=optax.constant_schedule(1e-3), mean=(0.5,) * 3,
                           std=(0.25,) * 3, norm_pix_loss=True)
  compiled = jax.jit(step).lower(state, batch, jax.random.key(0)).compile()
  assert_close(flops.train_flops(model), xla_flops(compiled) / BATCH)


def test_flops_breakdown_by_hand():
  """ViT-B/16 encoder on 1 + 49 tokens: the known per-block count, and 3x for training."""
  model = mae.MaskedAutoencoder()  # B/16 at 224 px, paper decoder
  parts = flops.forward_breakdown(model)
  t, d = 50, 768
  assert parts["encoder"] == 12 * (24 * t * d * d + 4 * t * t * d)
  assert parts["patch_embed"] == 2 * 196 * 768 * 768
  assert flops.train_flops(model) == 3 * sum(parts.values())
  with pytest.raises(ValueError, match="encoder_tokens"):
    flops.forward_flops(model, "some")


BENCH_KEYS = {"compile_s", "step_time_s", "images_per_s", "flops_per_image",
              "xla_flops_per_image", "achieved_tflops", "mfu", "peak_tflops_per_device",
              "peak_memory_bytes", "device_kind", "num_devices", "mesh", "batch_size",
              "fused_attention_calls"}


@pytest.mark.slow
def test_bench_cli_json_line():
  """A tiny run on the 8 simulated devices (data 4 x fsdp 2): its JSON line, whose XLA
  train-step FLOPs (the second model size) agree with the analytic count."""
  size = SIZES["64px_p8_w256"]
  cmd = [sys.executable, "-m", "mae_jax.bench", "--config.model.variant=Ti/8",
         "--config.model.depth=1", "--config.model.decoder_depth=1", "--config.mesh.data=4",
         "--config.mesh.fsdp=2", "--config.batch_size=16", "--config.model.dtype=float32",
         "--steps", "2", "--warmup", "1", "--peak_tflops", "1.0"]
  cmd += [f"--config.data.image_size={size['image_size']}"]
  for f in ("width", "num_heads", "decoder_width", "decoder_heads"):
    cmd += [f"--config.model.{f}={size[f]}"]
  # Optimization level 0 halves the compile time and leaves the FLOP count as it is.
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_backend_optimization_level=0")
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert BENCH_KEYS <= set(result)
  assert result["num_devices"] == 8 and result["mesh"] == {"data": 4, "fsdp": 2}
  assert result["fused_attention_calls"] == []  # XLA's attention on the CPU
  assert result["mfu"] == pytest.approx(result["achieved_tflops"] / 8.0)
  assert "compiling" in out.stderr
  assert_close(result["flops_per_image"], result["xla_flops_per_image"])


@pytest.mark.parametrize("argv,says", [
    (["--config.model.variant=Q/16"], "error: config.model.variant='Q/16': expected"),
    (["--config.batch_sise=8"], "error: config.batch_sise: unknown field 'batch_sise'"),
    (["--config.batch_size=eight"], "error: config.batch_size: 'eight' is not valid"),
    (["--steps", "0"], "error: "),
    (["--variant", "B/16"], "error: "),  # the flags before recipes: now --config.model.*
])
def test_bench_bad_flag_is_one_line(capsys, argv, says):
  """The command's checks in-process: exit 2, one line naming the field, before anything
  compiles."""
  code = exit_code(bench.main, argv)
  err = capsys.readouterr().err
  assert code == 2 and err.startswith(says) and err.count("\n") == 1, err


def test_bench_times_the_recipe_it_is_given():
  """--config FILE and --config.FIELD=VALUE as train.py takes them: the benchmark's config
  is the recipe with those overrides, on synthetic images of the recipe's size."""
  from configs import mae_imagenet  # pylint: disable=g-import-not-at-top
  args = bench.parse_args(["--config", os.path.join(ROOT, "configs/mae_imagenet.py"),
                           "--config.model.variant=L/16", "--config.batch_size=256",
                           "--steps", "5"])
  config = bench.bench_config(args)
  recipe = mae_imagenet.get_config()
  with recipe.unlocked():
    recipe.batch_size, recipe.data.name = 256, "synthetic"
  assert config.to_dict() == recipe.to_dict() and args.steps == 5 and args.warmup == 3
  default = bench.bench_config(bench.parse_args([]))  # the ImageNet recipe by default
  assert default.model.variant == "L/16" and default.data.image_size == 224


def load_benchmark(name):
  """A script of benchmarks/ imported as a module."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.pop(0)


def test_photo_folder_is_made_of_the_bundled_photographs(tmp_path):
  photos = load_benchmark("photos")
  photos.write_photo_folder(str(tmp_path), 10, (120, 90))
  from PIL import Image  # pylint: disable=import-outside-toplevel
  files = sorted(tmp_path.glob("train/*/*.jpg"))
  assert len(files) == 10 and len({f.parent.name for f in files}) == len(photos.PHOTOS)
  sizes = set()
  for f in files:
    with Image.open(f) as image:
      assert image.mode == "RGB" and image.format == "JPEG"
      sizes.add(image.size)
      pixels = np.asarray(image, np.float64)
    assert pixels.std() > 10  # a photograph, not a flat field
  assert sizes <= {(120, 90), (90, 120)}


def test_pipeline_benchmark_runs_each_path(tmp_path):
  """benchmarks/pipeline.py on a tiny case: a JSON line per (path, decode, resize, workers,
  repeat) whose batch shapes it checked (the device resize only with crop decoding)."""
  pipeline = load_benchmark("pipeline")
  rows = pipeline.main(["--path", "folder", "--path", "prepared", "--workers", "0",
                        "--workers", "t2", "--repeat", "1", "--repeat", "2",
                        "--batch_size", "4", "--batches", "2", "--warmup", "1",
                        "--num_images", "12", "--image_size", "32", "--jpeg_size", "64", "48"])
  assert [(r["path"], r["decode"], r["resize"], r["workers"], r["repeat"]) for r in rows] == [
      (p, d, z, w, k) for p in ("folder", "prepared") for d in ("full", "crop")
      for z in ("host", "device") if (d, z) != ("full", "device")
      for w in ("0", "t2") for k in (1, 2)]
  assert all(r["samples_per_s"] > 0 and r["samples_per_cpu_s"] > 0 for r in rows)
  assert all(r["images_per_s"] * r["repeat"] == pytest.approx(r["samples_per_s"], rel=0.01)
             for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--classifier"]])
def test_cpu_paths_benchmark_runs(extra):
  """benchmarks/cpu_paths.py times both programs (train step, classifier grad), one per
  model.matmul value."""
  cpu_paths = load_benchmark("cpu_paths")
  medians = cpu_paths.main(["--config.model.variant=Ti/8", "--config.model.depth=1",
                            "--config.model.decoder_depth=1", "--config.data.image_size=16",
                            "--config.batch_size=8", "--config.model.dtype=float32",
                            "--steps", "2", "--rounds", "2", *extra])
  assert set(medians) == set(cpu_paths.PROGRAMS)
  assert all(s > 0 for s in medians.values())


@pytest.mark.slow
def test_vs_pytorch_times_both_frameworks(capsys):
  """One interleaved round of the Ti/4@32 case: both runners timed, the ratio theirs."""
  vs_pytorch = load_benchmark("vs_pytorch")
  assert vs_pytorch.main(["--case", "Ti/4@32", "--rounds", "1", "--steps_per_round", "1",
                          "--warmup", "1", "--torch_compile", "off", "--no_all_tokens"]) is None
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  (r,) = out["results"]
  assert set(r["step_time_s"]) == {"jax", "torch"} and r["jax_remat"] == "full"
  assert r["jax_over_torch"] == pytest.approx(r["step_time_s"]["torch"] / r["step_time_s"]["jax"])
  assert r["torch"]["device"] == "cpu" and r["torch"]["autocast"] is None


def test_vs_pytorch_gpu_case_needs_a_gpu(capsys):
  vs_pytorch = load_benchmark("vs_pytorch")
  assert vs_pytorch.main(["--case", "B/16@224"]) == 2
  assert "need a CUDA GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_targets_driver_runs_and_reports_failures(tmp_path, monkeypatch, capsys):
  """benchmarks/gpu_targets.py's plumbing on a tiny CPU config: each run a subprocess,
  its JSON kept, a failing run reported in the table and the exit code."""
  gpu_targets = load_benchmark("gpu_targets")
  monkeypatch.setattr(gpu_targets, "BENCH", [
      "--config.data.image_size=16", "--config.batch_size=8", "--config.model.depth=1",
      "--config.model.decoder_depth=1", "--config.model.dtype=float32", "--steps", "2",
      "--warmup", "1"])
  monkeypatch.setattr(gpu_targets, "BENCH_RUNS", {
      "tiny": (["--config.model.variant=Ti/8"], ""),
      "bad": (["--config.model.variant=Q/8"], "")})
  monkeypatch.setenv("OUT", str(tmp_path))
  assert gpu_targets.main(["--part", "bench", "--timeout", "200"]) == 1
  records = json.loads((tmp_path / "gpu_targets_bench.json").read_text())
  assert set(records) == {"tiny"} and records["tiny"]["fused_attention_calls"] == []
  table = capsys.readouterr().out.splitlines()
  assert any(l.startswith("tiny ") and "none" in l for l in table)
  assert any(l.startswith("bad ") and "failed" in l for l in table)
  # No time left: every run skipped, none started.
  assert gpu_targets.main(["--part", "torch", "--budget", "0"]) == 1
  assert json.loads((tmp_path / "gpu_targets_torch.json").read_text()) == {}
  assert capsys.readouterr().out.count("skipped: budget spent") == len(gpu_targets.TORCH_CASES)


@pytest.mark.slow
def test_profile_step_matmul_table_counts_the_steps_flops(tmp_path):
  """benchmarks/profile_step.py --by_matmul: the matrix products it finds in the trace and
  the compiled HLO add up to the analytic training FLOPs of the step (no remat, unrolled:
  every product runs once per step)."""
  profile_step = load_benchmark("profile_step")
  flags = ["--config.model.variant=Ti/8", "--config.model.depth=2",
           "--config.model.decoder_depth=1", "--config.data.image_size=32",
           "--config.batch_size=8", "--config.model.unroll=True", "--config.model.remat=none",
           "--config.model.dtype=float32"]
  totals, rows = profile_step.main(["--trace_dir", str(tmp_path), "--profile_steps", "2",
                                    "--by_matmul", *flags])
  assert totals and rows
  assert {r[3] for r in rows} <= {"xnnpack", "eigen"} and {r[4] for r in rows} == {"fwd", "bwd"}
  config = bench.bench_config(bench.parse_args(flags))
  expected = flops.train_flops(sizes.build_model(config, "cpu")) * 8 / 1e9
  assert sum(r[2] for r in rows) == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("transpose", [[], ["--transpose_b"]])
def test_matmul_solo_benchmark_runs(transpose):
  matmul_solo = load_benchmark("matmul_solo")
  rates = matmul_solo.main(["--shape", "64x32x48", "--repeats", "3", *transpose])
  assert set(rates) == {"64x32x48"} and all(r > 0 for r in rates["64x32x48"])
