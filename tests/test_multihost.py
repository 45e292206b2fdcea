"""Real multi-process runs of train.py: two processes on localhost (CPU, gloo collectives),
two devices each, against one process with four devices; checkpoints restored on other
topologies; SIGTERM / SIGINT stop every process at one agreed step; a killed process makes
the other fail within a bounded time instead of hanging."""
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from ml_collections import config_dict

from helpers import ROOT, tiny_config
from mae_jax import data
from mae_jax.data import device_resize, pipeline
from mae_jax.model import sizes
from mae_jax.tools import prepare
from mae_jax.train import checkpoints, distributed, optim, sharding, train_step as ts
from mae_jax.train import workdirs
from test_prepare import write_jpeg_folder
from trainproc import (TrainProcess, checkpoint_steps, free_port, kill_started, launch_group,
                       scalars, wait_all)

# One program for every launch (the compile cache then serves all but the first); a
# learning rate large enough that later losses depend on the earlier updates.
LONG = {"num_steps": 5000, "checkpoint_every_steps": 1000, "optim.base_lr": 0.1,
        "optim.eps": 1e-4}  # Adam's eps: no amplified rounding noise in near-zero gradients
SHORT = dict(LONG, stop_after_steps=5)  # 5 steps, saved, no final evaluation
HEARTBEAT = ["--heartbeat_timeout=5", "--shutdown_timeout=20", "--init_timeout=120"]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory, monkeypatch_module):
  monkeypatch_module.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
  monkeypatch_module.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(autouse=True)
def end_leftover_processes():
  """A test that fails while waiting leaves no train.py running on."""
  yield
  kill_started()


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """5 steps of the same run on 2 processes x 2 devices and on 1 process x 4 devices."""
  root = tmp_path_factory.mktemp("multihost")
  two = launch_group(root / "two", root, 2, 2, SHORT, HEARTBEAT)
  one = TrainProcess(root / "one", root, "one", devices=4, overrides=SHORT)
  codes = wait_all(two + [one], timeout=240)
  assert codes == [0, 0, 0], "\n".join(p.describe() for p in two + [one])
  return root, two, one


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one(runs):
  root, (p0, p1), one = runs
  losses2, losses1 = scalars(root / "two"), scalars(root / "one")
  assert sorted(losses2) == sorted(losses1) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([losses2[s] for s in range(1, 6)],
                             [losses1[s] for s in range(1, 6)], rtol=1e-5)
  assert len(set(losses2.values())) == 5  # really five different steps
  assert "4 device(s)" in p0.stdout and "step 5/5000" in p0.stdout
  # process 1 trained too, but logs, TensorBoard and the config come from process 0 only
  assert "step " not in p1.stdout and "mae_jax:" not in p1.stdout, p1.describe()
  assert len(list((root / "two").glob("events.out.tfevents.*"))) == 1
  assert checkpoint_steps(root / "two") == [5]


def abstract_run():
  """(model, tx) of the SHORT run, built as the trainer builds them."""
  c = tiny_config(SHORT)
  model = sizes.build_model(c, "cpu")
  tx, _ = optim.make_optimizer(c.optim, c.batch_size, c.optim.warmup_steps, c.num_steps)
  return model, tx


def restore_on(workdir, step, devices, data, fsdp):
  """The checkpoint's state restored onto a (data, fsdp) mesh over `devices`."""
  model, tx = abstract_run()
  mesh = sharding.make_mesh(config_dict.ConfigDict(dict(data=data, fsdp=fsdp)), devices)
  abstract = jax.eval_shape(functools.partial(ts.init_state, model, tx, image_shape=(16, 16, 1)),
                            jax.random.key(0))
  target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        abstract, sharding.state_shardings(abstract, mesh))
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", keep=3, every_steps=1000)
  try:
    state = ckpt.restore(step, target)
  finally:
    ckpt.close()
  for leaf in jax.tree.leaves(state):  # laid out as asked
    assert leaf.sharding.mesh.devices.size == len(devices)
  if fsdp > 1:  # the large kernels really are split
    assert any(x.addressable_shards[0].data.size == x.size // fsdp
               for x in jax.tree.leaves(state.params))
  return jax.device_get(state)


