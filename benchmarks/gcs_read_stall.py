"""What a read of a prepared dataset on gs:// does when the server stops answering mid-run.

  python benchmarks/gcs_read_stall.py --server pause   # accepts connections, never answers
  python benchmarks/gcs_read_stall.py --server stop    # refuses connections
  python benchmarks/gcs_read_stall.py --server pause --train

A small prepared dataset (3 shards) is put on a local fake-gcs-server. A child process
(MAE_JAX_GCS_TIMEOUT_S=2) opens it as training does (manifest and listing through gcsfs,
each shard's record count through ArrayRecord) and reads a record of the first shard; the
server is then frozen (SIGSTOP) or stopped, and the child reads a record of the last shard:
a read by ArrayRecord's own Cloud Storage reader (google-cloud-cpp), not by gcsfs. One JSON
line: how the read ended (a record, an error, or still waiting at --limit) and after how
many seconds.

--train: train.py instead (a tiny model, a local workdir) on a larger prepared dataset on
gs:// (shards of about 1 MB, so records keep being fetched), the server frozen or stopped
once steps are logged; how long the run then goes on, its exit code and its last line.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from gcs_emulator import Emulator  # noqa: E402
from mae_jax import paths  # noqa: E402
from mae_jax.tools import prepare

CHILD = """
import json, sys, time, ml_collections
from mae_jax import data
config = ml_collections.ConfigDict(dict(name="prepared", data_dir=sys.argv[1],
                                        manual_dir=None, channels=3))
source = data.load_source(config, "train")
source[0]
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
try:
  image = source[len(source) - 1]["image"]
  outcome = {"outcome": "record", "shape": list(image.shape)}
except Exception as e:
  outcome = {"outcome": "error", "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
outcome["seconds"] = round(time.monotonic() - t0, 1)
print(json.dumps(outcome), flush=True)
"""


def write_dataset(tmp, train=12, val=0, side=32, shard_size=4):
  """tmp/out: a prepared dataset of noise JPEGs (side x side) in shards of shard_size."""
  rng = np.random.default_rng(0)
  for split, count in (("train", train), ("val", val)):
    for i in range(count):
      directory = os.path.join(tmp, "in", split, f"c{i % 3}")
      os.makedirs(directory, exist_ok=True)
      image = rng.integers(0, 256, (side, side, 3), np.uint8)
      Image.fromarray(image).save(os.path.join(directory, f"{i:03d}.jpg"), quality=95)
  assert prepare.main(["--folder", os.path.join(tmp, "in"), "--out", os.path.join(tmp, "out"),
                       "--shard_size", str(shard_size), "--processes", "1"]) == 0
  return os.path.join(tmp, "out")


def time_train(root, server, how, limit, tmp):
  """train.py on `root` until steps are logged, then the server frozen or stopped: how the
  run ended, after how many seconds, and its last line."""
  fields = {"data.name": "prepared", "data.data_dir": root, "data.channels": 3,
            "data.image_size": 16, "model.patch_size": 4, "model.width": 32,
            "model.depth": 1, "model.num_heads": 2, "model.decoder_width": 32,
            "model.decoder_depth": 1, "model.decoder_heads": 2, "batch_size": 16,
            "num_steps": 100000, "log_every_steps": 1, "checkpoint_every_steps": 100000}
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, "configs", "default.py"), "--workdir", os.path.join(tmp, "run"),
         *[f"--config.{k}={v}" for k, v in fields.items()]]
  env = dict(os.environ, MAE_JAX_GCS_TIMEOUT_S="2", JAX_PLATFORMS="cpu")
  log_path = os.path.join(tmp, "train.log")
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  try:
    while len(re.findall(r"^step (\d+)/", open(log_path).read(), re.M)) < 3:
      assert proc.poll() is None, open(log_path).read()[-3000:]
      time.sleep(0.2)
    server.pause() if how == "pause" else server.stop()
    t0 = time.monotonic()
    steps_then = len(re.findall(r"^step (\d+)/", open(log_path).read(), re.M))
    try:
      proc.wait(timeout=limit)
      outcome = {"outcome": f"exit {proc.returncode}"}
    except subprocess.TimeoutExpired:
      outcome = {"outcome": "still running"}
    outcome["seconds"] = round(time.monotonic() - t0, 1)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  text = open(log_path).read()
  steps = re.findall(r"^step (\d+)/", text, re.M)
  lines = [line for line in text.splitlines() if line.strip()]
  return dict(outcome, steps_logged_after=len(steps) - steps_then,
              last_step=int(steps[-1]) if steps else None, last_line=lines[-1][:400],
              tracebacks=text.count("Traceback"))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--server", choices=("pause", "stop"), default="pause")
  p.add_argument("--limit", type=float, default=1800, help="seconds to wait for the read")
  p.add_argument("--train", action="store_true", help="time a train.py run instead")
  args = p.parse_args()
  tmp = tempfile.mkdtemp(prefix="gcs_read_stall_")
  try:
    run(args, tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp):
  local = (write_dataset(tmp, train=256, val=16, side=96, shard_size=64) if args.train
           else write_dataset(tmp))
  server = Emulator(os.path.join(tmp, "objects")).start()
  os.environ.update(server.env())
  root = f"gs://{server.create_bucket()}/prepared"
  for name in os.listdir(local):
    with open(os.path.join(local, name), "rb") as f:
      paths.write_atomic(f"{root}/{name}", f.read())
  if args.train:
    try:
      result = time_train(root, server, args.server, args.limit, tmp)
    finally:
      server.stop()
    print(json.dumps(dict(result, server=args.server, train=True, mae_jax_gcs_timeout_s=2)))
    return
  env = dict(os.environ, MAE_JAX_GCS_TIMEOUT_S="2", JAX_PLATFORMS="cpu")
  child = subprocess.Popen([sys.executable, "-c", CHILD, root], env=env, cwd=ROOT, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  try:
    assert child.stdout.readline().strip() == "ready"
    server.pause() if args.server == "pause" else server.stop()
    t0 = time.monotonic()
    child.stdin.write("go\n")
    child.stdin.flush()
    try:
      line = child.communicate(timeout=args.limit)[0].strip().splitlines()[-1]
      result = dict(json.loads(line), exit=child.returncode)
    except subprocess.TimeoutExpired:
      result = {"outcome": "still waiting", "seconds": round(time.monotonic() - t0, 1)}
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()
    server.stop()
  print(json.dumps(dict(result, server=args.server, mae_jax_gcs_timeout_s=2)))


if __name__ == "__main__":
  main()
