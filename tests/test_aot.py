"""mae_jax.aot: the trainer's step compiled for a TPU topology (libtpu, compile-only
devices) on this CPU host: memory, batch and parameter sharding, collectives by mesh
axis, the per-device batch search, the platform each program is built for, bad input."""
import os
import re
import subprocess
import sys
import types

import jax
import pytest

from configs import default
from mae_jax.tools import aot, hlo
from mae_jax.train import program

TOPOLOGY = "v5e:2x2"  # 4 chips: mesh data=2 x fsdp=2


@pytest.fixture(scope="module", autouse=True)
def libtpu_env():
  """aot.topology_devices sets libtpu's single-host variables in os.environ, where this
  process's later subprocesses would inherit them (TPU_WORKER_HOSTNAMES reads as a Cloud
  TPU VM to jax.distributed): they are undone after this module."""
  with pytest.MonkeyPatch.context() as mp:
    for key, value in aot.LIBTPU_ENV.items():
      mp.setenv(key, os.environ.get(key, value))
    yield


def tiny_config(**mesh):
  """A model whose big kernels (>= 4096 elements) are FSDP-sharded, compiled in seconds."""
  c = default.get_config()
  c.model.update(width=64, depth=2, num_heads=2, decoder_width=64, decoder_depth=1,
                 decoder_heads=2, remat="none")
  c.batch_size = 16
  c.mesh.update(mesh)
  return c


@pytest.fixture(scope="module")
def fsdp_step():
  """(report, compiled, run) of the tiny model on v5e:2x2 with data=2, fsdp=2."""
  devices = aot.topology_devices(TOPOLOGY)
  config = aot.checked_config(tiny_config(data=2, fsdp=2), len(devices))
  compiled, run, _ = aot.compile_step(config, devices)
  _, hbm, ici = aot.chip_of(devices)
  return aot.analyze(compiled, run, hbm, ici, headroom=0.1), compiled, run


@pytest.mark.slow
def test_memory_fields_are_positive_and_the_state_is_donated(fsdp_step):
  rep, _, run = fsdp_step
  m = rep["memory"]
  for field in ("arguments", "outputs", "temporaries", "aliased", "total"):
    assert m[field] > 0, field
  assert m["hbm"] == 16 * 2**30 and m["fits"]
  assert m["total"] == (m["arguments"] + m["outputs"] + m["temporaries"]
                        + m["generated_code"] - m["aliased"])
  # The donated state aliases its output: at least the float32 parameters' shard, x3 for
  # the two AdamW moments.
  assert m["aliased"] >= 3 * 4 * run.num_params / 2 / 2  # fsdp=2 halves the big leaves


@pytest.mark.slow
def test_batch_is_split_over_both_axes_and_params_over_fsdp(fsdp_step):
  _, compiled, run = fsdp_step
  state_sh, batch_sh, _ = compiled.input_shardings[0]
  image = batch_sh["image"]
  assert image.spec[0] == ("data", "fsdp")
  assert image.shard_shape((16, 28, 28, 1)) == (4, 28, 28, 1)
  kernels = {jax.tree_util.keystr(path): sh for path, sh
             in jax.tree_util.tree_flatten_with_path(state_sh.params)[0]
             if "qkv" in jax.tree_util.keystr(path)
             and "kernel" in jax.tree_util.keystr(path)}
  assert len(kernels) == 2  # the encoder's and the decoder's stacks
  assert all("fsdp" in sh.spec for sh in kernels.values())


@pytest.mark.slow
def test_fsdp_gathers_params_and_reduce_scatters_grads_over_fsdp(fsdp_step):
  rep, compiled, _ = fsdp_step
  axes = rep["collectives_by_axes"]
  assert axes.get("all-gather over fsdp", 0) > 0
  assert axes.get("reduce-scatter over fsdp", 0) > 0
  # No gradient of a sharded kernel (>= 4096 elements) is all-reduced whole over fsdp
  # (what the qkv kernel's was, split by its output features), and no activation is
  # re-sharded by feature (all-to-all).
  found = hlo.collectives(compiled.as_text(), (2, 2))
  whole = [(c.bytes, c.where) for c in found if c.kind == "all-reduce" and c.axes == "fsdp"
           and c.bytes >= 4096 * 4]
  assert not whole
  assert rep["collectives"]["all-to-all"]["count"] == 0
  # Loop bodies count once per scanned block: the encoder's 2 blocks gather twice.
  assert rep["collectives"]["all-gather"]["count"] >= 2 * 4


