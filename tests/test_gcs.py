"""gs:// paths against a real GCS API server on 127.0.0.1 (fake-gcs-server, tests/gcs_emulator.py):
Orbax checkpoints, the path layer, manifests and verification, and train.py end to end."""
import csv
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from mae_jax import paths
from mae_jax.tools import sweep, verify
from mae_jax.train import checkpoints, param_dirs, workdirs


def small_state(scale=1.0):
  return {"w": jnp.arange(4096, dtype=jnp.float32) * scale,
          "b": {"c": jnp.full((3, 5), scale, jnp.float32)}, "step": jnp.asarray(7)}


def test_orbax_manager_saves_and_restores_on_the_emulator(gcs_server, gcs_bucket):
  directory = f"{gcs_bucket}/ckpt"
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  for step in (1, 2, 3):
    manager.save(step, args=ocp.args.StandardSave(small_state(step)))
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  restored = manager.restore(3, args=ocp.args.StandardRestore(small_state()))
  manager.close()
  np.testing.assert_array_equal(restored["w"], small_state(3)["w"])
  np.testing.assert_array_equal(restored["b"]["c"], small_state(3)["b"]["c"])
  # the objects are on the server (listed by its own API), and step 1 was deleted (keep 2)
  names = gcs_server.objects(gcs_bucket[len("gs://"):], "ckpt/")
  assert {n.split("/")[1] for n in names} == {"2", "3"}
  assert "ckpt/3/commit_success.txt" in names


def test_paths_reject_a_gs_path_without_a_bucket():
  for bad, why in [("gs://", "no bucket"), ("gs:///run", "no bucket"),
                   ("gs://Bad_Bucket/run", "not a valid bucket name")]:
    with pytest.raises(paths.PathError, match=why) as e:
      paths.resolve(bad)
    assert str(e.value).startswith(f"{bad}: ")


def test_paths_write_read_list_on_gcs(gcs_bucket):
  root = f"{gcs_bucket}/run"
  paths.makedirs(root)
  paths.write_atomic(paths.join(root, "a.json"), '{"x": 1}')
  paths.write_atomic(paths.join(root, "sub", "b.bin"), b"\0\1\2")
  assert json.loads(paths.read_text(paths.join(root, "a.json"))) == {"x": 1}
  assert paths.listdir(root) == ["a.json", "sub"]
  assert paths.isdir(paths.join(root, "sub")) and paths.isfile(paths.join(root, "a.json"))
  assert not paths.exists(paths.join(root, "c.json"))
  assert paths.walk_files(root) == {"a.json": 8, "sub/b.bin": 3}


def checkpointer_with_steps(directory, steps=(2, 4)):
  ckpt = checkpoints.Checkpointer(directory, keep=3, every_steps=2)
  for step in steps:
    ckpt.save(step, small_state(step))
  ckpt.wait()
  return ckpt


def test_checkpointer_on_gcs_writes_manifests_and_restores(gcs_bucket, capsys):
  directory = f"{gcs_bucket}/run/checkpoints"
  ckpt = checkpointer_with_steps(directory)
  assert checkpoints.complete_steps(directory) == [2, 4]
  manifest = json.loads(paths.read_text(f"{directory}/4/{checkpoints.MANIFEST}"))
  assert manifest["checksum"] == "crc32c"
  listed = paths.walk_files(f"{directory}/4")
  assert {rel: size for rel, (size, _) in manifest["files"].items()} == {
      rel: size for rel, size in listed.items() if rel != checkpoints.MANIFEST}
  state, step = ckpt.restore_latest(small_state(0))
  ckpt.close()
  assert step == 4
  np.testing.assert_array_equal(state["w"], small_state(4)["w"])
  assert checkpoints.verify_all(directory) == [(2, None), (4, None)]
  assert verify.main(["verify", f"{gcs_bucket}/run"]) == 0  # a workdir: its checkpoints/
  assert capsys.readouterr().out == "step 2: ok\nstep 4: ok\n"


def largest_object(step_dir):
  files = paths.walk_files(step_dir)
  rel = max(files, key=files.get)
  return paths.join(step_dir, rel), files[rel]


@pytest.mark.parametrize("damage,expected", [
    (lambda data: data[:len(data) // 2], "is truncated"),
    (lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]), "is corrupted (its CRC-32C"),
])
def test_damaged_object_on_gcs_is_named(gcs_bucket, damage, expected, capsys):
  directory = f"{gcs_bucket}/run/checkpoints"
  checkpointer_with_steps(directory).close()
  victim, _ = largest_object(f"{directory}/4")
  paths.write_atomic(victim, damage(epath.Path(victim).read_bytes()))  # replaced on the server
  ckpt = checkpoints.Checkpointer(directory, keep=3, every_steps=2)
  with pytest.raises(checkpoints.CheckpointError) as e:
    ckpt.restore_latest(small_state(0))
  message = str(e.value)
  assert message.startswith(f"checkpoint step 4 is damaged: {victim} {expected}"), message
  assert message.endswith(f"delete {directory}/4 to resume from step 2")
  ckpt.close()
  assert [s for s, p in checkpoints.verify_all(directory) if p] == [4]
  assert verify.main(["verify", directory]) == 1
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "step 2: ok" and out[1].startswith(f"step 4: checkpoint step 4 is damaged: {victim}")


# --- train.py end to end on a gs:// workdir -------------------------------------------------

import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from test_reliability import ROOT, STEPS, assert_trees_equal, train_cmd  # noqa: E402
from trainproc import wait_stopped  # noqa: E402


