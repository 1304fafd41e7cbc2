"""What the process runs on, for the choices between a Pallas kernel and the XLA path."""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("gemma_qat_target_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Steps traced inside are for `platform` ("tpu" | "gpu" | "cpu") whatever this process runs on:
    preflight compiling for a TPU slice from a CPU host must choose what a TPU run chooses (`auto`
    picked the grouped matmul for the host, and 26B-A4B's step for v5p-128 gathered an expert weight
    per row block: 4.2 TB of all-reduce per step per chip, launch/README.md)."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def platform() -> str:
    """The platform the current trace is for: `compiling_for`'s, else the process's default backend."""
    return _TARGET.get() or jax.default_backend()


def active_mesh_devices() -> int:
    """Devices of the mesh the current trace is sharded over (`jax.set_mesh`, as sharding.activate sets
    it); 1 outside any mesh."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    if mesh is None or getattr(mesh, "empty", True):
        return 1
    return math.prod(mesh.axis_sizes)


def single_gpu_cc_major() -> int | None:
    """The CUDA compute capability's major number (9 = Hopper) when the process sees exactly one GPU and
    the step is not traced for a multi-device mesh; None otherwise: no GPU, several devices, a mesh of
    several (a Pallas call is opaque to XLA's SPMD partitioner, which gathers its whole input to every
    device: a one-GPU host compiling for 8xH100 would otherwise cost a kernel that no cluster runs), or a
    GPU without a CUDA capability (ROCm)."""
    if jax.device_count() != 1 or active_mesh_devices() > 1:
        return None
    return per_device_gpu_cc_major()


def per_device_gpu_cc_major() -> int | None:
    """The same for a computation that runs on each device on its own (inside a shard_map, where every
    operand is one device's and a Pallas call needs no partitioning), under a mesh of any size: the
    capability of the GPUs this process compiles with, None off a GPU. A topology compile from a GPU
    host takes the attached GPU's capability for the target's (preflight's GPU targets, H100 and H200,
    are both Hopper, 9)."""
    if platform() != "gpu" or jax.default_backend() != "gpu":
        return None
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    try:
        return int(cc.split(".")[0])
    except ValueError:
        return None


KERNEL_IMPLS = ("auto", "xla", "pallas")


def use_triton_kernel(impl: str, fits: bool, *, what: str, unfit: str) -> bool:
    """The rule behind every `impl = auto | xla | pallas` choice of a Pallas (Triton) kernel: 'xla' never;
    'pallas' always, with an error naming `unfit` when the shape cannot take the kernel; 'auto' where it
    fits and the process has one NVIDIA GPU of compute capability 8.0 or newer (Triton's NVIDIA backend;
    ROCm and unknown GPUs keep XLA). `what` names the choice in the unknown-value error."""
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"unknown {what} implementation {impl!r}; choose one of {KERNEL_IMPLS}")
    if impl == "xla":
        return False
    if impl == "pallas":
        if not fits:
            raise ValueError(unfit)
        return True
    cc = single_gpu_cc_major()
    return fits and cc is not None and cc >= 8