@pytest.mark.slow
def test_fsdp_gathers_each_parameter_at_most_twice(fsdp_step):
  """The all-gather bytes per step are at most twice (forward and backward) the sharded
  parameters' bytes. v5e writes each gather as an asynchronous collective fusion whose
  parts all hold a copy of it: counting every copy read about 5.7 times the parameters."""
  rep, _, run = fsdp_step
  gathered = sum(x.size * x.dtype.itemsize for x, sh in zip(
      jax.tree.leaves(run.abstract_state.params),
      jax.tree.leaves(run.state_shardings.params)) if "fsdp" in sh.spec)
  assert gathered > 0
  assert 0 < rep["collectives_by_axes"]["all-gather over fsdp"] <= 2 * gathered


def test_collectives_count_scan_trips_and_all_reduce_scatter_fusions():
  text = """HloModule m

%all-reduce-scatter.1 (p: f32[8,4]) -> f32[4,4] {
  %p = f32[8,4]{1,0} parameter(0)
  %all-reduce.1 = f32[8,4]{1,0} all-reduce(%p), replica_groups={{0,1},{2,3}}, to_apply=%add
  ROOT %ds = f32[4,4]{1,0} dynamic-slice(%all-reduce.1, %i, %i), dynamic_slice_sizes={4,4}
}

%cond (c: (s32[], f32[8])) -> pred[] {
  %c = (s32[], f32[8]) parameter(0)
  %k = s32[] constant(12)
  ROOT %lt = pred[] compare(%g, %k), direction=LT
}

%body (b: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = bf16[16,8]{1,0} all-gather(%x), replica_groups=[2,2]<=[4], dimensions={0}
  %f = f32[4,4]{1,0} fusion(%y), kind=kCustom, calls=%all-reduce-scatter.1
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  %ar = f32[100]{0} all-reduce(%z), replica_groups=[1,4]<=[4], to_apply=%add
}
"""
  found = {c.kind: c for c in hlo.collectives(text, (2, 2))}
  assert found["all-gather"].count == 12 and found["all-gather"].bytes == 16 * 8 * 2
  assert found["all-gather"].axes == "fsdp"
  assert found["reduce-scatter"].count == 12 and found["reduce-scatter"].bytes == 8 * 4 * 4
  assert found["all-reduce"].count == 1 and found["all-reduce"].axes == "data+fsdp"
  s = hlo.summarize(hlo.collectives(text, (2, 2)))
  assert s["all-reduce"]["ici_bytes"] == round(400 * 2 * 3 / 4)  # ring: 2 (n-1)/n


def test_gpu_async_collectives_and_fused_loop_conditions_are_read():
  """The GPU compiler's forms (CUDA plugin, benchmarks/aot_gpu.py): the loop bound only in
  the while's known_trip_count (its condition's compare is a fusion), combined asynchronous
  starts typed (operands, results), all-reduce-start typed as its operand."""
  text = """HloModule m

%cond (c: (s32[], f32[8])) -> pred[] {
  %c = (s32[], f32[8]) parameter(0)
  ROOT %f = pred[] fusion(%g), kind=kLoop, calls=%fused_compare
}

%body (b: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = ((bf16[32,64]{1,0}, bf16[16,8]{1,0}), (bf16[64,64]{1,0}, bf16[32,8]{1,0})) all-gather-start(%x, %y), replica_groups=[2,2]<=[4], dimensions={0}
  %agd = (bf16[64,64]{1,0}, bf16[32,8]{1,0}) all-gather-done(%ag)
  %rs = ((bf16[64,64]{1,0}), (bf16[32,64]{1,0})) reduce-scatter-start(%z), replica_groups=[2,2]<=[4], dimensions={0}, to_apply=%add
  %rsd = (bf16[32,64]{1,0}) reduce-scatter-done(%rs)
  %one = (f32[4]{0}, bf16[2]{0}) all-gather-start(%w), replica_groups=[2,2]<=[4], dimensions={0}
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %ar = bf16[100]{0} all-reduce-start(%z), replica_groups=[2,2]<=[4], to_apply=%add
  %ard = bf16[100]{0} all-reduce-done(%ar)
}
"""
  found = hlo.collectives(text, (2, 2))
  by_kind = {}
  for c in found:
    by_kind.setdefault(c.kind, []).append((c.count, c.bytes))
  assert sorted(by_kind["all-gather"]) == [(12, 2 * 2), (12, (64 * 64 + 32 * 8) * 2)]
  assert by_kind["reduce-scatter"] == [(12, 64 * 64 * 2)]  # the full gradient, once
  assert by_kind["all-reduce"] == [(1, 200)]


