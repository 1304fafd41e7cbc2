"""What the process runs on, for the choices between a Pallas kernel and the XLA path."""

from __future__ import annotations

import jax


def single_gpu_cc_major() -> int | None:
    """The CUDA compute capability's major number (9 = Hopper) when the process sees exactly one GPU;
    None otherwise: no GPU, several devices (a Pallas call is opaque to XLA's SPMD partitioner, so the
    kernels stay off under a multi-device mesh), or a GPU without a CUDA capability (ROCm)."""
    if jax.default_backend() != "gpu" or jax.device_count() != 1:
        return None
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    try:
        return int(cc.split(".")[0])
    except ValueError:
        return None