@pytest.mark.slow
def test_checkpoint_of_two_processes_restores_on_other_topologies(runs):
  root, _, _ = runs
  devices = jax.devices()
  on_4 = restore_on(root / "two", 5, devices[:4], 4, 1)
  on_1 = restore_on(root / "two", 5, devices[:1], 1, 1)
  on_4_fsdp = restore_on(root / "two", 5, devices[:4], 1, 4)
  assert int(on_4.step) == int(on_1.step) == int(on_4_fsdp.step) == 5
  for a, b, c in zip(jax.tree.leaves(on_4), jax.tree.leaves(on_1), jax.tree.leaves(on_4_fsdp)):
    np.testing.assert_array_equal(a, b)  # identical, whatever the topology
    np.testing.assert_array_equal(a, c)
  # the trained state, as the one-process run has it (Adam's moments are not zero)
  single = restore_on(root / "one", 5, devices[:4], 4, 1)
  for a, b in zip(jax.tree.leaves(on_4), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  mu = jax.tree.leaves(on_4.opt_state)
  assert sum(float(np.abs(x).sum()) for x in mu if np.ndim(x) > 0) > 0


def stopped_step(proc, signal_name):
  match = re.search(rf"stopped at step (\d+) \({signal_name}\)", proc.stdout)
  assert match, proc.describe()
  return int(match.group(1))


@pytest.mark.slow
def test_signals_stop_all_processes_at_one_step_and_the_next_launch_resumes(tmp_path):
  workdir = tmp_path / "run"
  # SIGTERM to process 1 alone: JAX's preemption service tells process 0, both save one step
  p0, p1 = launch_group(workdir, tmp_path, 2, 2, LONG, HEARTBEAT, tag="a")
  p0.wait_for(r"step 3/", timeout=180)
  p1.signal(signal.SIGTERM)
  codes = wait_all([p0, p1], timeout=90)
  assert codes == [0, 0], p0.describe() + p1.describe()
  first = stopped_step(p0, "SIGTERM")
  assert 3 <= first < 5000 and checkpoint_steps(workdir) == [first]

  # the next launch resumes there; Ctrl-C (SIGINT) to process 0 stops both the same way
  p0, p1 = launch_group(workdir, tmp_path, 2, 2, LONG, HEARTBEAT, tag="b")
  p0.wait_for(rf"resuming from step {first}\b", timeout=180)
  p0.wait_for(rf"step {first + 2}/", timeout=120)
  assert f"step {first}/" not in p0.stdout  # nothing before the saved step is redone
  p0.signal(signal.SIGINT)
  codes = wait_all([p0, p1], timeout=90)
  assert codes == [0, 0], p0.describe() + p1.describe()
  second = stopped_step(p0, "SIGINT")
  assert second > first and checkpoint_steps(workdir) == [first, second]


@pytest.mark.slow
def test_killed_process_makes_the_other_fail_fast(tmp_path):
  p0, p1 = launch_group(tmp_path / "run", tmp_path, 2, 2, LONG, HEARTBEAT, tag="k")
  p0.wait_for(r"step 3/", timeout=180)
  p1.kill()  # SIGKILL: no goodbye to the coordinator
  t0 = time.monotonic()
  code = p0.wait(timeout=90)
  elapsed = time.monotonic() - t0
  assert code != 0, p0.describe()
  # either our message (a collective failed) or JAX's (heartbeats stopped), both name the cause
  assert re.search(r"another (process|task) died", p0.stderr), p0.describe()
  assert elapsed < 60, f"took {elapsed:.0f} s to notice (heartbeat timeout 5 s)"


SRUN = {  # what srun sets in each of its tasks (here: task 3 of 8 on two nodes)
    "SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "8",
    "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}


@pytest.mark.parametrize("options,env,kind", [
    (distributed.Options(), {}, None),  # a lone process stays one: no distributed runtime
    (distributed.Options(), SRUN, "slurm"),
    (distributed.Options(), dict(SRUN, SLURM_NTASKS="1"), None),  # srun of one task
    (distributed.Options(), {k: v for k, v in SRUN.items() if k != "SLURM_PROCID"}, None),
    (distributed.Options(mode="off"), SRUN, None),
    (distributed.Options(), {"OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
    (distributed.Options(), {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
    # one host (what a command sets on a host without TPU chips: mae_jax.tools.cli.NO_TPU_HOST_ENV)
    (distributed.Options(), {"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    (distributed.Options(coordinator_address="h0:1234", num_processes=2, process_id=1), {},
     "flags"),
    (distributed.Options(coordinator_address="h0:1234"), SRUN, "flags"),  # flags win
    (distributed.Options(mode="on"), {}, "flags"),
])
def test_launch_kind_detects_how_the_run_was_started(options, env, kind):
  assert distributed.launch_kind(options, env) == kind


JAX_DETECTS = """
import logging
import jax
logging.basicConfig(level=logging.INFO)  # jax logs the devices it restricts the process to
try:
  jax.distributed.initialize(initialization_timeout=20)
except ValueError:  # no cluster found, no coordinator given
  print("lone")
else:
  print("joined", jax.process_count())
"""


def jax_detection(env):
  """What jax.distributed.initialize() without arguments makes of `env`, in a fresh
  process: (stdout words, stderr)."""
  clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
  proc = subprocess.run([sys.executable, "-c", JAX_DETECTS], capture_output=True, text=True,
                        env={**clean, "JAX_PLATFORMS": "cpu", **env}, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.split(), proc.stderr


def test_where_jax_cluster_detection_falls_short():
  """Why launch_kind decides before JAX's detection is asked: (1) a lone `srun` task (one
  task, local id 3) joins a one-process runtime that JAX restricts to GPU 3, where a lone
  process should drive every device; (2) Open MPI 5 sets no ORTE URI, so JAX finds no
  cluster and each of the 4 processes would train alone; ours joins (JAX then names what
  it lacks in one line) instead."""
  lone_srun = dict(SRUN, SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_STEP_NODELIST="localhost",
                   JAX_COORDINATOR_PORT=str(free_port()))
  words, stderr = jax_detection(lone_srun)
  assert words == ["joined", "1"] and "visible devices: 3" in stderr, stderr[-2000:]
  assert distributed.launch_kind(distributed.Options(), lone_srun) is None
  ompi5 = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}
  assert jax_detection(ompi5)[0] == ["lone"]
  assert distributed.launch_kind(distributed.Options(), ompi5) == "ompi"


def test_a_lone_process_does_not_join_a_distributed_runtime():
  assert distributed.initialize(distributed.Options(), env={}) is None
  assert not jax.distributed.is_initialized() and jax.process_count() == 1


@pytest.mark.parametrize("options,message", [
    (distributed.Options(num_processes=0), "--num_processes=0: must be >= 1"),
    (distributed.Options(num_processes=2, process_id=2),
     "--process_id=2: must be in [0, --num_processes=2)"),
    (distributed.Options(process_id=-1), "--process_id=-1: must be in [0,"),
    (distributed.Options(coordinator_address="h0"), "--coordinator_address=h0: expected "
     "host:port"),
    (distributed.Options(init_timeout=0), "--init_timeout=0: must be >= 1 second"),
])
def test_bad_distributed_flags_fail_before_joining(options, message):
  with pytest.raises(distributed.DistributedError) as e:
    distributed.initialize(options, env={})
  assert str(e.value).startswith(message)
  assert not jax.distributed.is_initialized()


# --- Prepared data on two processes ---------------------------------------------------------
# Each process joins the distributed runtime, reads its part of every global batch from a
# prepared dataset (recording which records it decodes), and the device-resized crops of
# both parts are gathered into the global batch. Process 0 saves what it gathered.
PREPARED_WORKER = """
import json, sys
import jax, ml_collections, numpy as np
from mae_jax import data
from mae_jax.data import device_resize
from mae_jax.train import distributed, sharding
address, pid, data_dir, out = sys.argv[1:5]
distributed.initialize(distributed.Options(coordinator_address=address, num_processes=2,
                                           process_id=int(pid)))
source = data.load_source(ml_collections.ConfigDict(dict(
    name="prepared", data_dir=data_dir, manual_dir=None, channels=3)), "train")
read, encoded = [], source.encoded
source.encoded = lambda i: (read.append(int(i)), encoded(i))[1]
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1), ("data", "fsdp"))
crops = jax.jit(lambda b: device_resize.crops_of(b, 16),
                out_shardings=sharding.batch_sharding(mesh))
batches = data.make_train_batches(
    source, image_size=16, global_batch_size=8, seed=5, repeat_samples=2, resize="device",
    process_index=jax.process_index(), process_count=jax.process_count(), start_step=1)
saved, reads = {}, []
for step in (1, 2, 3):
  local = next(batches)
  out_batch = crops(sharding.global_batch(local, mesh))
  saved[f"image{step}"] = sharding.to_host(out_batch["image"])
  saved[f"label{step}"] = sharding.to_host(out_batch["label"])
  saved[f"region{step}"] = local["region"]
  reads.append(sorted(read))
  read.clear()
np.savez(f"{out}/p{pid}.npz", **saved)
with open(f"{out}/reads{pid}.json", "w") as f:
  json.dump({"process_index": jax.process_index(), "reads": reads}, f)
"""


EVAL_FLAGS = ["--mode", "knn,linprobe,finetune", "--config.eval_batch_size=32",
              "--config.linprobe.batch_size=16", "--config.linprobe.num_steps=6",
              "--config.linprobe.log_every_steps=3", "--config.finetune.batch_size=16",
              "--config.finetune.num_steps=6", "--config.finetune.log_every_steps=3",
              "--config.finetune.eval_every_epochs=0", "--config.finetune.optim.warmup_steps=2"]


def evaluate_process(workdir, devices, flags=()):
  """`python -m mae_jax.evaluate` on `workdir` over `devices` CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-m", "mae_jax.evaluate", "--workdir", str(workdir),
                           *EVAL_FLAGS, *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_evaluate_as_one(runs, tmp_path):
  """kNN, the linear probe and fine-tuning (jobs on the loop; fine-tuning with mixup,
  RandAugment and drop-path) of one pretraining, by two processes of two devices each and
  by one of four: the same top-1s and the same training losses."""
  root, _, _ = runs
  for name in ("one", "two"):
    shutil.copytree(root / "one", tmp_path / name)  # the 4-device run's checkpoint, twice
  address = f"localhost:{free_port()}"
  procs = [evaluate_process(tmp_path / "one", 4)] + [
      evaluate_process(tmp_path / "two", 2, [f"--coordinator_address={address}",
                                              "--num_processes=2", f"--process_id={i}",
                                              *HEARTBEAT]) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-3000:] for _, e in outputs)
  assert "knn: top-1" in outputs[1][0] and "top-1" not in outputs[2][0]  # process 0 reports
  for mode in ("knn", "linprobe", "finetune"):
    one, two = (json.loads((tmp_path / n / f"eval_{mode}.json").read_text())
                for n in ("one", "two"))
    assert two["top1"] == pytest.approx(one["top1"], abs=1e-9), (mode, one, two)
  for job in ("linprobe", "finetune"):
    losses = [scalars(tmp_path / n / job) for n in ("one", "two")]
    assert sorted(losses[0]) == sorted(losses[1]) == [3, 6], (job, losses)
    np.testing.assert_allclose([losses[1][s] for s in (3, 6)],
                               [losses[0][s] for s in (3, 6)], rtol=1e-5, err_msg=job)


@pytest.mark.slow
def test_wandb_that_cannot_start_stops_every_process_at_once(tmp_path, monkeypatch):
  """W&B starts on process 0 only; where it cannot (online, no API key), every process
  stops with one line and exit 2 before the first step, not process 1 by a peer failure
  once the heartbeat times out (60 s here)."""
  monkeypatch.setenv("WANDB_MODE", "online")
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "HOME"):  # no stored login
    monkeypatch.setenv(name, str(tmp_path))
  procs = launch_group(tmp_path / "run", tmp_path, 2, 2, dict(SHORT, **{"logging.wandb": "x"}),
                       ["--heartbeat_timeout=60", "--shutdown_timeout=20", "--init_timeout=120"])
  assert wait_all(procs, timeout=200) == [2, 2], "\n".join(p.describe() for p in procs)
  p0, p1 = procs
  assert p0.stderr.startswith("error: config.logging.wandb='x': W&B did not start ("), p0.stderr
  assert p1.stderr == ("error: config.logging.wandb='x': W&B did not start on process 0 "
                       "(its log says why)\n"), p1.stderr
  assert checkpoint_steps(tmp_path / "run") == []


@pytest.mark.slow
def test_a_held_workdir_stops_every_process_at_once(tmp_path):
  """Only process 0 takes the workdir's lock; where another run holds it, every process
  stops with one line and exit 2 (process 1 told by process 0), and nothing is written."""
  (tmp_path / "run").mkdir()
  with workdirs.WorkdirLock(tmp_path / "run"):
    procs = launch_group(tmp_path / "run", tmp_path, 2, 2, SHORT, HEARTBEAT)
    assert wait_all(procs, timeout=200) == [2, 2], "\n".join(p.describe() for p in procs)
  p0, p1 = procs
  assert f"is in use by another run (pid {os.getpid()}" in p0.stderr, p0.stderr
  assert p1.stderr == (f"error: {tmp_path / 'run'} is in use by another run (process 0 names "
                       "it)\n"), p1.stderr
  assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints"]  # the write probe's folder


def run_two_workers(script, *args):
  """`python -c script ADDRESS PROCESS_ID *args` as two real processes of one
  jax.distributed runtime on localhost, two CPU devices each; both must exit 0."""
  address = f"localhost:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "-c", script, address, str(p), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for p in range(2)]
  try:
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for _, e in outputs)


@pytest.mark.slow
def test_two_processes_read_their_parts_of_a_prepared_dataset(tmp_path):
  """Two real processes (jax.distributed on localhost) each decode only the records of
  their half of every global batch; gathered, the device-resized crops are the global batch
  of one process reading it all."""
  write_jpeg_folder(tmp_path / "in", counts=(("train", 20), ("val", 4)), size=(40, 50))
  assert prepare.main(["--folder", str(tmp_path / "in"), "--out", str(tmp_path / "ds"),
                       "--shard_size", "6", "--processes", "1"]) == 0
  run_two_workers(PREPARED_WORKER, str(tmp_path / "ds"), str(tmp_path))
  one = data.load_source(config_dict.ConfigDict(dict(
      name="prepared", data_dir=str(tmp_path / "ds"), manual_dir=None, channels=3)), "train")
  want = data.make_train_batches(one, image_size=16, global_batch_size=8, seed=5,
                                 repeat_samples=2, resize="device", start_step=1)
  parts = [np.load(tmp_path / f"p{p}.npz") for p in range(2)]
  reads = [json.loads((tmp_path / f"reads{p}.json").read_text()) for p in range(2)]
  assert [r["process_index"] for r in reads] == [0, 1]
  for i, step in enumerate((1, 2, 3)):
    w = next(want)
    indices = pipeline.global_indices(5, step, len(one), 8, 2)
    for p in range(2):  # process p decoded exactly its half's records, each once
      assert reads[p]["reads"][i] == sorted(set(indices[4 * p:4 * p + 4].tolist()))
      np.testing.assert_array_equal(parts[p][f"region{step}"], w["region"][4 * p:4 * p + 4])
    crops = jax.jit(lambda b: device_resize.crops_of(b, 16))(w)
    for p in range(2):  # every process holds the whole gathered global batch
      np.testing.assert_array_equal(parts[p][f"label{step}"], w["label"])
      diff = np.abs(parts[p][f"image{step}"].astype(int) - np.asarray(crops["image"]))
      assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
  assert not set(reads[0]["reads"][0]) & set(reads[1]["reads"][0])


KNN_WORKER = r"""
import sys
import jax
address, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(address, num_processes=2, process_id=pid)
import numpy as np
from ml_collections import config_dict
from mae_jax.evaluation import knn
from mae_jax.train import sharding
rng = np.random.default_rng(0)
train = (rng.normal(size=(40, 8)).astype(np.float32), rng.integers(0, 3, 40))
test = (rng.normal(size=(11, 8)).astype(np.float32), rng.integers(0, 3, 11))
mesh = sharding.make_mesh(config_dict.ConfigDict({"data": -1, "fsdp": 1}))
top1 = knn.knn_top1(train, test, k=5, temperature=0.07, num_classes=3, mesh=mesh,
                    batch_size=4)
open(f"{out}/knn{pid}.txt", "w").write(repr(top1))
"""


@pytest.mark.slow
def test_two_processes_agree_on_knn_top1(tmp_path):
  """kNN top-1 over a mesh of two real processes (each holding half of every padded test
  batch, counting on the devices) is the accuracy a brute-force vote in numpy gives."""
  run_two_workers(KNN_WORKER, str(tmp_path))
  rng = np.random.default_rng(0)  # the workers' features
  train_x, train_y = rng.normal(size=(40, 8)), rng.integers(0, 3, 40)
  test_x, test_y = rng.normal(size=(11, 8)), rng.integers(0, 3, 11)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sim = unit(test_x) @ unit(train_x).T
  top = np.argsort(-sim, axis=1)[:, :5]
  votes = np.zeros((11, 3))
  for i in range(11):
    np.add.at(votes[i], train_y[top[i]], np.exp(sim[i, top[i]] / 0.07))
  want = np.mean(votes.argmax(1) == test_y)
  assert 0 < want < 1  # a vote that can be wrong both ways
  for p in range(2):
    assert float((tmp_path / f"knn{p}.txt").read_text()) == pytest.approx(want, abs=1e-9)
