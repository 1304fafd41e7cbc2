"""Device mesh and the logical-axis rules of each parallelism (`mesh.parallelism` in a run config).

Layers name logical axes only (`embed`, `q_heads`, `act_batch`, ...); this file is the one place
that says which mesh axes they map to. Adding a parallelism means adding a table, not touching the
model. (The key was once `mesh.recipe`; a quantization recipe is another thing.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

_BATCH = ("data", "fsdp")
_COMMON = (("norm", None), ("head_dim", None), ("act_seq", None), ("act_embed", None))

# Each parallelism: logical name → mesh axis / tuple of axes / None (replicated). A mesh axis serves one
# dimension per array, taken in rule order: "ple" → fsdp shards the E models' PLE table [V, L, P]
# (2.35 B parameters in E2B) along P, while weights that also have "embed" keep fsdp on the model dim.
RULES: dict[str, tuple[tuple[str, object], ...]] = {
    # Parameters sharded over `fsdp` along the model dim; batch over data×fsdp.
    "fsdp": _COMMON + (
        ("act_batch", _BATCH), ("embed", "fsdp"), ("vocab", None), ("q_heads", None), ("kv_heads", None),
        ("mlp", None), ("ple", "fsdp"), ("expert", None), ("expert_mlp", None),
        ("act_heads", None), ("act_mlp", None), ("act_vocab", None)),
    # Plus Megatron-style tensor parallelism over heads, FFN hidden and vocab.
    "fsdp_tp": _COMMON + (
        ("act_batch", _BATCH), ("embed", "fsdp"), ("vocab", "tensor"), ("q_heads", "tensor"),
        ("kv_heads", "tensor"), ("mlp", "tensor"), ("ple", "fsdp"), ("expert", None), ("expert_mlp", "tensor"),
        ("act_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor")),
    # Plus expert parallelism: experts over `expert`, which also carries batch outside the MoE.
    "fsdp_tp_ep": _COMMON + (
        ("act_batch", _BATCH + ("expert",)), ("embed", "fsdp"), ("vocab", "tensor"), ("q_heads", "tensor"),
        ("kv_heads", "tensor"), ("mlp", "tensor"), ("ple", "fsdp"), ("expert", "expert"),
        ("expert_mlp", "tensor"), ("act_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor")),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one may be -1 (takes what the devices leave)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    parallelism: str = "fsdp"  # a key of RULES

    def __post_init__(self):
        if self.parallelism not in RULES:
            raise ValueError(f"mesh.parallelism={self.parallelism!r} must be one of {sorted(RULES)}")
        sizes = [self.data, self.fsdp, self.tensor, self.expert]
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, sizes))}")

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = [self.data, self.fsdp, self.tensor, self.expert]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: "
                                 f"{num_devices} is not a multiple of {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                             f"{num_devices} are present; make the product of the axes equal {num_devices}")
        return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules(parallelism: str):
    return RULES[parallelism]


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dims they do not divide (e.g. 1 KV head over tensor=2): that dim stays
    replicated rather than failing; everything else keeps its sharding."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept, size = [], 1
        for a in names:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def tree_shardings(abstract_tree, logical_specs, mesh: Mesh, parallelism: str):
    """NamedSharding per leaf from its logical PartitionSpec under the parallelism's rules."""
    def one(a, spec):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules(parallelism))
        return NamedSharding(mesh, _fit(mesh_spec, tuple(a.shape), mesh))
    return jax.tree.map(one, abstract_tree, logical_specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def logical_shards(name: str) -> int:
    """How many ways the active mesh and rules (`activate`) split logical axis `name`; 1 outside them.
    For choices a layer makes by layout (a fused kernel that needs equal shardings), never for math."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    if mesh is None or getattr(mesh, "empty", True):
        return 1
    return math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes)).get(a, 1) for a in mesh_axes(name))


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes that the active rules (`activate`) map logical axis `name` to; () for none. For a
    layer's shard_map specs, which speak mesh axes."""
    axes = nn.logical_to_mesh_axes((name,))[0]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_sharding(mesh: Mesh, parallelism: str) -> NamedSharding:
    """[B, T] inputs: batch over the parallelism's batch axes."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("act_batch", None), rules(parallelism)))


@contextlib.contextmanager
def activate(mesh: Mesh, parallelism: str) -> Iterator[None]:
    """Context in which the model's logical activation constraints resolve against `mesh`."""
    # `jax.set_mesh` replaces the deprecated `with mesh:`; older jax only has the latter.
    mesh_ctx = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh
    with mesh_ctx, nn.logical_axis_rules(rules(parallelism)):
        yield


def varying_axes(a: jax.Array) -> set[str]:
    """The mesh axes a value varies over inside a shard_map (none outside one): `aval.mat.varying` on
    jax ≥ 0.10, `aval.vma` before."""
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()) or ())


def vary(a: jax.Array, axes) -> jax.Array:
    """`a` typed as varying over `axes` too (values unchanged); the axes must be ones it is invariant over."""
    axes = tuple(sorted(axes))
    if not axes:
        return a
    return jax.lax.pcast(a, axes, to="varying") if hasattr(jax.lax, "pcast") else jax.lax.pvary(a, axes)