@pytest.mark.slow
def test_whole_slice_fsdp_gathers_are_counted_as_gathers():
  """FSDP over all 64 chips of v5p:4x4x4 (data=1): the compiler writes the parameter
  gathers as all-reduces of zero buffers; they are counted as all-gathers, at most twice
  the sharded parameters' bytes a step (before: no all-gather at all, everything an
  all-reduce)."""
  devices = aot.topology_devices("v5p:4x4x4")
  config = tiny_config(data=1, fsdp=64)
  config.model.update(width=256, num_heads=4, decoder_width=128, decoder_heads=4)
  config.batch_size = 64
  compiled, run, _ = aot.compile_step(aot.checked_config(config, 64), devices)
  _, hbm, ici = aot.chip_of(devices)
  rep = aot.analyze(compiled, run, hbm, ici, headroom=0.1)
  params = jax.tree.leaves(run.abstract_state.params)
  gathered = sum(x.size * x.dtype.itemsize for x, sh in zip(
      params, jax.tree.leaves(run.state_shardings.params)) if "fsdp" in sh.spec)
  assert 0 < rep["collectives_by_axes"]["all-gather over fsdp"] <= 2 * gathered


def test_async_collective_fusion_parts_count_once():
  """v5e's asynchronous collective fusions copy their all-gather into the computations of
  the start, of each overlapping step and of the done: it runs (and is counted) once."""
  text = """HloModule m

%fused_start (p0: bf16[4,8]) -> bf16[16,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[16,8]{1,0} all-gather(%p0), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}
}

%async_collective_fusion.3 (p1: bf16[4,8]) -> bf16[16,8] {
  %p1 = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[16,8]{1,0} all-gather(%p1), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}
}

%fused_done (p2: bf16[4,8]) -> bf16[16,8] {
  %p2 = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.3 = bf16[16,8]{1,0} all-gather(%p2), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}
}

ENTRY %main (a: bf16[4,8]) -> bf16[16,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %async-collective-start.1 = (bf16[4,8], bf16[16,8]) fusion(%a), kind=kCustom, calls=%fused_start
  %fusion.3 = (bf16[4,8], bf16[16,8]) fusion(%async-collective-start.1), kind=kCustom, calls=%async_collective_fusion.3
  ROOT %async-collective-done.1 = bf16[16,8]{1,0} fusion(%fusion.3), kind=kCustom, calls=%fused_done
}
"""
  found = hlo.collectives(text, (1, 4))
  assert [(c.kind, c.count, c.bytes) for c in found] == [("all-gather", 1, 16 * 8 * 2)]


