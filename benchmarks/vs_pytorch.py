"""mae_jax vs the PyTorch reference: one MAE train step, timed side by side in one process.

  python benchmarks/vs_pytorch.py --case Ti/4@32 --case S/16@224   # CPU, float32
  python benchmarks/vs_pytorch.py --case B/16@224 --case L/16@224   # GPU, bfloat16

PyTorch: Hugging Face ViTMAEForPreTraining from a ViTMAEConfig (random init, the same
sizes, norm_pix_loss, mask ratio 0.75, LayerNorm eps 1e-6), torch.optim.AdamW (betas
0.9/0.95, weight decay 0.05 on weight matrices only, fused where available), forward +
backward + optimizer step. CPU cases: float32, torch.set_num_threads(cores). GPU cases
(CUDA for both frameworks): float32 parameters with bfloat16 autocast and SDPA attention
for PyTorch, `--dtype bfloat16` for mae_jax. torch.compile is tried (--torch_compile auto)
and kept only if it is faster on the warm-up steps.
mae_jax: the jitted, donated train step of `mae_jax.bench` (the real train step), and the
same step with an encoder that processes all tokens (`bench.AllTokensMAE`, paper Table 2).

Rounds interleave the runners (torch, jax, jax with all tokens), so load from other
processes hits all of them alike; per-step times are pooled and the median is reported.
Set XLA_FLAGS in the environment to try XLA CPU options; the value is recorded.
"""
import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
import torch
import transformers

from mae_jax.model import vit
from mae_jax.tools import flops
from mae_jax.tools import bench

# name -> the bench flags of one MAE configuration (and its global batch).
CASES = {  # --config.FIELD overrides of the paper's ImageNet recipe (configs/mae_imagenet.py)
    # ViT-S/16 with the paper's decoder (8 blocks x 512, 16 heads).
    "S/16@224": ["--config.model.variant=S/16", "--config.batch_size=8",
                 "--config.model.dtype=float32"],
    # ViT-Ti at CIFAR size, patch 4 (64 patches, 16 visible), decoder 4 blocks x 128.
    "Ti/4@32": ["--config.model.variant=Ti/4", "--config.data.image_size=32",
                "--config.batch_size=64", "--config.model.decoder_width=128",
                "--config.model.decoder_depth=4", "--config.model.decoder_heads=4",
                "--config.model.dtype=float32"],
    # The GPU targets' configurations (paper decoder), bfloat16 compute (the recipe's).
    "B/16@224": ["--config.model.variant=B/16", "--config.batch_size=256"],
    "L/16@224": ["--config.model.variant=L/16", "--config.batch_size=256"],
}
GPU_CASES = ("B/16@224", "L/16@224")
# mae_jax's remat policy where --remat is not given: full is the fastest on the CPU
# (docs/benchmarks.md), none on accelerators (the recipe configs/mae_imagenet.py).
DEFAULT_REMAT = {"cpu": "full", "gpu": "none"}
NO_DECAY = ("bias", "layernorm", "cls_token", "mask_token", "position_embeddings")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--case", action="append", choices=sorted(CASES),
                 help="repeatable; default: every case")
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
  p.add_argument("--steps_per_round", type=int, default=4)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--torch_compile", choices=["auto", "on", "off"], default="auto")
  p.add_argument("--no_all_tokens", action="store_true",
                 help="skip the encoder-on-all-tokens runner")
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--unroll", action="store_true",
                 help="unroll mae_jax's block stacks (default: scanned, faster on this CPU)")
  p.add_argument("--remat", choices=sorted(vit.REMAT_POLICIES), default=None,
                 help="mae_jax's remat policy (default: full on CPU, the fastest there, see "
                      "docs/benchmarks.md; none on GPU)")
  return p.parse_args(argv)


def platform_of(case):
  return "gpu" if case in GPU_CASES else "cpu"


