"""Accelerator topologies by name (`v5p-64`, `v6e-16`, `8xH100`, `4x8xH100`): chip count, hosts,
HBM per chip, and for TPUs the `get_topology_desc` arguments an AOT compile needs.

Imports no jax: the preflight CLI parses the topology first and sizes the fake CPU device count
from it, which must happen before jax starts.

TPU names follow Cloud TPU: the number after `v5p-` counts TensorCores (2 per chip), after `v5e-` /
`v6e-` it counts chips. Hosts: v5p has 4 chips per host; v5e/v6e slices of up to 8 chips are one
host, larger ones 4 chips per host (the GKE/MaxText layouts). HBM is the vendor figure per chip;
`usable_fraction` leaves room for what the runtime holds outside XLA's buffers (GPU: CUDA context,
cuBLAS/cuDNN workspaces, NCCL buffers; the launchers set XLA_PYTHON_CLIENT_MEM_FRACTION=0.92).
"""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipKind:
    name: str
    platform: str  # "tpu" | "gpu": the lowering platform is "tpu" / "cuda"
    hbm_bytes: int
    usable_fraction: float
    # TPU only: topology prefix, chip config and per-host bounds for jax.experimental.topologies.
    topo_prefix: str = ""
    chip_config: str = "default"
    host_bounds: tuple[int, ...] = ()
    dims: int = 2  # ICI torus dims (v5p: 3)


CHIPS = {
    # v5p: "95 GB" HBM2e per chip in Cloud docs, 96 GB in MaxText's spec map: where GB vs GiB is
    # ambiguous take the smaller reading (95e9 B = 88.5 GiB), so a "fits" is never optimistic.
    "v5p": ChipKind("v5p", "tpu", 95 * 10**9, 0.95, "v5", "megacore", (2, 2, 1), 3),
    "v6e": ChipKind("v6e", "tpu", 32 * GIB, 0.95, "v6e", "default", (2, 2, 1), 2),
    "v5e": ChipKind("v5e", "tpu", 16 * GIB, 0.95, "v5e", "default", (2, 2, 1), 2),
    "H100": ChipKind("H100", "gpu", 80 * GIB, 0.90),  # H100 SXM 80 GB (nvidia-smi: 79.6 GiB)
    "H200": ChipKind("H200", "gpu", 141 * GIB, 0.90),  # nvidia-smi: 140.4 GiB; the usable fraction covers it
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    chip: ChipKind
    chips: int
    hosts: int
    tpu_shape: tuple[int, ...] = ()  # ICI torus, e.g. (2, 4, 4) for v5p-64

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def lowering_platform(self) -> str:
        return "tpu" if self.platform == "tpu" else "cuda"

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def hbm_bytes(self) -> int:
        return self.chip.hbm_bytes

    @property
    def usable_bytes(self) -> int:
        return int(self.chip.hbm_bytes * self.chip.usable_fraction)

    def tpu_topology_kwargs(self) -> dict:
        """Arguments of jax.experimental.topologies.get_topology_desc (as MaxText's train_compile)."""
        if self.platform != "tpu":
            raise ValueError(f"{self.name} is not a TPU topology")
        c = self.chip
        return dict(topology_name=f"{c.topo_prefix}:" + "x".join(map(str, self.tpu_shape)),
                    chip_config_name=c.chip_config, chips_per_host_bounds=c.host_bounds, num_slices=1)

    def describe(self) -> str:
        hbm = self.hbm_bytes / GIB
        shape = f", ICI {'x'.join(map(str, self.tpu_shape))}" if self.tpu_shape else ""
        return (f"{self.name}: {self.chips} × {self.chip.name} ({hbm:.0f} GiB HBM each, "
                f"{self.chip.usable_fraction:.0%} usable), {self.hosts} host(s) × {self.chips_per_host}{shape}")


def _tpu_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU uses for power-of-two chip counts: 2x2(x1) for 4 chips, then the
    smallest dim doubles, the last one first on ties (v5p-64 = 32 chips = 2x4x4, v6e-32 = 4x8)."""
    if chips < 4:
        return (1,) * (dims - 1) + (chips,)
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        i = max(range(dims), key=lambda d: (-shape[d], d))
        shape[i] *= 2
    return tuple(shape)


_TPU = re.compile(r"^(v5p|v6e|v5e|v5litepod)-(\d+)$")
_GPU = re.compile(r"^(?:(\d+)x)?(\d+)x(H100|H200)$", re.IGNORECASE)
EXAMPLES = "v5p-8 … v5p-1024, v6e-8 … v6e-256, v5e-8 … v5e-256, 8xH100, 4x8xH100, 2x8xH200"


def parse(name: str) -> Topology:
    """A topology name → Topology; a clear error with examples otherwise."""
    text = name.strip()
    m = _TPU.match(text.lower())
    if m:
        gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
        n = int(m.group(2))
        chips = n // 2 if gen == "v5p" else n
        if gen == "v5p" and (n % 8 or n < 8):
            raise ValueError(f"topology {name!r}: v5p-N counts TensorCores (2 per chip, 4 chips per host), "
                             "so N must be a multiple of 8 (v5p-8 = 4 chips)")
        if chips & (chips - 1) or chips < 1:
            raise ValueError(f"topology {name!r}: only power-of-two slices are tabulated; examples: {EXAMPLES}")
        kind = CHIPS[gen]
        per_host = 4 if gen == "v5p" or chips > 8 else chips
        return Topology(f"{gen}-{n}", kind, chips, max(chips // per_host, 1), _tpu_shape(chips, kind.dims))
    m = _GPU.match(text)
    if m:
        hosts = int(m.group(1) or 1)
        per_host = int(m.group(2))
        kind = CHIPS["H100" if m.group(3).upper() == "H100" else "H200"]
        if not 1 <= per_host <= 8:
            raise ValueError(f"topology {name!r}: an HGX host has 1-8 GPUs, got {per_host}")
        return Topology(f"{hosts}x{per_host}x{kind.name}" if hosts > 1 else f"{per_host}x{kind.name}",
                        kind, hosts * per_host, hosts)
    raise ValueError(f"unknown topology {name!r}; examples: {EXAMPLES}")


_COMMENT = re.compile(r"^#\s*topology:\s*(\S+)")


def from_config_comment(text: str) -> str | None:
    """The `# topology: NAME` line a preset config opens with (the run-config schema has no key for
    it: the topology is where a config runs, not part of the run)."""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        m = _COMMENT.match(line)
        if m:
            return m.group(1)
    return None
