"""Session-wide: 8 simulated CPU devices, so sharded code runs as on an 8-device host,
and one persistent XLA compilation cache shared by the tests and the subprocesses they
start (train.py, evaluate, sweeps), so the tiny programs that many tests build compile
once per session. The cache starts empty in every session.

Single-device comparisons build their mesh over jax.devices()[:1].
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE_DIR = tempfile.mkdtemp(prefix="mae_jax_test_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_CACHE_DIR, ignore_errors=True)


import pytest  # noqa: E402

import gcs_emulator  # noqa: E402


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """A fake-gcs-server on a free 127.0.0.1 port for the whole session, with the variables
  that point TensorStore, gcsfs (and every subprocess started meanwhile) at it."""
  from mae_jax import paths  # pylint: disable=g-import-not-at-top
  paths.configure()  # as every command does before its first path
  server = gcs_emulator.Emulator(tmp_path_factory.mktemp("gcs") / "objects").start()
  saved = {k: os.environ.get(k) for k in server.env()}
  os.environ.update(server.env())
  yield server
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  server.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
  """gs://NAME of a new empty bucket on the session's server."""
  return f"gs://{gcs_server.create_bucket()}"
