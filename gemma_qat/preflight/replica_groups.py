"""Replica groups of an HLO collective: which devices each group holds, in all the spellings XLA prints.

    replica_groups={{0,1},{2,3}}          explicit
    replica_groups={}                     every device (partitions × replicas)
    replica_groups=[2,4]<=[8]             iota: arange(8).reshape(2, 4), one group per row
    replica_groups=[4,2]<=[2,4]T(1,0)     iota, transposed before the reshape
    replica_groups=mesh['x'=2,'y'=4] {'y'}        mesh axes (jax ≥ 0.10 on XLA:CPU and GPU): the devices
    replica_groups=mesh['x'=8] {'x':(2)4}         differing only along the listed axes; 'x':(m)k is the
                                                  sub-axis of size k after a pre-size m (Shardy's notation)
    source_target_pairs={{0,1},{1,2}}     collective-permute: one "group" per pair

The mesh form's devices are assumed in iota order (the printed form carries no device list).
"""

from __future__ import annotations

import math
import re

import numpy as np

from gemma_qat.preflight.hlo import Instruction


def iota_groups(spec: str) -> list[list[int]] | None:
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec.replace(" ", ""))
    if not m:
        return None
    rows = int(m.group(1).split(",")[0])
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(rows, -1).tolist()


_MESH = re.compile(r"mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'?([\w.\-]+)'?\s*=\s*(\d+)")
_GROUP_AXIS = re.compile(r"'?([\w.\-]+)'?(?::\((\d+)\)(\d+))?")


def mesh_groups(spec: str) -> list[list[int]] | None:
    m = _MESH.search(spec)
    if not m:
        return None
    axes = [(name, int(size)) for name, size in _MESH_AXIS.findall(m.group(1))]
    refs = [_GROUP_AXIS.fullmatch(r.strip()) for r in m.group(2).split(",") if r.strip()]
    if not axes or any(r is None for r in refs):
        return None
    # Split each mesh axis, major to minor, at the boundaries of the sub-axes the groups name.
    factors: list[tuple[str, int, int]] = []  # (axis, pre-size: product of the factors before it, size)
    for name, size in axes:
        cuts = {1, size}
        for r in refs:
            if r.group(1) == name and r.group(2):
                cuts |= {int(r.group(2)), int(r.group(2)) * int(r.group(3))}
        cuts = sorted(cuts)
        factors += [(name, lo, hi // lo) for lo, hi in zip(cuts, cuts[1:])]
    wanted: list[int] = []
    for r in refs:
        lo = int(r.group(2)) if r.group(2) else 1
        hi = lo * int(r.group(3)) if r.group(2) else math.inf
        idx = [i for i, (a, pre, _) in enumerate(factors) if a == r.group(1) and lo <= pre < hi]
        if not idx:
            return None
        wanted += idx
    dims = [s for _, _, s in factors]
    ids = np.arange(math.prod(dims)).reshape(dims)
    rest = [i for i in range(len(dims)) if i not in wanted]
    return ids.transpose(rest + wanted).reshape(-1, math.prod(dims[i] for i in wanted)).tolist()


def parse(inst: Instruction, num_devices: int) -> tuple[int, list[list[int]] | None]:
    """(group size, device ids of each group; None when the spelling is not understood)."""
    pairs = inst.attr("source_target_pairs")
    if pairs is not None:
        groups = [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)\}", pairs)]
        return len({d for g in groups for d in g}), groups
    spec = inst.attr("replica_groups")
    if spec is None or spec.replace(" ", "") in ("{}", "{{}}"):
        return num_devices, [list(range(num_devices))]
    if spec.startswith("mesh"):
        groups = mesh_groups(spec)
    elif spec.startswith("["):
        groups = iota_groups(spec)
    else:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", spec)]
    if not groups:
        return num_devices, None
    return len(groups[0]), groups
