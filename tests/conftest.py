"""Test setup: 8 fake CPU devices (set before JAX is imported), exact fp32 matmuls, and `fake_devices`
for the rules that choose a GPU kernel."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity and bit-exactness tests compare fp32 results; CPU default precision is already fp32,
# this makes the intent explicit and keeps it if a default changes.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def fake_devices(monkeypatch):
    """world(backend, count=1, cc="9.0"): make JAX report `count` devices of that backend, each with that
    CUDA compute capability (None: no such attribute, as on ROCm), for the kernel-choice rules."""
    class Dev:
        def __init__(self, cc):
            if cc is not None:
                self.compute_capability = cc

    def world(backend, count=1, cc="9.0"):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        monkeypatch.setattr(jax, "device_count", lambda: count)
        monkeypatch.setattr(jax, "devices", lambda: [Dev(cc)] * count)

    return world
