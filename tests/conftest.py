"""Session-wide: 8 simulated CPU devices, so sharded code runs as on an 8-device host.

Single-device comparisons build their mesh over jax.devices()[:1].
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
