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