def check_platforms(cases):
  """None, or why the cases cannot run here (GPU cases need CUDA in JAX and in torch)."""
  gpu_cases = [c for c in cases if platform_of(c) == "gpu"]
  cpu_cases = [c for c in cases if platform_of(c) == "cpu"]
  have_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  if gpu_cases and not have_gpu:
    return (f"{', '.join(gpu_cases)} need a CUDA GPU for JAX and torch (JAX backend: "
            f"{jax.default_backend()}, torch.cuda.is_available(): {torch.cuda.is_available()})")
  if cpu_cases and jax.default_backend() != "cpu":
    return f"{', '.join(cpu_cases)} are CPU cases; JAX_PLATFORMS=cpu runs them here"
  return None


def hf_config(model):
  """The ViTMAEConfig of a mae_jax MaskedAutoencoder's sizes."""
  return transformers.ViTMAEConfig(
      hidden_size=model.width, num_hidden_layers=model.depth,
      num_attention_heads=model.num_heads, intermediate_size=int(model.width * model.mlp_ratio),
      decoder_hidden_size=model.decoder_width, decoder_num_hidden_layers=model.decoder_depth,
      decoder_num_attention_heads=model.decoder_heads,
      decoder_intermediate_size=int(model.decoder_width * model.mlp_ratio),
      image_size=model.image_size, patch_size=model.patch_size, num_channels=model.channels,
      layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, mask_ratio=model.mask_ratio,
      norm_pix_loss=True)


def torch_adamw(module):
  """AdamW(0.9, 0.95), wd 0.05 except biases, norms, tokens; fused where supported."""
  decay, no_decay = [], []
  for name, p in module.named_parameters():
    if p.requires_grad:
      (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY) else decay).append(p)
  groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
  try:
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True), "fused"
  except (RuntimeError, ValueError):
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=True), "foreach"


def torch_runner(model_jax, batch_size, compiled, device):
  """A closure running one torch train step (blocking), and its settings."""
  torch.manual_seed(0)
  model = transformers.ViTMAEForPreTraining(hf_config(model_jax)).train().to(device)
  opt, opt_impl = torch_adamw(model)
  forward = torch.compile(model) if compiled else model
  size = model_jax.image_size
  images = torch.randn(batch_size, model_jax.channels, size, size, device=device)

  def step():
    opt.zero_grad(set_to_none=True)
    # bfloat16 compute with float32 parameters on the GPU, as mae_jax's --dtype bfloat16.
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
      loss = forward(pixel_values=images).loss
    loss.backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()
    return loss.item()

  settings = {"torch_compile": compiled, "adamw": opt_impl, "device": device,
              "autocast": "bfloat16" if device == "cuda" else None,
              "attn_implementation": model.config._attn_implementation}
  return step, settings


def jax_runner(case, encoder_tokens, unroll, remat):
  """A closure running one mae_jax train step (blocking), the model, and compile seconds."""
  args = bench.parse_args(CASES[case] + [f"--config.model.encoder_tokens={encoder_tokens}",
                                         f"--config.model.remat={remat}"]
                          + ["--config.model.unroll=True"] * unroll)
  config = bench.bench_config(args)
  step, state, batch, rng, model = bench.setup(config)
  compiled, compile_s = bench.compile_step(step, state, batch, rng)
  holder = [state]

  def run():
    holder[0], _ = bench.run_steps(compiled, holder[0], batch, rng, 1)

  return run, model, compile_s


def timed(fn, n):
  """Seconds of each of n calls."""
  out = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    out.append(time.perf_counter() - start)
  return out


def pick_torch(model_jax, batch_size, mode, warmup, device):
  """The torch runner: eager, compiled, or (auto) whichever is faster after warm-up."""
  if mode != "auto":
    step, settings = torch_runner(model_jax, batch_size, mode == "on", device)
    timed(step, warmup)
    return step, settings
  candidates = {}
  for use_compile in (False, True):
    step, settings = torch_runner(model_jax, batch_size, use_compile, device)
    start = time.perf_counter()
    timed(step, 1)  # compiles when compiled
    settings["first_step_s"] = time.perf_counter() - start
    candidates[use_compile] = (float(np.median(timed(step, warmup))), step, settings)
    bench.log(f"torch compile={use_compile}: {candidates[use_compile][0]:.3f}s/step")
  best = min(candidates.values(), key=lambda c: c[0])
  best[2]["eager_vs_compiled_s"] = [candidates[False][0], candidates[True][0]]
  return best[1], best[2]