def test_a_shard_written_into_zeros_and_all_reduced_is_an_all_gather():
  """On whole-slice groups the TPU compiler writes an all-gather as an all-reduce of a zero
  buffer holding each device's shard, combined with real reductions in one tuple
  all-reduce: the zero-buffer operands (directly or through a fusion and a copy) count as
  all-gathers sent at the all-reduce rate, the gradient operand stays an all-reduce."""
  text = """HloModule m

%fused_dus (param_0.1: bf16[64,8], param_1.1: bf16[1,8], param_2.1: s32[]) -> bf16[64,8] {
  %param_0.1 = bf16[64,8]{1,0} parameter(0)
  %param_1.1 = bf16[1,8]{1,0} parameter(1)
  %param_2.1 = s32[] parameter(2)
  %zero.1 = s32[] constant(0)
  ROOT %dynamic-update-slice.2 = bf16[64,8]{1,0} dynamic-update-slice(%param_0.1, %param_1.1, %param_2.1, %zero.1)
}

ENTRY %main (a: bf16[1,8], g: bf16[64,8]) -> bf16[64,8] {
  %a = bf16[1,8]{1,0} parameter(0)
  %constant.1 = bf16[] constant(0)
  %broadcast.1 = bf16[64,8]{1,0} broadcast(%constant.1), dimensions={}
  %broadcast.2 = bf16[64,16]{1,0} broadcast(%constant.1), dimensions={}
  %partition-id.1 = u32[] partition-id()
  %convert.1 = s32[] convert(%partition-id.1)
  %row.1 = s32[] multiply(%convert.1, %one)
  %zero = s32[] constant(0)
  %dynamic-update-slice.1 = bf16[64,16]{1,0} dynamic-update-slice(%broadcast.2, %b, %row.1, %zero)
  %broadcast.3 = bf16[64,2]{1,0} broadcast(%constant.1), dimensions={}
  %same-row = bf16[64,2]{1,0} dynamic-update-slice(%broadcast.3, %c, %zero, %zero)
  %fusion.1 = bf16[64,8]{1,0} fusion(%broadcast.1, %a, %row.1), kind=kLoop, calls=%fused_dus
  %copy-start.1 = (bf16[64,8]{1,0}, bf16[64,8]{1,0}, u32[]) copy-start(%fusion.1)
  %copy-done.1 = bf16[64,8]{1,0} copy-done(%copy-start.1)
  %convolution.1 = bf16[64,4]{1,0} convolution(%x, %y), dim_labels=bf_io->bf
  %all-reduce.1 = (bf16[64,8]{1,0}, bf16[64,16]{1,0}, bf16[64,4]{1,0}, bf16[64,2]{1,0}) all-reduce(%copy-done.1, %dynamic-update-slice.1, %convolution.1, %same-row), channel_id=3, replica_groups=[1,64]<=[64], use_global_device_ids=true, to_apply=%add
}
"""
  found = hlo.collectives(text, (1, 64))
  kinds = {c.kind: c for c in found}
  assert set(kinds) == {"all-gather", "all-reduce"}
  assert kinds["all-gather"].bytes == (64 * 8 + 64 * 16) * 2
  assert kinds["all-reduce"].bytes == (64 * 4 + 64 * 2) * 2  # the same-row write is a sum
  s = hlo.summarize(found)
  assert s["all-gather"]["ici_bytes"] == round((64 * 8 + 64 * 16) * 2 * 2 * 63 / 64)