@pytest.fixture(scope="module")
def train_env(tmp_path_factory, gcs_server):
  cache = tmp_path_factory.mktemp("xla_cache")
  return dict(os.environ, JAX_PLATFORMS="cpu", **gcs_server.env(),
              XLA_FLAGS="--xla_force_host_platform_device_count=2",
              JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_train(workdir, env, extra=()):
  return subprocess.run(train_cmd(workdir, extra=extra), env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def load_state(workdir, step):
  """A saved TrainState (local or gs://) as numpy arrays."""
  path = paths.join(workdir, "checkpoints", str(step), "default")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def records(workdir):
  lines = paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines()
  return [r for r in map(json.loads, lines) if "train/loss" in r]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, train_env):
  """An uninterrupted run on a local disk: what the gs:// runs must reproduce bitwise."""
  workdir = tmp_path_factory.mktemp("local") / "run"
  proc = run_train(workdir, train_env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def gs_snapshot(workdir, log_path):
  ckpts = f"{workdir}/checkpoints"
  complete = checkpoints.complete_steps(ckpts)
  writing = [s for s, _ in checkpoints.interrupted_steps(ckpts)]
  logged = [int(s) for s in re.findall(r"^step (\d+)/", open(log_path).read(), re.M)]
  return complete, writing, max(logged, default=0)


def run_and_kill_gs(workdir, env, log_path, when, what, timeout=400):
  """train.py on a gs:// workdir, SIGKILLed at the first moment `when(complete, writing,
  logged)` holds. The process is frozen (SIGSTOP) at random moments and the state looked
  at while it cannot change: listing a bucket takes longer than some of the moments last."""
  with open(log_path, "w") as log:
    proc = subprocess.Popen(train_cmd(workdir), env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + timeout
  rng = np.random.default_rng(0)
  try:
    while time.monotonic() < deadline and proc.poll() is None:
      proc.send_signal(signal.SIGSTOP)
      wait_stopped(proc.pid)
      snap = gs_snapshot(workdir, log_path)
      if when(*snap):
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        return snap, open(log_path).read()
      proc.send_signal(signal.SIGCONT)
      time.sleep(rng.uniform(0.02, 0.2))
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  pytest.fail(f"kill point not reached ({what}); exit {proc.returncode}:\n"
              f"{open(log_path).read()[-3000:]}")


@pytest.fixture(scope="module")
def gs_run(gcs_server, train_env, tmp_path_factory):
  """A gs:// run SIGKILLed mid-save, then two steps after a later checkpoint (saves on the
  emulator outlast three steps, so one is mostly in flight), then run to the end:
  (workdir, the kill snapshots, the logs)."""
  logs = tmp_path_factory.mktemp("gs_logs")
  workdir = f"gs://{gcs_server.create_bucket()}/run"
  k1, _ = run_and_kill_gs(workdir, train_env, logs / "1.log", lambda done, writing, logged: bool(
      writing and writing[-1] > max(done, default=0)), "during a checkpoint write")
  k2, log2 = run_and_kill_gs(workdir, train_env, logs / "2.log",
                             lambda done, writing, logged: bool(
                                 done and done[-1] > k1[1][-1] and logged >= done[-1] + 2),
                             "two steps after a complete checkpoint")
  final = run_train(workdir, train_env)
  assert final.returncode == 0, final.stderr[-3000:]
  return workdir, (k1, k2), (log2, final.stdout)


@pytest.mark.slow
def test_gs_run_killed_mid_save_resumes_bitwise_as_a_local_run(gs_run, local_run):
  workdir, (k1, k2), (log2, final_out) = gs_run
  half = k1[1][-1]
  resumed = f"resuming from step {k1[0][-1]}" if k1[0] else "starting from scratch"
  assert f"checkpoint step {half} was interrupted mid-write ({half}): ignored, {resumed}" in log2
  assert f"resuming from step {k2[0][-1]}" in final_out
  assert_trees_equal(load_state(workdir, STEPS), load_state(local_run, STEPS))  # bitwise
  ours, ref = json.loads(paths.read_text(f"{workdir}/summary.json")), json.loads(
      (local_run / "summary.json").read_text())
  for key in ("test_masked_mse", "baseline_masked_mse", "final_train_loss"):
    assert ours[key] == ref[key], key
  timing = ("train/input_wait",)  # wall-clock shares, not computed values
  without = lambda r: {k: v for k, v in r.items() if k not in timing}
  reference = {r["step"]: without(r) for r in records(local_run)}
  for r in records(workdir):  # every record, redone steps included, is the local run's
    assert without(r) == reference[r["step"]], r["step"]
  assert {r["step"] for r in records(workdir)} == set(reference)
  names = set(paths.listdir(workdir))
  assert {"config.json", "summary.json", "reconstructions.png", "metrics.jsonl",
          "checkpoints"} <= names
  assert any(n.startswith("events.out.tfevents.") for n in names)
  assert epath.Path(f"{workdir}/reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert checkpoints.interrupted_steps(f"{workdir}/checkpoints") == []  # cleaned up
  assert [p for _, p in checkpoints.verify_all(f"{workdir}/checkpoints")] == [None] * 3


@pytest.mark.slow
def test_visualize_and_evaluate_read_a_gs_workdir(gs_run, local_run, capsys):
  from configs.eval import get_config as eval_config
  from mae_jax.tools import evaluate, visualize
  from mae_jax.train import pretrained
  workdir, _, _ = gs_run
  pre = pretrained.load(workdir)
  assert_trees_equal(jax.device_get(pre.params), load_state(local_run, STEPS)["params"])
  out = f"{workdir}/vis.png"
  assert visualize.main([workdir, "--out", out, "--num_images", "4"]) == 0
  assert epath.Path(out).read_bytes()[:4] == b"\x89PNG"
  assert f"{workdir} at step {STEPS}: 4 images" in capsys.readouterr().out
  config = eval_config()
  config.knn.k = 5
  ours = evaluate.evaluate(config, workdir, "knn")["knn"]
  saved = json.loads(paths.read_text(f"{workdir}/eval_knn.json"))
  theirs = evaluate.evaluate(config, str(local_run), "knn")["knn"]
  assert saved["top1"] == ours["top1"] == theirs["top1"]
  assert saved["subject"] == f"{workdir} at step {STEPS}"


@pytest.mark.slow
def test_finetune_in_a_gs_workdir_stops_resumes_and_matches_a_local_one(gs_run, local_run):
  """Fine-tuning's job in WORKDIR/finetune on gs://: stopped after 4 of 6 steps (its
  checkpoints in the bucket), resumed, and the same classifier, bitwise, as an
  uninterrupted fine-tuning of the local run's encoder."""
  from configs.eval import get_config as eval_config
  from mae_jax.evaluation import finetune
  from mae_jax.tools import evaluate
  workdir, _, _ = gs_run
  config = eval_config()
  config.eval_batch_size = 32
  config.finetune.update(batch_size=16, num_steps=6, checkpoint_every_steps=2,
                         eval_every_epochs=0.0)
  config.stop_after_steps = 4
  assert evaluate.evaluate(config, workdir, "finetune") == {"finetune": None}
  assert checkpoints.complete_steps(f"{workdir}/finetune/checkpoints") == [2, 4]
  config.stop_after_steps = None
  ours = evaluate.evaluate(config, workdir, "finetune")["finetune"]
  theirs = evaluate.evaluate(config, str(local_run), "finetune")["finetune"]
  assert ours["resumed_from"] == 4 and theirs["resumed_from"] is None
  assert ours["top1"] == theirs["top1"]
  assert_trees_equal(jax.device_get(finetune.load(f"{workdir}/finetune")[1]),
                     jax.device_get(finetune.load(str(local_run / "finetune"))[1]))
  assert paths.exists(f"{workdir}/finetune/metrics.jsonl")


# --- bad input --------------------------------------------------------------------------------


def test_workdir_without_a_bucket_is_a_config_error():
  from mae_jax import trainer
  from mae_jax.train import config as config_lib
  from test_reliability import small_config
  for workdir, why in [("gs://", "no bucket"), ("gs://UPPER/run", "not a valid bucket name")]:
    with pytest.raises(config_lib.ConfigError) as e:
      trainer.train_and_evaluate(small_config(), workdir)
    assert str(e.value).startswith(f"--workdir: {workdir}: ") and why in str(e.value)


def test_missing_bucket_is_one_line_exit_2(train_env, tmp_path):
  proc = run_train("gs://no-such-bucket-here/run", train_env)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: gs://no-such-bucket-here/run/checkpoints: bucket no-such-bucket-here does not "
      "exist (or these credentials cannot see it); create it or choose another --workdir")
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_unreachable_server_is_one_line_exit_2_in_bounded_time(train_env, gcs_server):
  """A server that accepts connections and never answers (SIGSTOPped), with one request
  allowed 2 s: the run gives up after gcsfs's retries, before any training."""
  from gcs_emulator import Emulator
  bucket = gcs_server.create_bucket()
  dead = Emulator(gcs_server.root)  # the same objects, its own port: stopped at once
  dead.start()
  dead.pause()
  try:
    env = dict(train_env, **dead.env(), MAE_JAX_GCS_TIMEOUT_S="2")
    t0 = time.monotonic()
    proc = run_train(f"gs://{bucket}/run", env)
    elapsed = time.monotonic() - t0
  finally:
    dead.stop()
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: gs://{bucket}/run/checkpoints: cannot write checkpoints "
                         "there (") and "Timeout" in line, line
  assert "Traceback" not in proc.stderr
  assert elapsed < 150, elapsed


def test_folder_on_gcs_skips_and_counts_bad_images(gcs_bucket, tmp_path):
  """The same image folder on a local disk and on gs://: the same images, labels and
  skipped files (a zero-byte object and garbage fail to decode and are replaced)."""
  from mae_jax import data
  from test_reliability import folder_config, write_bad_folder
  write_bad_folder(tmp_path)
  (tmp_path / "train/a/4_link.png").unlink()  # a broken link has no Cloud Storage analogue
  root = f"{gcs_bucket}/images"
  for path in sorted(tmp_path.rglob("*")):
    if path.is_file():
      paths.write_atomic(f"{root}/{path.relative_to(tmp_path)}", path.read_bytes())
  local = data.load_source(folder_config(tmp_path), "train")
  remote = data.load_source(folder_config(root), "train")
  # listed alike, but for the zero-byte object: not stat'ed one by one on Cloud Storage
  assert [p[len(root):] for p in remote.paths] == sorted(
      [p[len(str(tmp_path)):] for p in local.paths] + ["/train/a/3_empty.png"])
  remote_images = [remote[i] for i in range(len(remote))]
  local_by_name = {p[len(str(tmp_path)):]: local[i] for i, p in enumerate(local.paths)}
  for path, example in zip(remote.paths, remote_images):
    name = path[len(root):]
    if name in local_by_name:
      np.testing.assert_array_equal(example["image"], local_by_name[name]["image"])
      assert example["label"] == local_by_name[name]["label"]
  assert sorted(p.rsplit("/", 1)[1] for p in remote.skipped) == [
      "3_empty.png", "3_garbage.jpg", "4_truncated.png"]
  assert "cannot identify image file" in remote.skipped[f"{root}/train/b/3_garbage.jpg"]


def test_parameter_directory_round_trips_through_gcs(gcs_bucket):
  """What convert import writes and --config.init_from reads (param_dirs.save_params /
  load_params) on gs://; an existing directory is never overwritten."""
  params = {"enc": {"w": jnp.arange(12.0).reshape(3, 4)}, "b": jnp.ones(5)}
  directory = f"{gcs_bucket}/imported"
  assert param_dirs.save_params(directory, params, {"model": {"width": 4}}) == directory
  assert param_dirs.is_params_dir(directory)
  loaded, fields = param_dirs.load_params(directory, target=params)
  assert fields == {"width": 4}
  assert_trees_equal(jax.device_get(loaded), jax.device_get(params))
  with pytest.raises(param_dirs.ParamsError, match="already exists"):
    param_dirs.save_params(directory, params, {"model": {}})
  with pytest.raises(param_dirs.ParamsError, match=r"do not fit the target"):
    param_dirs.load_params(directory, target={"enc": {"w": jnp.zeros((4, 4))},
                                              "b": jnp.ones(5)})


@pytest.mark.slow
def test_server_that_stops_answering_mid_save_fails_in_bounded_time(gcs_server, train_env,
                                                                    tmp_path):
  """The server freezes (SIGSTOP: connections accepted, never answered) while a checkpoint
  is being written: one `error:` line, exit 2, well before TensorStore's retries would end;
  once the server is back, the last complete checkpoint is intact and verifies."""
  workdir = f"gs://{gcs_server.create_bucket()}/run"
  env = dict(train_env, MAE_JAX_GCS_TIMEOUT_S="2", MAE_JAX_CHECKPOINT_TIMEOUT_S="20")
  log_path = tmp_path / "run.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(train_cmd(workdir), env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
      proc.send_signal(signal.SIGSTOP)
      wait_stopped(proc.pid)
      done, writing, _ = gs_snapshot(workdir, log_path)
      if done and writing and writing[-1] > done[-1]:
        gcs_server.pause()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGCONT)
        break
      proc.send_signal(signal.SIGCONT)
      time.sleep(0.05)
    else:
      pytest.fail(f"no save in flight seen:\n{log_path.read_text()[-3000:]}")
    returncode = proc.wait(timeout=240)
    elapsed = time.monotonic() - t0
  finally:
    gcs_server.resume()
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  output = log_path.read_text()
  errors = [line for line in output.splitlines() if line.startswith("error:")]
  assert returncode == 2, output[-3000:]
  assert len(errors) == 1 and workdir in errors[0], output[-3000:]
  assert "Traceback" not in output, output[-6000:]
  assert elapsed < 120, elapsed
  if "not finished after 20 s" in errors[0]:
    assert f"the last complete checkpoint, step {done[-1]}, is intact" in errors[0]
  ckpts = f"{workdir}/checkpoints"
  assert done[-1] in checkpoints.complete_steps(ckpts)
  checkpoints.verify(f"{ckpts}/{done[-1]}", done[-1], "", full=True)  # if it has a manifest
  state = load_state(workdir, done[-1])  # every array of it reads back
  assert int(state["step"]) == done[-1]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow
def test_two_processes_write_one_gs_checkpoint(gcs_server, tmp_path):
  """2 processes x 2 devices (gloo on localhost) save one checkpoint collectively into a
  gs:// workdir; it holds both processes' shards, verifies, and restores with the values
  of the same run on 1 process x 4 devices on a local disk (float rounding aside)."""
  from test_multihost import HEARTBEAT, SHORT
  from trainproc import TrainProcess, kill_started, launch_group, wait_all
  workdir = f"gs://{gcs_server.create_bucket()}/two"  # the server's variables: in os.environ
  try:
    two = launch_group(workdir, tmp_path, 2, 2, SHORT, HEARTBEAT)
    one = TrainProcess(tmp_path / "one", tmp_path, "one", devices=4, overrides=SHORT)
    codes = wait_all(two + [one], timeout=300)
  finally:
    kill_started()
  assert codes == [0, 0, 0], "\n".join(p.describe() for p in two + [one])
  ckpts = f"{workdir}/checkpoints"
  assert checkpoints.complete_steps(ckpts) == [5]
  names = paths.walk_files(f"{ckpts}/5")
  assert any("ocdbt.process_1" in n for n in names) and any("ocdbt.process_0" in n for n in names)
  assert checkpoints.verify_all(ckpts) == [(5, None)]
  ours, theirs = load_state(workdir, 5), load_state(tmp_path / "one", 5)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- the workdir lock on gs:// (workdirs.GcsWorkdirLock) -----------------------------------

import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402


def holder_text(pid, host=None):
  return json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": "then"})


def dead_pid():
  """The pid of a process of this host that has exited."""
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(proc.stdout)


def in_use(workdir, holder):
  return (f"{workdir} is in use by another run ({holder}; lock {workdir}/run.lock): wait for "
          "it to finish or stop it; if it ran on a machine that is gone, remove that lock "
          "object")


def test_gcs_lock_refuses_a_live_holder_and_one_on_another_host(gcs_bucket):
  """A lock naming a live process of this host, or any process of another host (which
  cannot be checked from here), refuses the launch naming the holder, and stays as it was."""
  workdir, host = f"{gcs_bucket}/run", socket.gethostname()
  live = subprocess.Popen(["sleep", "60"])
  gone = dead_pid()
  try:
    for text, holder in [(holder_text(live.pid), f"pid {live.pid} on host {host}, started then"),
                         (holder_text(gone, "another-vm"), f"pid {gone} on host another-vm, "
                          "started then")]:
      paths.write_atomic(f"{workdir}/run.lock", text)
      with pytest.raises(checkpoints.CheckpointError) as e:
        workdirs.lock_workdir(workdir)
      assert str(e.value) == in_use(workdir, holder)
      assert paths.read_text(f"{workdir}/run.lock") == text
  finally:
    live.kill()
    live.wait()


def test_gcs_lock_takes_over_a_dead_holder_of_this_host_and_releases_only_its_own(gcs_bucket):
  workdir, host = f"{gcs_bucket}/run", socket.gethostname()
  lock_path = f"{workdir}/run.lock"
  gone = dead_pid()
  paths.write_atomic(lock_path, holder_text(gone))
  lock = workdirs.lock_workdir(workdir)
  assert lock.note == (f"took over {lock_path}, left by a run that is no longer running (pid "
                       f"{gone} on host {host}, started then)")
  mine = json.loads(paths.read_text(lock_path))
  assert (mine["pid"], mine["host"]) == (os.getpid(), host)
  lock.release()
  assert not paths.exists(lock_path)
  lock = workdirs.lock_workdir(workdir)  # free: taken without a note
  assert lock.note is None
  paths.write_atomic(lock_path, holder_text(4242, "another-vm"))  # replaced by hand meanwhile
  lock.release()
  assert json.loads(paths.read_text(lock_path))["host"] == "another-vm"  # not ours: kept


def race(workdir, n):
  """n GcsWorkdirLock(workdir).acquire() calls in threads released at once by a barrier:
  [the lock or the CheckpointError of each]."""
  start, results = threading.Barrier(n), []

  def launch():
    start.wait()
    try:
      results.append(workdirs.GcsWorkdirLock(workdir).acquire())
    except checkpoints.CheckpointError as e:
      results.append(e)

  threads = [threading.Thread(target=launch) for _ in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert len(results) == n, results
  return results


def test_gcs_lock_has_one_winner_among_racing_launches(gcs_bucket):
  """Launches that find the workdir free at the same moment: exactly one takes the lock
  (it is created with a does-not-exist precondition), the others are refused."""
  workdir = f"{gcs_bucket}/run"
  results = race(workdir, 6)
  winners = [r for r in results if isinstance(r, workdirs.GcsWorkdirLock)]
  assert len(winners) == 1, results
  assert all(f"is in use by another run (pid {os.getpid()}" in str(r)
             for r in results if r not in winners)
  winners[0].release()
  assert not paths.exists(f"{workdir}/run.lock")


def test_gcs_lock_has_one_winner_among_racing_takeovers_of_a_dead_holder(gcs_bucket):
  """Launches of one host that all find a dead run's lock at the same moment: the stale
  lock is replaced only at the generation each read (ifGenerationMatch), so exactly one
  takes it over and the others find the winner's lock and are refused. Rounds of 8."""
  workdir = f"{gcs_bucket}/run"
  lock_path = f"{workdir}/{workdirs.LOCK_FILE}"
  gone = dead_pid()
  for _ in range(3):
    paths.write_atomic(lock_path, holder_text(gone))
    results = race(workdir, 8)
    winners = [r for r in results if isinstance(r, workdirs.GcsWorkdirLock)]
    assert len(winners) == 1, results
    assert f"(pid {gone} on host " in winners[0].note
    assert all(f"is in use by another run (pid {os.getpid()}" in str(r)
               for r in results if r is not winners[0])
    assert paths.read_text(lock_path) == winners[0].fd
    winners[0].release()
    assert not paths.exists(lock_path)


def test_gcs_lock_generation_preconditions_are_honoured(gcs_bucket):
  """What the takeover relies on, checked on the server: a write at a generation that is
  no longer the object's (replaced, or removed) is refused and changes nothing."""
  path = f"{gcs_bucket}/obj"
  paths.write_atomic(path, "first")
  data, generation = paths.read_generation(path)
  assert data == b"first"
  assert paths.replace_generation(path, "second", generation)
  assert not paths.replace_generation(path, "third", generation)  # stale generation
  data, newer = paths.read_generation(path)
  assert data == b"second" and newer != generation
  epath.Path(path).unlink()
  assert not paths.replace_generation(path, "fourth", newer)  # removed meanwhile
  assert not paths.exists(path)


@pytest.mark.slow
def test_second_launch_on_a_held_gs_workdir_is_refused_then_the_lock_taken_over(
    gcs_server, train_env, tmp_path):
  """train.py holds gs://.../run.lock: a second launch exits 2 with one line naming it;
  once the holder is SIGKILLed, the next launch takes the lock over, finishes and removes
  it."""
  workdir = f"gs://{gcs_server.create_bucket()}/run"
  lock_path = f"{workdir}/{workdirs.LOCK_FILE}"

  def holder():
    try:
      return json.loads(paths.read_text(lock_path))
    except (FileNotFoundError, ValueError):
      return {}

  with open(tmp_path / "first.log", "w") as log:
    first = subprocess.Popen(train_cmd(workdir), env=train_env, cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 300
    while holder().get("pid") != first.pid:
      assert first.poll() is None and time.monotonic() < deadline, (
          (tmp_path / "first.log").read_text()[-3000:])
      time.sleep(0.1)
    first.send_signal(signal.SIGSTOP)  # alive and holding the lock
    wait_stopped(first.pid)
    held = holder()
    second = run_train(workdir, train_env)
  finally:
    first.kill()
    first.wait()
  assert second.returncode == 2, second.stderr[-3000:]
  assert "Traceback" not in second.stderr
  assert second.stderr.strip().splitlines()[-1] == "error: " + in_use(
      workdir, f"pid {first.pid} on host {held['host']}, started {held['started']}")
  assert holder()["pid"] == first.pid  # left behind by the killed run
  third = run_train(workdir, train_env)
  assert third.returncode == 0, third.stderr[-3000:]
  assert (f"took over {lock_path}, left by a run that is no longer running (pid {first.pid} "
          f"on host {held['host']}") in third.stdout
  assert not paths.exists(lock_path)
  assert checkpoints.complete_steps(f"{workdir}/checkpoints")[-1] == STEPS


# --- no credentials ---------------------------------------------------------------------------

GCS_VARIABLES = ("GOOGLE_AUTH_TOKEN_FOR_TESTING", "STORAGE_EMULATOR_HOST",
                 "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT",
                 "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG")


@pytest.mark.slow
def test_no_credentials_is_one_line_exit_2_in_bounded_time(train_env, tmp_path):
  """A gs:// workdir with no credentials anywhere (no token, no emulator, no key file, an
  empty home without gcloud's) and no reachable server: stderr is exactly one `error:` line
  naming the workdir, exit 2, within gcsfs's retries (one request allowed 3 s)."""
  env = {k: v for k, v in train_env.items() if k not in GCS_VARIABLES}
  env.update(HOME=str(tmp_path), MAE_JAX_GCS_TIMEOUT_S="3")
  t0 = time.monotonic()
  proc = subprocess.run(train_cmd("gs://mae-jax-no-credentials/run"), env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  elapsed = time.monotonic() - t0
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-6000:]
  assert lines[0].startswith("error: gs://mae-jax-no-credentials/run/checkpoints: cannot write "
                             "checkpoints there ("), lines[0]
  assert elapsed < 200, elapsed


# --- datasets on gs:// ------------------------------------------------------------------------


def upload_tree(local, root):
  """Copy every file below the local folder `local` to gs:// `root` (same relative paths)."""
  for path in sorted(local.rglob("*")):
    if path.is_file():
      paths.write_atomic(f"{root}/{path.relative_to(local).as_posix()}", path.read_bytes())


def assert_same_batches(local, remote, processes=2, steps=3, **kwargs):
  """Each process's train batches from the two sources are equal, over `steps` steps."""
  from mae_jax import data
  for p in range(processes):
    args = dict(image_size=16, global_batch_size=4, seed=5, process_index=p,
                process_count=processes, **kwargs)
    a, b = data.make_train_batches(local, **args), data.make_train_batches(remote, **args)
    for _ in range(steps):
      x, y = next(a), next(b)
      np.testing.assert_array_equal(x["label"], y["label"])
      np.testing.assert_array_equal(x["image"], y["image"])


def test_prepared_dataset_on_gcs_gives_the_local_batches(gcs_bucket, tmp_path):
  """A prepared dataset copied to gs://: the same examples and, for each of 2 processes,
  the same batches as from the local copy (records read by ArrayRecord's own GCS reader);
  a shard that does not match the manifest is named."""
  from mae_jax import data
  from test_prepare import config as prepared_config, run_prepare, write_jpeg_folder
  write_jpeg_folder(tmp_path / "in", counts=(("train", 9), ("val", 3)), size=(30, 40))
  assert run_prepare("--folder", tmp_path / "in", "--out", tmp_path / "out", "--shard_size",
                     4, "--processes", 1) == 0
  root = f"{gcs_bucket}/prepared"
  upload_tree(tmp_path / "out", root)
  for split in ("test", "train"):
    local = data.load_source(prepared_config(tmp_path / "out"), split)
    remote = data.load_source(prepared_config(root), split)
    assert len(remote) == len(local) == {"train": 9, "test": 3}[split]
    assert remote.paths[0].startswith(f"{root}/")
    for i in range(len(local)):
      np.testing.assert_array_equal(remote[i]["image"], local[i]["image"])
      assert remote[i]["label"] == local[i]["label"]
  assert_same_batches(local, remote)  # the train split
  shard = remote.paths[0]
  paths.write_atomic(shard, epath.Path(shard).read_bytes()[:-7])
  with pytest.raises(data.DatasetError, match=rf"^{re.escape(shard)}: \d+ bytes but "
                     r"manifest.json says \d+ \(shard and manifest do not match\)$"):
    data.load_source(prepared_config(root), "train")


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_prepare_writes_and_verifies_a_dataset_on_gcs(gcs_bucket, tmp_path, capsys,
                                                      processes):
  """python -m mae_jax.prepare --out gs://... (shards uploaded by the main process or by 2
  worker processes): the same objects, sizes and manifest (every shard's sha256) as --out
  on a local disk, and the same batches; a rerun finds every shard done; --verify passes
  there, then names a shard whose bytes changed."""
  from mae_jax import data
  from test_prepare import config as prepared_config, run_prepare, write_jpeg_folder
  write_jpeg_folder(tmp_path / "in", counts=(("train", 9), ("val", 3)), size=(30, 40))
  args = ["--folder", tmp_path / "in", "--shard_size", 4]
  local, root = tmp_path / "out", f"{gcs_bucket}/prepared"
  assert run_prepare(*args, "--processes", 1, "--out", local) == 0
  assert run_prepare(*args, "--processes", processes, "--out", root) == 0
  assert paths.walk_files(root) == paths.walk_files(local)  # no temporary objects left
  manifest = json.loads(paths.read_text(f"{root}/manifest.json"))
  assert manifest == json.loads((local / "manifest.json").read_text())
  assert len(manifest["splits"]["train"]["shards"]) == 3
  capsys.readouterr()
  assert run_prepare(*args, "--out", root) == 0
  assert "resuming, 4 shards already done" in capsys.readouterr().err
  assert run_prepare("--verify", root) == 0
  assert capsys.readouterr().out == f"{root}: all shards match\n"
  remote = data.load_source(prepared_config(root), "train")
  assert_same_batches(data.load_source(prepared_config(local), "train"), remote)
  shard = remote.paths[1]
  damaged = bytearray(epath.Path(shard).read_bytes())
  damaged[-20] ^= 0xFF
  paths.write_atomic(shard, bytes(damaged))
  assert run_prepare("--verify", root) == 2
  captured = capsys.readouterr()
  assert captured.err == f"{shard}: checksum differs from manifest.json\n"
  assert captured.out == f"{root}: 1 shard(s) corrupt\n"


def test_prepare_bad_gcs_out_is_one_line_exit_2(gcs_bucket, tmp_path, capsys):
  from mae_jax.tools import prepare
  from test_prepare import write_jpeg_folder
  write_jpeg_folder(tmp_path / "in", counts=(("train", 2),))
  paths.write_atomic(f"{gcs_bucket}/an_object", b"x")
  for out, expected in [
      ("gs:///p", "--out=gs:///p: no bucket; a Cloud Storage path is gs://BUCKET/PATH"),
      ("gs://Bad_Bucket/p", "--out=gs://Bad_Bucket/p: 'Bad_Bucket' is not a valid bucket name"),
      ("gs://no-such-bucket-prepare/p", "--out=gs://no-such-bucket-prepare/p: bucket "
       "no-such-bucket-prepare does not exist (or these credentials cannot see it)"),
      (f"{gcs_bucket}/an_object", f"--out={gcs_bucket}/an_object: is an object; expected a "
       "directory")]:
    assert prepare.main(["--folder", str(tmp_path / "in"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err
  assert prepare.main(["--verify", "gs:///p"]) == 2
  assert capsys.readouterr().err == ("error: --verify=gs:///p: no bucket; a Cloud Storage "
                                     "path is gs://BUCKET/PATH\n")
  assert paths.listdir(gcs_bucket) == ["an_object"]  # nothing written


def test_prepared_dataset_in_a_missing_bucket_is_one_line(gcs_server):
  from mae_jax import data
  from test_prepare import config as prepared_config
  with pytest.raises(data.DatasetError) as e:
    data.load_source(prepared_config("gs://no-such-bucket-for-data/prepared"), "train")
  assert str(e.value) == ("data.data_dir=gs://no-such-bucket-for-data/prepared: not a "
                          "directory (data.name='prepared' needs the output of `python -m "
                          "mae_jax.prepare`)")


def test_tfds_dataset_in_a_gcs_data_dir_gives_the_local_batches(gcs_bucket, tmp_path):
  """A TFDS dataset prepared as ArrayRecord and copied to gs://: data.name=<its name> with
  data.data_dir=gs://... reads the same examples and batches as the local data_dir."""
  from mae_jax import data
  from test_data import MaeJaxTinyImages, config as tfds_config
  MaeJaxTinyImages(data_dir=str(tmp_path / "tfds"),
                   file_format="array_record").download_and_prepare()
  root = f"{gcs_bucket}/tfds"
  upload_tree(tmp_path / "tfds", root)
  for split, n in (("test", 4), ("train", 10)):
    local = data.load_source(tfds_config(name="mae_jax_tiny_images",
                                         data_dir=str(tmp_path / "tfds"), channels=3), split)
    remote = data.load_source(tfds_config(name="mae_jax_tiny_images", data_dir=root,
                                          channels=3), split)
    assert len(remote) == len(local) == n
    for i in range(n):
      np.testing.assert_array_equal(remote[i]["image"], local[i]["image"])
      assert remote[i]["label"] == local[i]["label"]
  assert_same_batches(local, remote, steps=2)  # the train split


@pytest.mark.slow
def test_tfds_dataset_on_gcs_reads_without_tensorflow(gcs_bucket, tmp_path):
  """Training's process never imports TensorFlow: TFDS's metadata on gs:// then goes
  through etils epath over gcsfs, the records through ArrayRecord, and both reach the
  server."""
  from test_data import MaeJaxTinyImages
  MaeJaxTinyImages(data_dir=str(tmp_path / "tfds"),
                   file_format="array_record").download_and_prepare()
  root = f"{gcs_bucket}/tfds"
  upload_tree(tmp_path / "tfds", root)
  code = (f"import sys, ml_collections\nfrom mae_jax import data\n"
          f"c = ml_collections.ConfigDict(dict(name='mae_jax_tiny_images', data_dir={root!r}, "
          "manual_dir=None, channels=3))\n"
          "s = data.load_source(c, 'train')\n"
          "print(len(s), sorted(s[i]['image'].shape for i in range(10))[-1], "
          "'tensorflow' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["10", "(17,", "10,", "3)", "False"]


# --- convert import / export and init_from on gs:// -------------------------------------------


@pytest.mark.slow
def test_convert_import_to_gcs_and_export_back(gcs_bucket, tmp_path, capsys):
  """An official .pth imported into gs://, exported from there (to a local .pth, to a
  gs:// .pth and to a gs:// Hugging Face directory): the same tensors every way; a taken
  gs:// output and a missing bucket are one line, exit 2."""
  import torch
  from helpers import official_state, save_pth
  from test_convert import FIELDS, HEADS, assert_same_tensors, load_pth
  from mae_jax.tools import convert
  state = official_state(FIELDS)
  src = save_pth(state, tmp_path / "x.pth")
  out = f"{gcs_bucket}/imported"
  assert convert.main(["import", src, out, *HEADS]) == 0
  assert param_dirs.read_meta(out)["model"] == FIELDS
  assert convert.main(["export", out, str(tmp_path / "back.pth")]) == 0
  assert_same_tensors(load_pth(tmp_path / "back.pth"), state)
  assert convert.main(["export", out, f"{gcs_bucket}/back.pth"]) == 0
  paths_back = torch.load(io.BytesIO(epath.Path(f"{gcs_bucket}/back.pth").read_bytes()),
                          weights_only=True)["model"]
  assert_same_tensors({k: v.numpy() for k, v in paths_back.items()}, state)
  assert convert.main(["export", out, f"{gcs_bucket}/hf", "--format", "hf"]) == 0
  assert sorted(paths.listdir(f"{gcs_bucket}/hf")) == ["config.json", "model.safetensors"]
  capsys.readouterr()
  assert convert.main(["import", src, out, *HEADS]) == 2
  assert capsys.readouterr().err == f"error: {out} already exists; choose a new output directory\n"
  assert convert.main(["import", src, "gs://no-such-bucket-convert/x", *HEADS]) == 2
  assert capsys.readouterr().err == ("error: gs://no-such-bucket-convert/x: bucket "
                                     "no-such-bucket-convert does not exist (or these "
                                     "credentials cannot see it)\n")
  assert convert.main(["export", out, f"{gcs_bucket}/back.pth"]) == 2
  assert capsys.readouterr().err == (f"error: {gcs_bucket}/back.pth exists; pass --overwrite "
                                     "to replace it\n")


@pytest.mark.slow
def test_init_from_a_gs_parameter_directory(gcs_bucket, tmp_path, capsys):
  """--config.init_from=gs://...: one step at the warmup's learning rate of 0 ends with the
  imported parameters, as from the local copy of the same import; `convert export` of its
  gs:// workdir gives back the tensors of the .pth that was imported."""
  from helpers import TINY, config_flags, model_fields, official_state, run_train_py, save_pth
  from test_convert import assert_same_tensors, load_pth
  from mae_jax.tools import convert
  fields = model_fields(mlp_ratio=4.0, mask_ratio=0.75)  # what a .pth cannot say
  state = official_state(fields, seed=4)
  src = save_pth(state, tmp_path / "x.pth")
  heads = ["--num_heads", "2", "--decoder_heads", "2"]
  assert convert.main(["import", src, f"{gcs_bucket}/init", *heads]) == 0
  assert convert.main(["import", src, str(tmp_path / "init"), *heads]) == 0
  imported, _ = param_dirs.load_params(str(tmp_path / "init"))
  finals = []
  for init, workdir in [(f"{gcs_bucket}/init", f"{gcs_bucket}/run"),
                        (str(tmp_path / "init"), tmp_path / "run")]:
    flags = config_flags({**TINY, "data.channels": 3, "num_steps": 1,
                          "checkpoint_every_steps": 1, "optim.warmup_steps": 2,
                          "init_from": init})  # step 0's learning rate is 0
    assert run_train_py(["--config", os.path.join(ROOT, "configs", "default.py"),
                         "--workdir", str(workdir), *flags]) == 0, capsys.readouterr().err[-3000:]
    finals.append(load_state(workdir, 1)["params"])
  assert_trees_equal(finals[0], finals[1])
  assert_trees_equal(finals[0], jax.device_get(imported))
  assert convert.main(["export", f"{gcs_bucket}/run", str(tmp_path / "back.pth")]) == 0
  assert_same_tensors(load_pth(tmp_path / "back.pth"), state)


# --- python -m mae_jax.sweep --workdir gs://... -----------------------------------------------


def gcs_sweep_file(tmp_path, spec='axes={"model.mask_ratio": [0.5, 0.75]}', name="toy"):
  """The toy sweep of tests/test_sweep.py (tiny model, 4 steps, synthetic data) with kNN
  as its one evaluation, as tmp_path/<name>.py."""
  from test_sweep import write_sweep
  path = write_sweep(tmp_path / f"{name}.py", name, spec)
  text = (tmp_path / f"{name}.py").read_text().replace('evals="knn,linprobe"', 'evals="knn"')
  (tmp_path / f"{name}.py").write_text(text)
  return path


def test_sweep_commands_on_gcs_and_its_one_line_errors(gcs_bucket, tmp_path, capsys):
  """--commands writes commands.sh on gs:// (each point's train.py and evaluate, or
  conv_mae, aimed at its gs:// point directory, no mkdir); a missing bucket and a path
  without a bucket are one line."""
  from helpers import exit_code
  from mae_jax.tools import sweep
  path = gcs_sweep_file(tmp_path)
  workdir = f"{gcs_bucket}/sw"
  assert exit_code(sweep.main, [path, "--workdir", workdir, "--commands"]) == 0
  lines = paths.read_text(f"{workdir}/toy/commands.sh").splitlines()[1:]
  assert len(lines) == 2 and not any("mkdir" in line for line in lines)
  for line in lines:
    point = re.search(rf"--workdir ({re.escape(workdir)}/points/[0-9a-f]{{12}}) ", line).group(1)
    assert f"-m mae_jax.evaluate --workdir {point} " in line
  conv = gcs_sweep_file(tmp_path, 'points=[{"label": "c", "program": "conv"}]', "conv")
  assert exit_code(sweep.main, [conv, "--workdir", workdir, "--commands"]) == 0
  (line,) = paths.read_text(f"{workdir}/conv/commands.sh").splitlines()[1:]
  assert re.search(rf"-m mae_jax.conv_mae .*--workdir {re.escape(workdir)}/points/"
                   r"[0-9a-f]{12} ", line), line
  capsys.readouterr()
  assert exit_code(sweep.main, [path, "--workdir", "gs://no-such-bucket-sweep/sw"]) == 2
  assert capsys.readouterr().err == ("error: --workdir gs://no-such-bucket-sweep/sw: cannot "
                                     "make gs://no-such-bucket-sweep/sw/toy there (bucket "
                                     "no-such-bucket-sweep does not exist)\n")
  assert exit_code(sweep.main, [path, "--workdir", "gs:///sw"]) == 2
  assert capsys.readouterr().err == ("error: --workdir: gs:///sw: no bucket; a Cloud Storage "
                                     "path is gs://BUCKET/PATH\n")


@pytest.mark.slow
def test_sweep_runs_on_a_gs_workdir(gcs_server, train_env, tmp_path):
  """Two ViT points (train.py + kNN as subprocesses) on gs://: each row of results.csv is
  what the point's own result objects say, the table, plots, point.json and log.txt are
  objects there, nothing is written locally, and a second run runs nothing."""
  path = gcs_sweep_file(tmp_path)
  workdir = f"gs://{gcs_server.create_bucket()}/sw"
  proc = subprocess.run([sys.executable, "-m", "mae_jax.sweep", path, "--workdir", workdir],
                        env=train_env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # nothing written locally
  out = f"{workdir}/toy"
  rows = list(csv.DictReader(io.StringIO(paths.read_text(f"{out}/results.csv"))))
  assert [r["model.mask_ratio"] for r in rows] == ["0.5", "0.75"]
  points = [f"{workdir}/points/{p}" for p in paths.listdir(f"{workdir}/points")]
  assert len(points) == 2
  by_ratio = {}
  for point in points:
    summary = json.loads(paths.read_text(f"{point}/summary.json"))
    by_ratio[str(summary["model"]["mask_ratio"])] = (
        summary, json.loads(paths.read_text(f"{point}/eval_knn.json")), point)
  for row in rows:
    summary, knn, point = by_ratio[row["model.mask_ratio"]]
    assert float(row["test_masked_mse"]) == pytest.approx(summary["test_masked_mse"])
    assert float(row["knn_top1"]) == pytest.approx(knn["top1"])
    (done,) = sweep.finished_runs(point).values()  # point.json: one finished run here
    assert done["knn_top1"] == knn["top1"]
    log = paths.read_text(f"{point}/log.txt")
    assert "-m mae_jax.pretrain" in log and "-m mae_jax.evaluate" in log
    assert checkpoints.complete_steps(f"{point}/checkpoints")[-1] == 4
  assert "| mask_ratio |" in paths.read_text(f"{out}/results.md")
  assert {n for n in paths.listdir(out) if n.endswith(".png")} == {
      "images_per_sec.png", "knn_top1.png", "summary.png", "test_masked_mse.png"}
  assert epath.Path(f"{out}/summary.png").read_bytes()[:4] == b"\x89PNG"
  again = subprocess.run([sys.executable, "-m", "mae_jax.sweep", path, "--workdir", workdir],
                         env=train_env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("done before, skipped") == 2
  assert list(csv.DictReader(io.StringIO(paths.read_text(f"{out}/results.csv")))) == rows


# --- python -m mae_jax.conv_mae --workdir gs://... --------------------------------------------

CONV_TINY = {"data.name": "synthetic", "data.synthetic_size": 64, "data.image_size": 16,
             "model.features": (8, 16), "batch_size": 16, "num_steps": 4,
             "optim.warmup_steps": 1, "eval_batch_size": 32, "log_every_steps": 2}
EVAL_TINY = {"eval_batch_size": 32, "data.train_examples": 48, "linprobe.batch_size": 16,
             "linprobe.num_steps": 6, "linprobe.optim.warmup_steps": 2}


def conv_run(workdir):
  """A 4-step conv_mae run with kNN and a 6-step linear probe into `workdir`."""
  from configs.eval import get_config as eval_config
  from mae_jax.tools import conv_mae
  from test_sweep import conv_config
  config, evaluation = conv_config(), eval_config()
  config.update_from_flattened_dict(CONV_TINY)
  evaluation.update_from_flattened_dict(EVAL_TINY)
  return conv_mae.train_and_evaluate(config, evaluation, workdir, ["knn", "linprobe"])


@pytest.mark.slow
def test_conv_mae_writes_a_gs_workdir(gcs_bucket, tmp_path):
  """conv_mae into gs:// gives the summary and evaluation results of the same run into a
  local workdir, all read back from the bucket, with its TensorBoard events and
  metrics.jsonl (training's and the probe's) uploaded."""
  workdir = f"{gcs_bucket}/conv"
  ours, theirs = conv_run(workdir), conv_run(str(tmp_path / "conv"))
  assert json.loads(paths.read_text(f"{workdir}/summary.json")) == ours
  for key in ("test_masked_mse", "test_mse", "final_train_loss", "steps"):
    assert ours[key] == theirs[key], key
  for mode in ("knn", "linprobe"):
    remote = json.loads(paths.read_text(f"{workdir}/eval_{mode}.json"))
    local = json.loads((tmp_path / "conv" / f"eval_{mode}.json").read_text())
    assert remote["top1"] == local["top1"], mode
  files = paths.walk_files(workdir)
  steps = [json.loads(line)["step"] for line in
           paths.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert steps == [json.loads(line)["step"] for line in
                   (tmp_path / "conv" / "metrics.jsonl").read_text().splitlines()]
  assert "linprobe/metrics.jsonl" in files and "linprobe/checkpoints" in {
      os.path.dirname(os.path.dirname(f)) for f in files}
  assert any(n.startswith("events.out.tfevents.") for n in files)
  assert not any(n.startswith(".write-probe") for n in files)


def test_conv_mae_bad_gs_workdir_is_one_line(gcs_bucket):
  from mae_jax.tools import cli
  from mae_jax.tools import conv_mae
  paths.write_atomic(f"{gcs_bucket}/an_object", b"x")
  for workdir, expected in [
      ("gs:///c", "--workdir gs:///c: no bucket; a Cloud Storage path is gs://BUCKET/PATH"),
      ("gs://no-such-bucket-conv/c", "--workdir gs://no-such-bucket-conv/c: bucket "
       "no-such-bucket-conv does not exist (or these credentials cannot see it)"),
      (f"{gcs_bucket}/an_object", f"--workdir '{gcs_bucket}/an_object': expected a "
       "directory (new, or this command's own)")]:
    with pytest.raises(cli.UsageError) as e:
      conv_mae.check_workdir(workdir)
    assert str(e.value) == expected
  conv_mae.check_workdir(f"{gcs_bucket}/c")  # free: the probe is written and removed
  assert paths.listdir(gcs_bucket) == ["an_object"]


@pytest.mark.slow
def test_sweep_runs_a_conv_point_on_a_gs_workdir(gcs_server, train_env, tmp_path):
  """A sweep's conv point (python -m mae_jax.conv_mae as a subprocess) on gs://: its row
  is what the point's own summary.json and eval_knn.json objects say, and a second run
  runs nothing."""
  path = gcs_sweep_file(tmp_path, 'points=[{"label": "c", "program": "conv"}]', "conv")
  workdir = f"gs://{gcs_server.create_bucket()}/sw"
  run = lambda: subprocess.run([sys.executable, "-m", "mae_jax.sweep", path, "--workdir",
                                workdir], env=train_env, cwd=ROOT, capture_output=True,
                               text=True, timeout=600)
  proc = run()
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (row,) = csv.DictReader(io.StringIO(paths.read_text(f"{workdir}/conv/results.csv")))
  (point,) = [f"{workdir}/points/{p}" for p in paths.listdir(f"{workdir}/points")]
  summary = json.loads(paths.read_text(f"{point}/summary.json"))
  assert summary["model"]["kind"] == "conv_mae"
  assert float(row["test_masked_mse"]) == pytest.approx(summary["test_masked_mse"])
  knn = json.loads(paths.read_text(f"{point}/eval_knn.json"))
  assert float(row["knn_top1"]) == pytest.approx(knn["top1"])
  assert "-m mae_jax.conv_mae" in paths.read_text(f"{point}/log.txt")
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # nothing written locally
  again = run()
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("done before, skipped") == 1


def test_failed_record_read_on_gcs_is_one_line(gcs_bucket, tmp_path):
  """A prepared dataset on gs:// whose shard disappears after start-up: reading one of its
  records is one DatasetError naming the record and the reader's reason (what
  train.py prints as one `error:` line, exit 2), not a traceback from ArrayRecord."""
  from mae_jax import data
  from test_prepare import config as prepared_config, run_prepare, write_jpeg_folder
  write_jpeg_folder(tmp_path / "in", counts=(("train", 8), ("val", 2)), size=(30, 40))
  root = f"{gcs_bucket}/prepared"
  assert run_prepare("--folder", tmp_path / "in", "--out", root, "--shard_size", 4,
                     "--processes", 1) == 0
  source = data.load_source(prepared_config(root), "train")
  assert source[0]["label"] == 0
  epath.Path(source.paths[1]).unlink()
  with pytest.raises(data.DatasetError) as e:
    source[7]
  message = str(e.value)
  assert message.startswith(f"{root}/train record 7: cannot read it (RuntimeError: "), message
  assert source.paths[1] in message and "\n" not in message


def test_failed_tfds_record_read_on_gcs_is_one_line(gcs_bucket, tmp_path):
  """The same for a TFDS dataset in a gs:// data_dir: its record files removed after
  start-up, a read is one DatasetError naming the dataset, the split and the record."""
  from mae_jax import data
  from test_data import MaeJaxTinyImages, config as tfds_config
  MaeJaxTinyImages(data_dir=str(tmp_path / "tfds"),
                   file_format="array_record").download_and_prepare()
  root = f"{gcs_bucket}/tfds"
  upload_tree(tmp_path / "tfds", root)
  source = data.load_source(tfds_config(name="mae_jax_tiny_images", data_dir=root,
                                        channels=3), "train")
  records = [n for n in paths.walk_files(root) if ".array_record" in n and "-train." in n]
  assert records
  for name in records:
    epath.Path(f"{root}/{name}").unlink()
  with pytest.raises(data.DatasetError) as e:
    source[3]
  message = str(e.value)
  assert message.startswith(f"data.name='mae_jax_tiny_images' split 'train' in {root} "
                            "record 3: cannot read it (RuntimeError: "), message
  assert "\n" not in message
