"""Test setup: 8 fake CPU devices (set before JAX is imported) and exact fp32 matmuls."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity and bit-exactness tests compare fp32 results; CPU default precision is already fp32,
# this makes the intent explicit and keeps it if a default changes.
jax.config.update("jax_default_matmul_precision", "highest")