def test_each_device_kind_gets_its_hbm_and_link_bandwidth():
  """An H100 of the CUDA plugin (benchmarks/aot_gpu.py; one device per GPU) gets its whole
  80 GiB and 450 GB/s of NVLink a direction; a v4 TensorCore half a chip; a kind without
  figures is one clear error."""
  def devices(kind, coords):
    return [types.SimpleNamespace(device_kind=kind, coords=c) for c in coords]
  gpus = devices("NVIDIA H100 80GB HBM3", [(0, 0, i) for i in range(8)])
  assert aot.chip_of(gpus) == ("h100", 80 * 2**30, 450e9)
  cores = devices("TPU v4", [(i // 2, 0, 0) for i in range(8)])  # 2 TensorCores a chip
  assert aot.chip_of(cores) == ("v4", 16 * 2**30, 150e9)
  with pytest.raises(aot.AotError, match="'NVIDIA A100-SXM4-40GB' has no HBM/ICI"):
    aot.chip_of(devices("NVIDIA A100-SXM4-40GB", [(0, 0, 0)]))


def test_data_groups_are_named_data():
  attrs = ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) "
           "{'axis_1'}")
  groups = hlo.replica_groups(attrs, 4)
  assert groups == {frozenset({0, 2}), frozenset({1, 3})}
  assert hlo.name_axes(groups, (2, 2)) == "data"


def test_each_platform_gets_its_own_program():
  """The same config traced for TPU topology devices and for CPU devices: only the CPU
  program calls the CPU matmul kernel (a custom_vjp)."""
  config = tiny_config(data=-1, fsdp=1)
  programs = {}
  for devices in (aot.topology_devices(TOPOLOGY), jax.devices()[:1]):
    run = program.pretraining(aot.checked_config(config, len(devices)), devices, 1000,
                              ((0.5,), (0.25,)))
    traced = run.step.trace(*run.abstract_inputs())
    programs[devices[0].platform] = str(traced.jaxpr)
  assert set(programs) == {"tpu", "cpu"}
  assert re.search(r"custom_vjp_call\[\s*name=token_matmul", programs["cpu"])
  assert "token_matmul" not in programs["tpu"]


@pytest.mark.slow
def test_max_batch_fits_and_one_more_does_not():
  """On a chip given just enough memory for a handful of images, the search returns B
  such that B fits and B + 1 does not (each checked by its own compile)."""
  devices = aot.topology_devices(TOPOLOGY)
  config = aot.checked_config(tiny_config(data=-1, fsdp=1), len(devices))
  _, at_2 = aot.fits(config, devices, 2, "none", 2**50, 0.0)
  _, at_8 = aot.fits(config, devices, 8, "none", 2**50, 0.0)
  assert at_8 > at_2
  hbm_gib = (at_2 + at_8) / 2 / 2**30
  found = aot.max_batch(config, TOPOLOGY, ["none"], hbm_gib, 0.0, log=lambda s: None)
  b = found["none"]
  assert 2 <= b < 8
  assert aot.fits(config, devices, b, "none", hbm_gib * 2**30, 0.0)[0]
  assert not aot.fits(config, devices, b + 1, "none", hbm_gib * 2**30, 0.0)[0]
  # From the bracket 2..8 with their totals: the same answer, batches 1, 2 and 8 not
  # compiled again (the log names each batch compiled).
  logged = []
  bracket = [f"2:{at_2 / 2**30!r}", f"8:{at_8 / 2**30!r}"]
  again = aot.max_batch(config, TOPOLOGY, ["none"], hbm_gib, 0.0, log=logged.append,
                        bracket=bracket)
  assert again == found
  compiled = [int(re.search(r"batch (\d+):", line).group(1)) for line in logged]
  assert compiled and all(2 < k < 8 for k in compiled), logged


def test_batch_search_finds_the_edge_in_few_compiles():
  """aot.search returns the largest batch whose memory is under the limit, for memory
  that grows linearly, faster than linearly, in steps, or with the compiler giving no
  total past a size; near-linear memory costs few compiles."""
  limit = 1000.0
  cases = {
      "linear": lambda k: 100 + 3 * k,                   # edge 300
      "convex": lambda k: 100 + 2 * k + 0.004 * k * k,   # edge 286
      "steps": lambda k: 100 + 50 * (k // 8),            # edge 151
      "one": lambda k: 990 + 20 * k,                     # edge 0 (k = 1 is over)
  }
  for name, memory in cases.items():
    asked = []
    def measure(k, memory=memory, asked=asked):
      asked.append(k)
      return memory(k) <= limit, memory(k)
    edge = max([k for k in range(1, 5000) if memory(k) <= limit], default=0)
    assert aot.search(measure, limit) == edge, name
    assert len(asked) == len(set(asked)), name  # no batch compiled twice
    if name == "linear":
      assert len(asked) <= 5, asked
    if name == "convex":
      assert len(asked) <= 10, asked
  no_total = lambda k: (k <= 37, 100.0 * k if k <= 37 else None)
  assert aot.search(no_total, 3700.0) == 37


def test_batch_search_from_a_known_bracket_compiles_only_inside_it():
  """With two known ends (--max_batch_range) the search measures neither them nor k = 1, 2:
  with their totals a secant step lands on the edge; without, it bisects; a bracket whose
  ends are adjacent is the answer at once."""
  limit = 1000.0
  memory = lambda k: 100 + 2 * k + 0.004 * k * k   # edge 286
  asked = []
  def measure(k):
    asked.append(k)
    return memory(k) <= limit, memory(k)
  known = {200: (True, memory(200)), 300: (False, memory(300))}
  assert aot.search(measure, limit, known) == 286
  assert asked and all(200 < k < 300 for k in asked), asked
  assert len(asked) <= 4, asked
  asked.clear()
  assert aot.search(measure, limit, {200: (True, None), 300: (False, None)}) == 286
  assert all(200 < k < 300 for k in asked) and len(asked) <= 8, asked
  asked.clear()
  assert aot.search(measure, limit, {286: (True, None), 287: (False, None)}) == 286
  assert asked == []


def test_max_batch_range_is_read_as_known_ends():
  """LO[:GIB],HI[:GIB] -> {k: (fits, bytes)} in units of grad_accum_steps; a bracket that
  is not one (reversed, not divisible, a GiB on the wrong side of the limit) is an error
  naming the flag."""
  gib = aot.GIB
  assert aot.known_ends(["4064:79.71", "4374:85.70"], 1, 85.5 * gib) == {
      4064: (True, 79.71 * gib), 4374: (False, 85.70 * gib)}
  assert aot.known_ends(["8", "12"], 4, 1.0) == {2: (True, None), 3: (False, None)}
  for bracket, says in [(["8"], "not LO[:GIB],HI[:GIB]"), (["12", "8"], "1 <= LO < HI"),
                        (["0", "8"], "1 <= LO < HI"), (["8", "10"], "multiple of"),
                        (["8:x", "12"], "'8:x' is not BATCH"),
                        (["8:90", "12"], "8 at 90 GiB does not fit"),
                        (["8", "12:80"], "12 at 80 GiB fits")]:
    with pytest.raises(aot.AotError, match="--max_batch_range") as e:
      aot.known_ends(bracket, 4, 85.5 * gib)
    assert says in str(e.value), (bracket, str(e.value))
  with pytest.raises(aot.AotError, match="--max_batch_range: a bracket holds for one remat"):
    aot.max_batch(tiny_config(), TOPOLOGY, ["none", "full"], bracket=["8", "12"])


def run_aot(*args):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  return subprocess.run([sys.executable, "-m", "mae_jax.aot", *args], capture_output=True,
                        text=True, env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["--topology=v9z:2x2"], "--topology='v9z:2x2'"),
    (["--topology=v5e:2x2", "--config.mesh.fsdp=3"], "config.mesh.fsdp: 3 does not divide"),
    (["--topology=v5e:2x2", "--max_batch", "--remat=none", "--hbm_gib=0.001",
      "--config.model.width=64", "--config.model.depth=1", "--config.model.num_heads=2"],
     "does not fit"),
    (["--topology=v5e:2x2", "--max_batch_range=8,4", "--remat=none"],
     "--max_batch_range: needs 1 <= LO < HI, got 8,4"),
])
def test_bad_input_is_one_line_and_exit_2(args, says):
  proc = run_aot("--config=configs/default.py", *args)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines


