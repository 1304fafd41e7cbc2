"""Grouped matmul for MoE experts: rows sorted by expert, each group times its own weight matrix.

`jax.lax.ragged_dot` says exactly this and TPUs run it natively. XLA on GPU and CPU lowers it densely
instead: every row is multiplied by every expert (the group masks are applied to a [G, M, K] copy of the
input or to a [G, M, N] product). That is G× the FLOPs, and for 26B-A4B (G = 128, M = 32,768 token-expert
rows, N = 1,408) a 22 GiB buffer, which does not fit an 80 GB card next to the model.

The blocked form keeps shapes static and work proportional to the rows. Each group is padded to whole
blocks of `block` rows, so every block belongs to one expert. Then one batched GEMM multiplies the blocks by
their expert's weights, gathered per block:

    blocks  nb = ceil(M / block) + G       (an upper bound: Σ ceil(s_g / block) ≤ M / block + G)
    xp [nb, block, K] = rows scattered to their padded slots (zeros elsewhere)
    yp [nb, block, N] = xp · w[block_group]          (bf16 operands, fp32 accumulation)
    y  [M, N]         = yp gathered back from the slots

Padding costs at most G · (block − 1) extra rows; the weight gather moves nb · K · N elements, which
is bounded by (M / block + G) expert matrices, not by G · M. Autodiff gives the backward: a gather for
dx and a segment-sum of the per-block weight gradients for dw.

At 26B-A4B shapes that bound is still about 3 gathered copies of every expert matrix per product (and an
fp32 per-block weight gradient in the backward), far more traffic than the GEMMs' own. On Hopper the
"kernel" form avoids it: JAX's Pallas Mosaic-GPU grouped GEMMs (`ragged_dot_mgpu`: each output tile
reads its expert's weights in place; `transposed_ragged_dot_mgpu`: the per-expert weight gradient) under a
custom VJP:

    y  = ragged(x, w)            [M, N]
    dx = ragged(dy, wᵀ)          [M, K]   (the same kernel, reading w transposed)
    dw = transposed_ragged(x, dy) [G, K, N]

bf16 operands, fp32 accumulation, bf16 results. A weight stored [G, N, K] (`transpose_w`, as the MoE's
gate/up weight [E, 2F, D] is) takes the same three kernels in other roles (`for_nk_weights`), so no copy of
the weights is ever transposed.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from gemma_qat import devices, sharding
from gemma_qat.devices import per_device_gpu_cc_major, single_gpu_cc_major

Array = jax.Array
GROUPED_IMPLS = ("ragged", "blocked", "kernel", "auto")
KERNEL_DIM_MULTIPLE = 64  # every tile edge of the Hopper kernels below divides K and N


def grouped_matmul(x: Array, w: Array, group_sizes: Array, *, impl: str = "auto", block: int = 128,
                   preferred_element_type=jnp.float32, transpose_w: bool = False, per_device: bool = False) -> Array:
    """x [M, K] (rows sorted by group), w [G, K, N] ([G, N, K] with `transpose_w`), group_sizes [G] int
    (sum M) → [M, N].

    impl "ragged": jax.lax.ragged_dot. "blocked": the padded-block form above. "kernel": the Hopper
    Pallas kernels (bf16 result). "auto": ragged on TPU, where it is native; the kernels on one Hopper GPU
    when K and N are multiples of 64; blocked elsewhere (a Pallas call is opaque to XLA's SPMD
    partitioner, so under a multi-device mesh the blocked form, which XLA partitions, is kept, unless
    `per_device`: the caller runs inside a shard_map, its operands one device's, where the kernels serve
    under a mesh of any size)."""
    if impl not in GROUPED_IMPLS:
        raise ValueError(f"unknown grouped matmul impl {impl!r}; use one of {GROUPED_IMPLS}")
    if impl == "auto":
        impl = auto_impl(x.shape[1], w.shape[1] if transpose_w else w.shape[2], per_device=per_device)
    if impl == "kernel":
        bf16 = jnp.bfloat16
        kernels = for_nk_weights(mgpu_kernels()) if transpose_w else mgpu_kernels()
        out = kernel_grouped_matmul(x.astype(bf16), w.astype(bf16), group_sizes.astype(jnp.int32), kernels)
        return out.astype(preferred_element_type)
    if transpose_w:
        w = jnp.swapaxes(w, 1, 2)  # [G, K, N]
    if impl == "ragged":
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=preferred_element_type)
    m, k = x.shape
    g, _, n = w.shape
    nb = -(-m // block) + g
    sizes = group_sizes.astype(jnp.int32)
    blocks = (sizes + block - 1) // block  # [G] blocks per group
    row_end, block_end = jnp.cumsum(sizes), jnp.cumsum(blocks)  # [G] inclusive prefix sums
    rows = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.searchsorted(row_end, rows, side="right")  # [M]
    first_row, first_block = row_end - sizes, block_end - blocks  # [G] exclusive prefix sums
    slot = first_block[row_group] * block + rows - first_row[row_group]  # [M] padded position
    xp = jnp.zeros((nb * block, k), x.dtype).at[slot].set(x, unique_indices=True)
    block_group = jnp.searchsorted(block_end, jnp.arange(nb, dtype=jnp.int32), side="right")
    wb = w[jnp.minimum(block_group, g - 1)]  # [nb, K, N]; blocks past the last used one hold zero rows
    yp = jnp.einsum("nbk,nkf->nbf", xp.reshape(nb, block, k), wb, preferred_element_type=preferred_element_type)
    return yp.reshape(nb * block, n)[slot]  # [M, N]


def auto_impl(k: int, n: int, *, per_device: bool = False) -> str:
    if devices.platform() == "tpu":  # the target's, also when preflight compiles for a TPU from a CPU host
        return "ragged"
    cc = per_device_gpu_cc_major() if per_device else single_gpu_cc_major()
    if cc == 9 and k % KERNEL_DIM_MULTIPLE == 0 and n % KERNEL_DIM_MULTIPLE == 0:
        return "kernel"  # the kernels use Hopper's wgmma
    return "blocked"


class GroupedKernels(NamedTuple):
    """The three products of a grouped matmul and its gradient; rows sorted by group, sizes [G] int32.
    dot(x [M, K], w [G, K, N]) → [M, N]; dot_t(dy [M, N], w [G, K, N]) → [M, K] (w read transposed);
    tdot(x [M, K], dy [M, N]) → [G, K, N] (per-group xᵀ·dy)."""

    dot: Callable
    dot_t: Callable
    tdot: Callable


def _typed_like(out: Array, *like: Array) -> Array:
    """A kernel's result typed as varying over every mesh axis its operands vary over. Inside a shard_map
    a Pallas call's result carries no varying-axes type; the custom VJP's gradients must match their
    inputs' types, and its output the operands' (26B-A4B's MoE under a mesh, model/moe.py)."""
    return sharding.vary(out, set().union(*map(sharding.varying_axes, like)) - sharding.varying_axes(out))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def kernel_grouped_matmul(x: Array, w: Array, group_sizes: Array, kernels: GroupedKernels) -> Array:
    return _typed_like(kernels.dot(x, w, group_sizes), x, w)


def _kgm_fwd(x, w, group_sizes, kernels):
    return _typed_like(kernels.dot(x, w, group_sizes), x, w), (x, w, group_sizes)


def _kgm_bwd(kernels, res, dy):
    x, w, group_sizes = res
    dy = dy.astype(x.dtype)
    dx = _typed_like(kernels.dot_t(dy, w, group_sizes), x)
    dw = _typed_like(kernels.tdot(x, dy, group_sizes).astype(w.dtype), w)
    return dx, dw, None


kernel_grouped_matmul.defvjp(_kgm_fwd, _kgm_bwd)


def _swapped_tdot(x, dy, sizes, *, tdot):
    return tdot(dy, x, sizes)


@functools.cache
def for_nk_weights(kernels: GroupedKernels) -> GroupedKernels:
    """The same products for weights stored [G, N, K]: y = x·wᵀ is the dot_t kernel, dx = dy·w the dot
    kernel, and dw [G, N, K] = dyᵀ·x per group the tdot kernel with its operands swapped."""
    return GroupedKernels(kernels.dot_t, kernels.dot, functools.partial(_swapped_tdot, tdot=kernels.tdot))


class Tiles(NamedTuple):
    """Tile shape of the Hopper kernels: rows × columns of an output tile, contraction step, pipeline
    stages, and output tiles per column band of the launch order (`planar_snake`). A column edge that
    does not divide its dimension falls back to 64, which divides every dimension `auto` accepts.
    Defaults: the fastest of `bench_grouped.py --sweep` for the 26B-A4B gate/up product on an H100
    (3.59 ms fwd + bwd; grid_block_n 1 gave 3.90 ms); BENCHMARKS.md has the sweep."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 4
    grid_block_n: int = 2

    def edge(self, size: int, d: int) -> int:
        return size if d % size == 0 else KERNEL_DIM_MULTIPLE


def _mgpu_dot(x, w, sizes, *, tiles: Tiles, transpose_rhs=False):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    n = w.shape[1] if transpose_rhs else w.shape[2]
    kc = w.shape[2] if transpose_rhs else w.shape[1]
    bn = tiles.edge(tiles.block_n, n)
    return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=sizes, block_m=tiles.block_m, block_n=bn,
                                      block_k=tiles.edge(tiles.block_k, kc), max_concurrent_steps=tiles.stages,
                                      grid_block_n=tiles.grid_block_n if (n // bn) % tiles.grid_block_n == 0 else 1,
                                      transpose_rhs=transpose_rhs)


def _mgpu_tdot(x, dy, sizes, *, tiles: Tiles):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    bn = tiles.edge(tiles.block_n, dy.shape[1])
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        x, dy, group_sizes=sizes, block_m=tiles.edge(tiles.block_m, x.shape[1]), block_n=bn,
        block_k=tiles.block_k, max_concurrent_steps=tiles.stages,
        grid_block_n=tiles.grid_block_n if (dy.shape[1] // bn) % tiles.grid_block_n == 0 else 1)


@functools.cache
def mgpu_kernels(tiles: Tiles = Tiles()) -> GroupedKernels:
    return GroupedKernels(functools.partial(_mgpu_dot, tiles=tiles),
                          functools.partial(_mgpu_dot, tiles=tiles, transpose_rhs=True),
                          functools.partial(_mgpu_tdot, tiles=tiles))


def _ref_tdot(x, dy, sizes):
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(x, dy, sizes, dims, preferred_element_type=jnp.float32).astype(x.dtype)


@functools.cache
def reference_kernels() -> GroupedKernels:
    """lax.ragged_dot stand-ins with the kernels' dtypes: the custom VJP's algebra runs on any backend."""
    f32 = dict(preferred_element_type=jnp.float32)
    return GroupedKernels(
        lambda x, w, s: jax.lax.ragged_dot(x, w, s, **f32).astype(x.dtype),
        lambda dy, w, s: jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), s, **f32).astype(dy.dtype),
        _ref_tdot)
