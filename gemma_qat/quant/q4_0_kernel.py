"""Q4_0 fake-quant as one Pallas (Triton) kernel: each fp32 weight is read once and its dequantized value
written once, in the compute dtype.

Under XLA the block max is a reduction and the quantize/dequantize/cast its same-shape consumer; XLA:GPU
keeps them in two fusions, so every weight is read twice per fake-quant (BENCHMARKS.md, attempt 10). Here a
program loads a tile that holds whole blocks of 32, finds each block's first max-|x| element in registers
and writes the dequantized tile. The codes come from `formats.q4_0_codes`, the XLA path's own function, so
the two paths are bit-identical (tests: interpret mode on CPU; `benchmarks/bench_q4_0.py` on the GPU).

A pallas_call is opaque to the SPMD partitioner, so `use_kernel` picks it only on one GPU; elsewhere the
policy keeps the XLA path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gemma_qat.devices import KERNEL_IMPLS, use_triton_kernel
from gemma_qat.quant import formats

BLOCK = formats.Q4_0_BLOCK_SIZE
_MIN_TILE = 16
IMPLS = KERNEL_IMPLS


class Launch(NamedTuple):
    """`tile`: the most elements of the tile's other dimension (32 × 128 fp32 = 16 KiB per program);
    `num_warps`: Triton warps per program (None = Pallas' default). The defaults won `bench_q4_0.py --sweep`
    on an H100 (BENCHMARKS.md): 3.94 ms over bench-1b's weights, against 4.96 ms at 256 and the default warps."""

    tile: int = 128
    num_warps: int | None = 4


TILE = Launch().tile


def _tile(n: int, most: int = TILE) -> int:
    """The largest power of two <= `most` that divides n (Triton blocks are powers of two); 0 if < 16."""
    t = most
    while t >= _MIN_TILE:
        if n % t == 0:
            return t
        t //= 2
    return 0


def _view(shape: tuple[int, ...], axis: int) -> tuple[tuple[int, int], bool] | None:
    """The 2-D view the kernel runs on, and whether the blocks run along its rows (axis 0).

    Blocks along a leading or middle axis: [prod(before)·K, prod(after)], blocks of 32 rows (K % 32 == 0,
    so no block straddles two leading indices). Along the last axis: [prod(before), K], blocks of 32 columns.
    None when the other dimension has no power-of-two tile >= 16.
    """
    k = shape[axis]
    if k % BLOCK:
        return None
    before = int(np.prod(shape[:axis], dtype=np.int64))
    after = int(np.prod(shape[axis + 1:], dtype=np.int64))
    if after > 1:
        return ((before * k, after), True) if _tile(after) else None
    return ((before, k), False) if _tile(before) else None


def supported(shape: tuple[int, ...], axis: int) -> bool:
    return _view(tuple(shape), axis % len(shape)) is not None


def use_kernel(impl: str, shape: tuple[int, ...], axis: int) -> bool:
    """'pallas' forces the kernel (error if the shape cannot take it); 'auto' takes it on one NVIDIA GPU
    of compute capability 8.0 or newer (devices.use_triton_kernel)."""
    return use_triton_kernel(
        impl, supported(shape, axis), what="Q4_0",
        unfit=f"the Q4_0 kernel cannot take shape {tuple(shape)} along axis {axis}: the axis must be a multiple "
              f"of {BLOCK} and the other dims' product divisible by {_MIN_TILE}; use q4_0_impl='xla'")


def _kernel(x_ref, o_ref, *, rows: bool):
    x = x_ref[...].astype(jnp.float32)  # [32, tile] (rows) or [tile, 32]
    red = 0 if rows else 1
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    mag = bits & np.uint32(0x7FFFFFFF)  # |x| bits order like |x|; NaN above inf, as argmax sees it
    top = jnp.max(mag, axis=red, keepdims=True)
    pos = jax.lax.broadcasted_iota(jnp.int32, x.shape, red)
    first = jnp.min(jnp.where(mag == top, pos, BLOCK), axis=red, keepdims=True)  # the first on ties
    sign = jnp.max(jnp.where(pos == first, bits >> 31, np.uint32(0)), axis=red, keepdims=True)
    mx = jax.lax.bitcast_convert_type(top | (sign << 31), jnp.float32)  # signed, -0.0 kept
    q, d = formats.q4_0_codes(x, mx)
    d16 = d.astype(jnp.float16).astype(jnp.float32)  # the stored fp16 scale, as the reader sees it
    o_ref[...] = ((q - np.float32(8.0)) * d16).astype(o_ref.dtype)


def _call(w: jax.Array, axis: int, dtype, interpret: bool, launch: Launch) -> jax.Array:
    (m, n), rows = _view(w.shape, axis)
    x = w.reshape(m, n)  # a view: no data moves
    if rows:
        t = _tile(n, launch.tile)
        block, grid = (BLOCK, t), (m // BLOCK, n // t)
    else:
        t = _tile(m, launch.tile)
        block, grid = (t, BLOCK), (m // t, n // BLOCK)
    spec = pl.BlockSpec(block, lambda i, j: (i, j))  # program (i, j) owns tile (i, j) of input and output
    params = {} if interpret or launch.num_warps is None else {
        "compiler_params": pltriton.CompilerParams(num_warps=launch.num_warps)}
    out = pl.pallas_call(
        functools.partial(_kernel, rows=rows),
        out_shape=jax.ShapeDtypeStruct((m, n), dtype),
        grid=grid,
        in_specs=[spec],
        out_specs=spec,
        interpret=interpret,
        name="q4_0_fake_quant",
        **params,
    )(x)
    return out.reshape(w.shape)


def q4_0_fake_quant_fused(w: jax.Array, *, in_axis: int, dtype=None, interpret: bool | None = None,
                          launch: Launch = Launch()) -> jax.Array:
    """formats.q4_0_fake_quant(w, in_axis=...).astype(dtype) in one pass; identity gradient (in w.dtype).

    `interpret` runs the kernel through Pallas' interpreter; None = only where there is no GPU (CPU tests)."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    axis = int(in_axis) % w.ndim
    if not supported(w.shape, axis):
        raise ValueError(f"the Q4_0 kernel cannot take shape {tuple(w.shape)} along axis {axis} (see "
                         "q4_0_kernel.supported); use formats.q4_0_fake_quant")
    out_dtype = jnp.dtype(dtype or w.dtype)

    @jax.custom_vjp
    def f(w):
        return _call(w, axis, out_dtype, interpret, launch)

    f.defvjp(lambda w: (_call(w, axis, out_dtype, interpret, launch), None), lambda _, g: (g.astype(w.dtype),))
    return f(w)