def finetune_program(devices, rules=True):
  """The fine-tuning program (evaluation.finetune.Finetuner) of the tiny model, data=2 x
  fsdp=2, for `devices`, compiled; rules=False: its step jitted outside program.jit."""
  import functools  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs.eval import get_config as eval_config  # pylint: disable=g-import-not-at-top
  from mae_jax.model import sizes  # pylint: disable=g-import-not-at-top
  from mae_jax.train import sharding
  from mae_jax.data.source import ArraySource  # pylint: disable=g-import-not-at-top
  from mae_jax.evaluation import finetune  # pylint: disable=g-import-not-at-top
  config = aot.checked_config(tiny_config(data=2, fsdp=2), len(devices))
  cfg = eval_config().finetune
  cfg.update(batch_size=16, num_steps=10)
  source = ArraySource(np.zeros((64, 28, 28, 1), np.uint8), np.arange(64) % 10, channels=1,
                       num_classes=10, known_stats=((0.5,), (0.25,)))
  tuner = finetune.Finetuner(
      sizes.build_model(config, "tpu"), cfg, train_src=source, test_src=source,
      mesh=sharding.make_mesh(config.mesh, devices), seed=0, image_size=28,
      eval_batch_size=16, num_classes=10)
  prog = tuner.program
  step = prog.step
  if not rules:
    step = jax.jit(functools.partial(finetune.finetune_step, model=tuner.model, tx=tuner.tx,
                                     schedule=tuner.schedule, mean=(0.5,), std=(0.25,),
                                     aug=cfg),
                   in_shardings=(prog.state_shardings,
                                 {k: sharding.batch_sharding(prog.mesh) for k in prog.batch_keys},
                                 sharding.replicated(prog.mesh)), donate_argnums=0)
  return step.lower(*inputs(prog)).compile()


def inputs(prog):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  batch = prog.abstract_batch(16, {"image": ((28, 28, 1), jnp.uint8), "label": ((), jnp.int32)})
  return prog.abstract_state, batch, prog.abstract_rng()


@pytest.mark.slow
def test_finetune_step_reduce_scatters_weight_gradients_under_fsdp():
  """Fine-tuning's program, compiled for a TPU slice with FSDP: its weight gradients are
  reduce-scattered over fsdp, none of a sharded kernel (>= 4096 elements) is all-reduced
  whole, and no activation is re-sharded by feature, which the same step jitted outside the
  program builder (no activation rules) does with all-to-alls."""
  devices = aot.topology_devices(TOPOLOGY)
  compiled = finetune_program(devices)
  found = hlo.collectives(compiled.as_text(), (2, 2))
  axes = aot.by_axes(found)
  assert axes.get("reduce-scatter over fsdp", 0) > 0 and axes.get("all-gather over fsdp", 0) > 0
  whole = [(c.bytes, c.where) for c in found if c.kind == "all-reduce" and c.axes == "fsdp"
           and c.bytes >= 4096 * 4]
  assert not whole
  assert not [c for c in found if c.kind == "all-to-all"]
  plain = hlo.collectives(finetune_program(devices, rules=False).as_text(), (2, 2))
  assert [c for c in plain if c.kind == "all-to-all"]  # what the rules keep out
