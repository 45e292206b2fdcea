"""What a read of a prepared dataset on gs:// does when the server stops answering mid-run.

  python benchmarks/gcs_read_stall.py --server pause   # accepts connections, never answers
  python benchmarks/gcs_read_stall.py --server stop    # refuses connections

A small prepared dataset (3 shards) is put on a local fake-gcs-server. A child process
(MAE_JAX_GCS_TIMEOUT_S=2) opens it as training does (manifest and listing through gcsfs,
each shard's record count through ArrayRecord) and reads a record of the first shard; the
server is then frozen (SIGSTOP) or stopped, and the child reads a record of the last shard:
a read by ArrayRecord's own Cloud Storage reader (google-cloud-cpp), not by gcsfs. One JSON
line: how the read ended (a record, an error, or still waiting at --limit) and after how
many seconds.
"""
import argparse
import json
import os
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
from mae_jax import paths, prepare  # noqa: E402

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


def write_dataset(tmp):
  """tmp/out: a prepared dataset of 12 JPEGs in 3 shards of 4."""
  rng = np.random.default_rng(0)
  for i in range(12):
    directory = os.path.join(tmp, "in", f"c{i % 3}")
    os.makedirs(directory, exist_ok=True)
    image = rng.integers(0, 256, (24, 32, 3), np.uint8)
    Image.fromarray(image).save(os.path.join(directory, f"{i:03d}.jpg"))
  assert prepare.main(["--folder", os.path.join(tmp, "in"), "--out", os.path.join(tmp, "out"),
                       "--shard_size", "4", "--processes", "1"]) == 0
  return os.path.join(tmp, "out")


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--server", choices=("pause", "stop"), default="pause")
  p.add_argument("--limit", type=float, default=1800, help="seconds to wait for the read")
  args = p.parse_args()
  tmp = tempfile.mkdtemp(prefix="gcs_read_stall_")
  local = write_dataset(tmp)
  server = Emulator(os.path.join(tmp, "objects")).start()
  os.environ.update(server.env())
  root = f"gs://{server.create_bucket()}/prepared"
  for name in os.listdir(local):
    with open(os.path.join(local, name), "rb") as f:
      paths.write_atomic(f"{root}/{name}", f.read())
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