def interleave(runners, rounds, steps_per_round):
  """{name: per-step seconds}, the runners taking turns each round."""
  times = {name: [] for name in runners}
  for r in range(rounds):
    for name, fn in runners.items():
      times[name] += timed(fn, steps_per_round)
    bench.log(f"round {r + 1}/{rounds}: " + ", ".join(
        f"{n} {np.median(t):.3f}s" for n, t in times.items()))
  return times


def run_case(case, args):
  """Time torch, mae_jax and mae_jax with all tokens in the encoder on one case."""
  remat = args.remat or DEFAULT_REMAT[platform_of(case)]
  bench.log(f"{case}: compiling mae_jax ...")
  jax_fn, model, compile_s = jax_runner(case, "visible", args.unroll, remat)
  runners = {"jax": jax_fn}
  if not args.no_all_tokens:
    runners["jax_all_tokens"], _, _ = jax_runner(case, "all", args.unroll, remat)
  for fn in runners.values():
    timed(fn, args.warmup)
  batch_size = bench.parse_args(CASES[case]).config.batch_size
  bench.log(f"{case}: building torch (compile={args.torch_compile}) ...")
  device = "cuda" if platform_of(case) == "gpu" else "cpu"
  runners["torch"], torch_settings = pick_torch(model, batch_size, args.torch_compile,
                                                args.warmup, device)
  load_before = os.getloadavg()
  times = interleave(runners, args.rounds, args.steps_per_round)
  step_s = {name: float(np.median(t)) for name, t in times.items()}
  result = {
      "case": case, "batch_size": batch_size, "jax_compile_s": compile_s,
      "jax_unroll": model.kernels.unroll, "jax_remat": model.kernels.remat,
      "step_time_s": step_s,
      "images_per_s": {name: batch_size / s for name, s in step_s.items()},
      "jax_over_torch": step_s["torch"] / step_s["jax"],
      "train_gflop_per_image": flops.train_flops(model) / 1e9,
      "torch": torch_settings, "steps_per_runner": len(times["jax"]),
      "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
  }
  if "jax_all_tokens" in step_s:
    result["all_tokens_over_visible"] = step_s["jax_all_tokens"] / step_s["jax"]
    result["all_tokens_over_visible_flops"] = (flops.train_flops(model, "all")
                                               / flops.train_flops(model))
  return result


def environment():
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), platform.processor())
  return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
          "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
          "torch": torch.__version__, "transformers": transformers.__version__,
          "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS"),
          "jax_device": jax.devices()[0].device_kind,
          "torch_gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def print_result(r):
  ips = r["images_per_s"]
  print(f"\n{r['case']}  batch {r['batch_size']}  ({r['steps_per_runner']} steps each, "
        f"load {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f})")
  for name, value in ips.items():
    print(f"  {name:<16} {value:9.2f} img/s   {r['step_time_s'][name]:.4f} s/step")
  print(f"  mae_jax / torch  {r['jax_over_torch']:.2f}x   (torch: {r['torch']})")
  if "all_tokens_over_visible" in r:
    print(f"  dropping masked tokens: {r['all_tokens_over_visible']:.2f}x faster "
          f"(FLOP ratio {r['all_tokens_over_visible_flops']:.2f}x)")


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(args.threads)
  env = environment()
  bench.log(f"{env}")
  here = "gpu" if jax.default_backend() == "gpu" else "cpu"
  cases = args.case or [c for c in sorted(CASES) if platform_of(c) == here]
  problem = check_platforms(cases)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  results = [run_case(case, args) for case in cases]
  for r in results:
    print_result(r)
  print(json.dumps({"environment": env, "results": results}), flush=True)


if __name__ == "__main__":
  sys.exit(main())
