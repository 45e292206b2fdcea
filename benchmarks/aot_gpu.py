"""The trainer's step compiled for H100 GPUs on a host without one: memory, collectives.

  pip install --no-deps --target /tmp/cuda "jax-cuda12-plugin==0.10.2" "jax-cuda12-pjrt==0.10.2"
  python benchmarks/aot_gpu.py --config configs/mae_imagenet.py [--config.FIELD=VALUE ...] \
      [--gpus 8] [--plugin_dir /tmp/cuda] [--max_batch --remat none,full]

`python -m mae_jax.aot` for GPUs: the CUDA PJRT plugin (478 MB, at the venv's jax version;
not a dependency of mae_jax, hence a script and a folder of its own) gives compile-only H100
devices for an XLA GPU target config, and the step is compiled by mae_jax.aot's own
functions (checked_config, compile_step, report_on) and printed as its table and JSON line,
against the H100's 80 GB HBM and NVLink bandwidth (aot.CHIPS).

Without a GPU the program differs from a GPU run's in three ways, which this script sets
and prints (docs/scaling.md, "H100 without a GPU"):
  - model.attn_impl=xla: cuDNN's fused attention cannot be traced without cuDNN;
  - --xla_gpu_enable_triton_gemm=false: Triton GEMM tiling needs autotuning, so the
    matmuls are cuBLAS(Lt) calls;
  - --xla_gpu_autotune_level=0: nothing can be timed without a device.
The figures are the compiler's, for that program; none is a measurement on a GPU.
"""
import json
import os
import sys

from absl import app, flags

# The plugin's load-time check looks for a CUDA driver and refuses without one; the flags
# must be in place before XLA reads them, i.e. before jax makes its first client.
os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
DEPARTURE_FLAGS = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_autotune_level=0")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *DEPARTURE_FLAGS]).strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mae_jax.tools import aot, pretrain  # pylint: disable=wrong-import-position

# The XLA GPU target config of an H100 SXM (80GB HBM3), as the CUDA runtime describes it.
H100 = """gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536 }
platform_name: "CUDA" dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 } device_description_str: "NVIDIA H100 80GB HBM3"
"""

FLAGS = flags.FLAGS
pretrain.define_recipe_flag()
flags.DEFINE_integer("gpus", 8, "Number of H100s (one host, e.g. 8 on an HGX board).")
flags.DEFINE_string("plugin_dir", "/tmp/cuda",
                    "Folder holding jax-cuda12-plugin and jax-cuda12-pjrt (pip --target).")
flags.DEFINE_float("headroom", 0.1, "Fraction of HBM left free for 'fits'.")
flags.DEFINE_bool("max_batch", False, "Find the largest per-GPU batch that fits (aot.search).")
flags.DEFINE_list("remat", ["none", "full"], "Remat policies for --max_batch.")
flags.DEFINE_list("max_batch_range", None,
                  "LO[:GIB],HI[:GIB]: --max_batch between a per-GPU batch known to fit and "
                  "one known not to, as for mae_jax.aot. Implies --max_batch; one --remat.")


def h100_devices(count, plugin_dir):
  """`count` compile-only H100 devices from the CUDA plugin in `plugin_dir`."""
  if count < 1:
    raise aot.AotError(f"--gpus={count}: needs at least 1")
  if not os.path.isdir(os.path.join(plugin_dir, "jax_plugins")):
    raise aot.AotError(f"--plugin_dir={plugin_dir}: no CUDA plugin there; pip install "
                       "--no-deps --target DIR jax-cuda12-plugin jax-cuda12-pjrt at jax's "
                       "version")
  sys.path.insert(0, plugin_dir)  # jax finds jax_plugins.* on sys.path when it first needs them
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="cuda", topology_name="", target_config=H100,
                                      topology=f"1x1x{count}").devices


def with_xla_attention(config):
  """The recipe with model.attn_impl=xla (cuDNN's attention cannot be traced here)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.attn_impl = "xla"
  return config


def main(argv):
  del argv
  import jax
  jax.config.update("jax_platforms", "cpu")  # compile-only: the host runs nothing
  jax.config.update("jax_enable_compilation_cache", False)
  print("departures from a GPU run's program: model.attn_impl=xla, XLA_FLAGS "
        + " ".join(DEPARTURE_FLAGS), file=sys.stderr)
  try:
    devices = h100_devices(FLAGS.gpus, FLAGS.plugin_dir)
    config, name = with_xla_attention(FLAGS.config), f"h100:{FLAGS.gpus}"
    if FLAGS.max_batch or FLAGS.max_batch_range:
      found = aot.max_batch_on(config, devices, FLAGS.remat, headroom=FLAGS.headroom,
                               log=lambda s: print(s, file=sys.stderr),
                               explicit=pretrain.explicit_fields(),
                               bracket=FLAGS.max_batch_range)
      rep = {"topology": name, "variant": config.model.variant, "max_batch": found}
    else:
      rep = aot.report_on(config, devices, name, headroom=FLAGS.headroom,
                          explicit=pretrain.explicit_fields())
  except aot.AotError as e:
    aot.fail(e)
  rep["departures"] = ["model.attn_impl=xla", *DEPARTURE_FLAGS]
  print(aot.table(rep))
  print(json.dumps(rep, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


if __name__ == "__main__":
  app.run(main, flags_parser=pretrain.parse_flags)
