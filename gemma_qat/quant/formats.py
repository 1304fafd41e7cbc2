"""Weight / activation fake-quant numerics (pure JAX). Design notes: FORMATS.md.

Conventions: every weight function takes `in_axis`, the contraction (input) axis
or axes of `w`; scales are shared along it. Math runs in fp32; fake-quant returns
w.dtype with a straight-through (identity) gradient. Quantize and fake-quant share
one core per format so the exporter and training cannot drift.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

Axis = Union[int, Sequence[int]]

Q4_0_BLOCK_SIZE = 32
Q4_0_BYTES_PER_BLOCK = 18  # fp16 d + 16 bytes of nibbles
INT_BITS = (2, 4, 8)
_F32 = jnp.float32


def _norm_axes(in_axis: Axis, ndim: int) -> tuple[int, ...]:
    axes = (in_axis,) if isinstance(in_axis, (int, np.integer)) else tuple(in_axis)
    if not axes:
        raise ValueError("in_axis must name at least one axis")
    out = []
    for a in axes:
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"in_axis {a} out of range for ndim={ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate axes in in_axis={in_axis}")
    return tuple(sorted(out))


def straight_through(fn: Callable, w: jax.Array) -> jax.Array:
    """Forward fn(w) exactly (no w + (deq - w) rounding in bf16); backward identity."""

    @jax.custom_vjp
    def f(w):
        return fn(w)

    f.defvjp(lambda w: (fn(w), None), lambda _, g: (g,))
    return f(w)


def _recip_math(d: jax.Array) -> jax.Array:
    """Correctly rounded fp32 1/d, 0 where d == 0.

    XLA:GPU's f32 divide is not IEEE (H100: 1 ulp off for ~13% of inputs), which moved
    Q4_0 codes vs gguf. Integer long division of 2^47 by the 24-bit mantissa is exact on
    every backend. Subnormal or huge (>= 2^126) d fall back to the float divide.
    """
    d = d.astype(_F32)
    bits = jax.lax.bitcast_convert_type(d, jnp.uint32)
    e = (bits >> 23) & np.uint32(0xFF)
    m = (bits & np.uint32(0x7FFFFF)) | np.uint32(0x800000)  # [2^23, 2^24)
    q = jnp.uint32(2 ** 31) // m  # <= 256
    r = jnp.uint32(2 ** 31) - q * m
    for _ in range(2):  # r < 2^24, so r << 8 fits in uint32
        t = (r << 8) // m
        q, r = (q << 8) + t, (r << 8) - t * m  # q = floor(2^47 / m) at the end
    q = q + ((2 * r > m) | ((2 * r == m) & ((q & 1) == 1))).astype(jnp.uint32)  # RNE
    # 1/d = q * 2^(103 - e); adding q (2^23..2^24) carries a mantissa overflow into the exponent
    out = (bits & np.uint32(0x80000000)) | (((np.uint32(252) - e) << 23) + q)
    exact = jax.lax.bitcast_convert_type(out, _F32)
    normal = (e > 0) & (e < 253)
    safe = jnp.where(d == 0, np.float32(1.0), d)
    return jnp.where(d == 0, np.float32(0.0), jnp.where(normal, exact, np.float32(1.0) / safe))


# One fused kernel when called eagerly (tests, exporter); inlined under jit. The unjitted math is also
# traced inside the Pallas kernel (q4_0_kernel.py), so both paths run the same operations.
_recip = jax.jit(_recip_math)


# --------------------------------------------------------------------------- Q4_0
def _q4_0_thresholds() -> np.ndarray:
    """T[m-1] = smallest fp32 p with fl32(p + 8.5) >= m, m = 1..15.

    ggml computes trunc(fl(fl(x*id) + 8.5)). Inside an XLA fusion LLVM contracts
    x*id + 8.5 into an FMA (one rounding), which changes the code near boundaries
    (seen on CPU; jit and eager disagreed). Counting p >= T_m never feeds the
    product into an add, so the two-rounding result is reproduced on any backend.
    """
    out = []
    for m in range(1, 16):
        p = np.float32(m - 8.5)
        while np.float32(np.nextafter(p, np.float32(-np.inf)) + np.float32(8.5)) >= m:
            p = np.nextafter(p, np.float32(-np.inf))
        out.append(p)
    return np.asarray(out, np.float32)


_Q4_0_T = _q4_0_thresholds()


def _q4_0_blocks(w: jax.Array, axis: int) -> jax.Array:
    n = w.shape[axis]
    if n % Q4_0_BLOCK_SIZE:
        raise ValueError(
            f"Q4_0 needs the input axis ({axis}, size {n}) to be a multiple of "
            f"{Q4_0_BLOCK_SIZE}; shape={tuple(w.shape)}")
    # bf16 -> f32 is exact, as gguf/llama.cpp do before quantizing
    x = jnp.moveaxis(jnp.asarray(w).astype(_F32), axis, -1)
    return x.reshape(*x.shape[:-1], n // Q4_0_BLOCK_SIZE, Q4_0_BLOCK_SIZE)  # [..., nb, 32]


# A 64-bit key only inside this function (the rest of the program stays 32-bit).
_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64


def _first_absmax(xb: jax.Array, axis: int = -1) -> jax.Array:
    """xb -> the signed value of largest |x| along `axis` (removed), the first one on ties (gguf.quants'
    argmax + take_along_axis rule), as one max-reduction of a uint64 key:
    |x| bits << 32 | (n-1-position) << 1 | sign bit. Larger |x| wins, then the earlier position; the
    sign rides along, -0.0 included, and a NaN (largest |x| bits) wins as under argmax. argmax is a
    variadic (value, index) reduction plus a gather, and a pairwise knockout of strided selects also ran
    at a third of the memory bandwidth on an H100 (BENCHMARKS.md); a plain row max runs near it."""
    axis = axis % xb.ndim
    n = xb.shape[axis]
    with _x64(True):
        bits = jax.lax.bitcast_convert_type(xb.astype(_F32), jnp.uint32)
        pos = jax.lax.broadcasted_iota(jnp.uint32, xb.shape, axis)
        low = ((np.uint32(n - 1) - pos) << 1) | (bits >> 31)
        key = ((bits & np.uint32(0x7FFFFFFF)).astype(jnp.uint64) << np.uint64(32)) | low.astype(jnp.uint64)
        k = jnp.max(key, axis=axis)
        mag = (k >> np.uint64(32)).astype(jnp.uint32)
        sign = (k & np.uint64(1)).astype(jnp.uint32) << 31
        return jax.lax.bitcast_convert_type(mag | sign, _F32)


@functools.partial(jax.jit, static_argnames="axis")
def _q4_0_core(xb: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """xb f32 holding 32-blocks along `axis` -> (codes f32 0..15, xb's shape; d f32, `axis` kept as size 1).

    Blocks may lie along any axis, so the fake-quant can work on the weight in its own layout (see
    q4_0_fake_quant); the math is elementwise apart from the exact block max, so the layout never changes
    a code or a d."""
    mx = jnp.expand_dims(_first_absmax(xb, axis), axis)  # signed; keeps -0.0 (matters for d bytes)
    return q4_0_codes(xb, mx)


def q4_0_codes(x: jax.Array, mx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """f32 values x and their block's signed max-|x| value mx (broadcastable) -> (codes f32 0..15, d f32).
    Shared by the XLA path above and the Pallas kernel, so they cannot drift."""
    d = mx * np.float32(-0.125)  # == max / -8 exactly; avoids XLA div reassociation
    p = x * _recip_math(d)  # id = 0 when d == 0, as ggml
    # |p| <= 8*(1+2^-23) so p + 8.5 > 0: ggml's int8 cast never goes negative and the
    # count below needs no clip at 0; counting 15 thresholds is ggml's MIN(15, .).
    q = jnp.zeros_like(p)
    for t in _Q4_0_T:  # a loop, not a [..., 15] compare tensor: eager memory stays 1x
        q = q + (p >= t).astype(_F32)
    return q, d


def q4_0_quantize(w: jax.Array, *, in_axis: int) -> tuple[jax.Array, jax.Array]:
    """llama.cpp quantize_row_q4_0_ref along in_axis.

    Returns (q uint8 codes 0..15 [..., nblocks, 32], d float16 [..., nblocks]),
    with in_axis removed from the leading dims (moved last, then split in blocks).
    """
    (axis,) = _norm_axes(in_axis, jnp.ndim(w))
    q, d = _q4_0_core(_q4_0_blocks(w, axis))
    return q.astype(jnp.uint8), d[..., 0].astype(jnp.float16)


def q4_0_dequantize(q: jax.Array, d: jax.Array, *, in_axis: int = -1,
                    dtype=jnp.float32) -> jax.Array:
    """(q [..., nb, 32], d [..., nb]) -> values with the block axis put back at in_axis.

    (q - 8) * f32(d16) is exact in fp32 (4-bit x 11-bit mantissas); one cast to dtype.
    """
    q = jnp.asarray(q).astype(_F32)
    d = jnp.asarray(d).astype(jnp.float16).astype(_F32)
    x = (q - np.float32(8.0)) * d[..., None]  # [..., nb, 32]
    x = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    (axis,) = _norm_axes(in_axis, x.ndim)
    return jnp.moveaxis(x, -1, axis).astype(dtype)


def q4_0_fake_quant(w: jax.Array, *, in_axis: int) -> jax.Array:
    """Q4_0 forward value (exactly what a GGUF reader dequantizes), identity gradient.

    The blocks are split in place along in_axis ([..., n, ...] -> [..., n/32, 32, ...]), not moved last
    as q4_0_quantize does for packing: the result then stays in w's own layout, as AQT's untiled dequant
    does (aqt_backend). A moved-and-moved-back result is a transpose that XLA folds into the consuming dot
    as a transposed-operand GEMM, another kernel with another summation order: on an AVX2 EPYC the
    einsum over it differed from AQT's in the last bits of 114 of 144 outputs (AQT.md, "Bit-exact where")."""
    (axis,) = _norm_axes(in_axis, jnp.ndim(w))

    def fwd(w):
        x = jnp.asarray(w).astype(_F32)  # bf16 -> f32 is exact, as gguf/llama.cpp do before quantizing
        n = x.shape[axis]
        if n % Q4_0_BLOCK_SIZE:
            raise ValueError(
                f"Q4_0 needs the input axis ({axis}, size {n}) to be a multiple of "
                f"{Q4_0_BLOCK_SIZE}; shape={tuple(x.shape)}")
        xb = x.reshape(*x.shape[:axis], n // Q4_0_BLOCK_SIZE, Q4_0_BLOCK_SIZE, *x.shape[axis + 1:])
        q, d = _q4_0_core(xb, axis=axis + 1)
        d16 = d.astype(jnp.float16).astype(_F32)  # the stored fp16 d, as the reader sees it
        return ((q - np.float32(8.0)) * d16).reshape(x.shape).astype(w.dtype)  # exact, as q4_0_dequantize

    return straight_through(fwd, w)


# ------------------------------------------------- per-output-channel int2/4/8
def int_range(bits: int) -> tuple[int, int]:
    """Code range [-2^(b-1), 2^(b-1)-1]: all 2^b levels of the packed format are used."""
    if bits not in INT_BITS:
        raise ValueError(f"bits must be one of {INT_BITS}, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@functools.partial(jax.jit, static_argnums=(1, 2))
def _int_core(w: jax.Array, axes: tuple[int, ...], bits: int) -> tuple[jax.Array, jax.Array]:
    """-> (codes f32, same shape as w; scale f32, w.shape with 1 on `axes`).

    Codes = clip(round_half_even(x * fl(1/scale))). Q4_0-style signed scale: the max-|x|
    element of each output channel maps exactly to code lo = -2^(b-1); the opposite sign
    saturates at hi. For int2 this keeps the 4th level (symmetric absmax/1 would be
    ternary and zero almost everything).
    """
    lo, hi = int_range(bits)
    x = jnp.asarray(w).astype(_F32)
    k = len(axes)
    xt = jnp.moveaxis(x, axes, tuple(range(x.ndim - k, x.ndim)))
    xt = xt.reshape(*xt.shape[: x.ndim - k], -1)  # [out..., K]
    imax = jnp.argmax(jnp.abs(xt), axis=-1, keepdims=True)
    mx = jnp.take_along_axis(xt, imax, axis=-1)[..., 0]  # [out...]
    scale = jnp.expand_dims(mx * np.float32(1.0 / lo), axes)  # exact: 1/lo is a power of 2
    # x * fl(1/scale), not x / scale: the GPU divide is inexact (see _recip); scale 0 -> q 0
    q = jnp.clip(jnp.round(x * _recip(scale)), lo, hi)  # half-to-even
    return q, scale


def int_quantize(w: jax.Array, *, bits: int, in_axis: Axis) -> tuple[jax.Array, jax.Array]:
    """-> (q int8 codes in int_range(bits), same shape as w;
           scale float32, w.shape with 1 on the in axes, e.g. [out, 1] for [out, in])."""
    q, scale = _int_core(w, _norm_axes(in_axis, jnp.ndim(w)), bits)
    return q.astype(jnp.int8), scale


def int_dequantize(q: jax.Array, scale: jax.Array, *, dtype=jnp.float32) -> jax.Array:
    return (jnp.asarray(q).astype(_F32) * jnp.asarray(scale).astype(_F32)).astype(dtype)


def int_fake_quant(w: jax.Array, *, bits: int, in_axis: Axis,
                   scale: jax.Array | None = None) -> jax.Array:
    """Per-output-channel int fake-quant.

    scale=None: the rule of int_quantize (scale derived from w), identity gradient.
    scale given (broadcastable to w, e.g. learned/searched clipping): codes
    clip(round(w/scale), lo, hi) with the LSQ gradients of act_fake_quant_int8.
    """
    axes = _norm_axes(in_axis, jnp.ndim(w))
    if scale is not None:
        lo, hi = int_range(bits)
        return _lsq_fake_quant(w, _as_float(scale), lo, hi)

    def fwd(w):
        q, s = _int_core(w, axes, bits)
        return int_dequantize(q, s, dtype=w.dtype)

    return straight_through(fwd, w)


# --------------------------------------------------------- static-scale (LSQ) path
def _as_float(s) -> jax.Array:
    s = jnp.asarray(s)
    return s if jnp.issubdtype(s.dtype, jnp.floating) else s.astype(_F32)


def _sum_to_shape(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    t = t.sum(axis=tuple(range(t.ndim - len(shape))))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _lsq_parts(x, s, lo, hi):
    x32, s32 = x.astype(_F32), s.astype(_F32)
    live = s32 != 0  # scale 0 = uncalibrated: pass-through (HF gemma convention)
    v = x32 * _recip(s32)
    q = jnp.clip(jnp.round(v), lo, hi)
    return jnp.where(live, q * s32, x32), v, q, live


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lsq_fake_quant(x, s, lo, hi):
    return _lsq_parts(x, s, lo, hi)[0].astype(x.dtype)


def _lsq_fwd(x, s, lo, hi):
    return _lsq_parts(x, s, lo, hi)[0].astype(x.dtype), (x, s)


def _lsq_bwd(lo, hi, res, g):
    x, s = res
    _, v, q, live = _lsq_parts(x, s, lo, hi)
    g32 = g.astype(_F32)
    inside = (v >= lo) & (v <= hi)
    gx = jnp.where(live & ~inside, np.float32(0.0), g32)  # clipped STE
    # d(s*clip(round(x/s)))/ds with STE on round: round(v)-v inside, the bound outside
    gs = jnp.where(live, g32 * jnp.where(inside, q - v, q), np.float32(0.0))
    return gx.astype(x.dtype), _sum_to_shape(gs, jnp.shape(s)).astype(s.dtype)


_lsq_fake_quant.defvjp(_lsq_fwd, _lsq_bwd)


def act_fake_quant_int8(x: jax.Array, scale: jax.Array) -> jax.Array:
    """Static int8 activation fake-quant: clamp(round(x * fl(1/s)), -128, 127) * s.

    scale: per-tensor (scalar) or anything broadcastable to x; 0 = pass-through.
    Gradients: x gets g where -128 <= x/s <= 127, else 0; scale gets the raw LSQ
    gradient sum(g * (round(v)-v or the clip bound)) -- no 1/sqrt(N*Qp) factor,
    apply that in the optimizer if wanted. To freeze: stop_gradient the scale.
    """
    return _lsq_fake_quant(x, _as_float(scale), -128, 127)


# ------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: int
    block_size: int | None  # None = one scale per output channel
    fake_quant: Callable[[jax.Array, Axis], jax.Array]  # (w, in_axis)
    bits_per_weight: Callable[[Sequence[int], Axis], float]  # (shape, in_axis)


def _q4_0_bpw(shape: Sequence[int], in_axis: Axis) -> float:
    (axis,) = _norm_axes(in_axis, len(shape))
    if shape[axis] % Q4_0_BLOCK_SIZE:
        raise ValueError(f"Q4_0 input axis size {shape[axis]} is not a multiple of 32")
    return Q4_0_BYTES_PER_BLOCK * 8 / Q4_0_BLOCK_SIZE


def _int_bpw(bits: int) -> Callable[[Sequence[int], Axis], float]:
    def bpw(shape: Sequence[int], in_axis: Axis) -> float:
        k = math.prod(shape[a] for a in _norm_axes(in_axis, len(shape)))
        return bits + 32.0 / k  # + one fp32 scale per output channel
    return bpw


def _int_format(bits: int) -> WeightFormat:
    return WeightFormat(
        name=f"int{bits}", bits=bits, block_size=None,
        fake_quant=lambda w, in_axis: int_fake_quant(w, bits=bits, in_axis=in_axis),
        bits_per_weight=_int_bpw(bits))


FORMATS: dict[str, WeightFormat] = {
    "q4_0": WeightFormat(
        name="q4_0", bits=4, block_size=Q4_0_BLOCK_SIZE,
        fake_quant=lambda w, in_axis: q4_0_fake_quant(w, in_axis=in_axis),
        bits_per_weight=_q4_0_bpw),
    **{f"int{b}": _int_format(b) for b in (8, 4, 2)},
}


def get_format(name: str) -> WeightFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown weight format {name!r}; known: {sorted(FORMATS)}") from None
