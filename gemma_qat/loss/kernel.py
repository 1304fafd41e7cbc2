"""The fused loss's vocabulary-wide passes as two Pallas (Triton) kernels: one reads the fp32 logits once
for every row statistic, one reads them again and writes dL/dz in bf16.

Per chunk, the XLA path (loss/fused.py) materialises the softcapped logits and then runs separate max,
sum-exp, KL and argmax reductions and the gradient over them: about ten passes over each [rows, V] fp32
logit set (BENCHMARKS.md: about 15 ms of the bench-1b QAT + teacher step). Here, with s = c·tanh(z/c)
recomputed in registers from the GEMM's output z:

    pass 1 (`row_stats`), online over V:  m_s = max s,  L1 = Σ e^(s − m_s),  Ls = Σ e^((s − m_s)/T),
          m_t = max t,  Lt = Σ e^((t − m_t)/T),  K = Σ e^((t − m_t)/T)·(t − s),
          s[label], first argmax of s and of t
    then  CE = m_s + log L1 − s[label],   KL = K/(T·Lt) − (m_t/T + log Lt) + (m_s/T + log Ls)
    pass 2 (`logit_grad`): dz = [gk·(softmax(s/T) − softmax(t/T)) + gc·(softmax(s) − onehot)]·(1 − (s/c)²)

Each program of pass 1 owns a tile of rows and a segment of the vocabulary; segments are merged in XLA
(a few floats per row). `use_kernel` picks the kernels on one NVIDIA GPU, as for the Q4_0 kernel (a
pallas_call is opaque to the SPMD partitioner). On an H100 they took the bench-1b loss from 45.3 to 40.6 ms
and the QAT + teacher step from 149.3 to 147.2 ms (BENCHMARKS.md, attempt 18); the tiles are untuned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gemma_qat.devices import KERNEL_IMPLS, use_triton_kernel

IMPLS = KERNEL_IMPLS
# Finite stand-in for −inf: e^(NEG − m) is 0 and never NaN (also loss/fused.py's mask value).
NEG = -1e30
_NO_COL = 2**30  # "no column yet": above every vocabulary index, so min() picks any real one
_ROWS, _COLS, _SEGMENTS, _GRAD_COLS = 8, 512, 16, 512  # [8, 512] fp32 tiles: 32 values a thread at 4 warps
STATS = ("m_s", "l1", "ls", "m_t", "lt", "k", "s_label", "arg_s", "arg_t")


def _pow2_divisor(n: int, most: int) -> int:
    t = most
    while t > 1 and n % t:
        t //= 2
    return t


def use_kernel(impl: str, vocab: int) -> bool:
    """'pallas' forces the kernels (error if the vocabulary cannot take them); 'auto' takes them on one
    NVIDIA GPU of compute capability 8.0 or newer (devices.use_triton_kernel); 'xla' never."""
    return use_triton_kernel(impl, vocab % 16 == 0, what="loss",
                             unfit=f"the loss kernels need a vocabulary that is a multiple of 16, got {vocab}; "
                                   "use loss_impl='xla'")


def _cap(z, cap):
    return z if cap is None else cap * jnp.tanh(z / cap)


def _stats_kernel(zs_ref, zt_ref, lab_ref, it_ref, *out_refs, cap, rt, ct, seg, kl):
    j = pl.program_id(1)
    lab, inv_t = lab_ref[...], it_ref[...]  # [rt, 1]
    neg = jnp.full((rt, 1), NEG, jnp.float32)
    zero = jnp.zeros((rt, 1), jnp.float32)
    none = jnp.full((rt, 1), _NO_COL, jnp.int32)  # no argmax yet

    def tile_max(x, col):  # the tile's max per row and the first column that holds it
        m = jnp.max(x, axis=1, keepdims=True)
        return m, jnp.min(jnp.where(x == m, col, _NO_COL), axis=1, keepdims=True)

    def body(i, c):
        m_s, l1, ls, m_t, lt, k, s_lab, a_s, a_t = c
        cols = pl.ds(i * ct, ct)
        s = _cap(zs_ref[:, cols].astype(jnp.float32), cap)  # [rt, ct]
        col = j * seg + i * ct + jax.lax.broadcasted_iota(jnp.int32, (rt, ct), 1)
        tm, first = tile_max(s, col)
        a_s = jnp.where(tm > m_s, first, a_s)
        m2 = jnp.maximum(m_s, tm)
        l1 = l1 * jnp.exp(m_s - m2) + jnp.sum(jnp.exp(s - m2), axis=1, keepdims=True)
        ls = ls * jnp.exp((m_s - m2) * inv_t) + jnp.sum(jnp.exp((s - m2) * inv_t), axis=1, keepdims=True)
        s_lab = s_lab + jnp.sum(jnp.where(col == lab, s, 0.0), axis=1, keepdims=True)
        if kl:
            t = _cap(zt_ref[:, cols].astype(jnp.float32), cap)
            um, first_t = tile_max(t, col)
            a_t = jnp.where(um > m_t, first_t, a_t)
            n2 = jnp.maximum(m_t, um)
            e = jnp.exp((t - n2) * inv_t)
            r = jnp.exp((m_t - n2) * inv_t)
            lt = lt * r + jnp.sum(e, axis=1, keepdims=True)
            k = k * r + jnp.sum(e * (t - s), axis=1, keepdims=True)
            m_t = n2
        return m2, l1, ls, m_t, lt, k, s_lab, a_s, a_t

    init = (neg, zero, zero, neg, zero, zero, zero, none, none)
    outs = jax.lax.fori_loop(0, seg // ct, body, init)
    for ref, v in zip(out_refs, outs):
        ref[...] = v


def _stats_call(zs, zt, labels, inv_t, cap, interpret):
    r, v = zs.shape
    rt, ct = _pow2_divisor(r, _ROWS), _pow2_divisor(v, _COLS)
    nseg = _pow2_divisor(v // ct, _SEGMENTS)
    seg = v // nseg
    kl = zt is not None
    row = pl.BlockSpec((rt, 1), lambda i, j: (i, 0))
    logits = pl.BlockSpec((rt, seg), lambda i, j: (i, j))
    outs = [jax.ShapeDtypeStruct((r, nseg), jnp.int32 if n.startswith("arg") else jnp.float32) for n in STATS]
    res = pl.pallas_call(
        functools.partial(_stats_kernel, cap=cap, rt=rt, ct=ct, seg=seg, kl=kl),
        out_shape=outs, grid=(r // rt, nseg),
        in_specs=[logits, logits, row, row],
        out_specs=[pl.BlockSpec((rt, 1), lambda i, j: (i, j))] * len(STATS),
        interpret=interpret, name="loss_row_stats",
    )(zs, zs if zt is None else zt, labels, inv_t)
    return dict(zip(STATS, res))


def _merge(p: dict, it) -> dict:
    """Segments [R, S] → rows [R]: the online-softmax merge, first argmax across segments; it [R, 1] = 1/T."""
    def lse_merge(m, l, scale):
        mm = jnp.max(m, axis=1, keepdims=True)
        return mm[:, 0], jnp.sum(l * jnp.exp((m - mm) * scale), axis=1)

    m_s, l1 = lse_merge(p["m_s"], p["l1"], 1.0)
    _, ls = lse_merge(p["m_s"], p["ls"], it)
    m_t, lt = lse_merge(p["m_t"], p["lt"], it)
    _, k = lse_merge(p["m_t"], p["k"], it)
    first = lambda m, a: jnp.min(jnp.where(m == jnp.max(m, axis=1, keepdims=True), a, _NO_COL), axis=1)
    return {"m_s": m_s, "l1": l1, "ls": ls, "m_t": m_t, "lt": lt, "k": k, "s_label": jnp.sum(p["s_label"], 1),
            "arg_s": first(p["m_s"], p["arg_s"]), "arg_t": first(p["m_t"], p["arg_t"])}


def _grad_kernel(zs_ref, zt_ref, lab_ref, it_ref, ms_ref, cs_ref, c1_ref, mt_ref, dt_ref, gk_ref, gc_ref, o_ref,
                 *, cap, ct, kl):
    j = pl.program_id(1)
    s = _cap(zs_ref[...].astype(jnp.float32), cap)  # [rt, ct]
    col = j * ct + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    inv_t, m_s = it_ref[...], ms_ref[...]
    ds = gc_ref[...] * (jnp.exp(s - m_s) * c1_ref[...] - (col == lab_ref[...]).astype(jnp.float32))
    if kl:
        t = _cap(zt_ref[...].astype(jnp.float32), cap)
        q = jnp.exp((s - m_s) * inv_t) * cs_ref[...]
        p = jnp.exp((t - mt_ref[...]) * inv_t) * dt_ref[...]
        ds = ds + gk_ref[...] * (q - p)
    if cap is not None:
        ds = ds * (1.0 - jnp.square(s / cap))
    o_ref[...] = ds.astype(o_ref.dtype)


def row_stats(zs, zt, labels, inv_t, *, cap, interpret):
    """Per-row statistics of pass 1 (module doc) for zs/zt [R, V] fp32 GEMM outputs (zt None: CE only),
    labels [R] int32, inv_t scalar 1/T."""
    r = zs.shape[0]
    it = jnp.broadcast_to(jnp.asarray(inv_t, jnp.float32), (r, 1))
    return _merge(_stats_call(zs, zt, labels.reshape(r, 1).astype(jnp.int32), it, cap, interpret), it)


def losses(st: dict, inv_t):
    """(CE, KL at temperature T, top-1 agreement) per row from `row_stats`."""
    lse1 = st["m_s"] + jnp.log(st["l1"])
    lse_s = st["m_s"] * inv_t + jnp.log(st["ls"])
    lse_t = st["m_t"] * inv_t + jnp.log(st["lt"])
    kl = st["k"] * inv_t / st["lt"] - lse_t + lse_s
    return lse1 - st["s_label"], kl, st["arg_s"] == st["arg_t"]


def logit_grad(zs, zt, labels, st, inv_t, gk, gc, *, cap, dtype, interpret):
    """dL/dz [R, V] in `dtype` (pass 2); gk/gc [R] per-row weights of the KL and CE terms."""
    r, v = zs.shape
    rt, ct = _pow2_divisor(r, _ROWS), _pow2_divisor(v, _GRAD_COLS)
    col = lambda a: jnp.asarray(a, jnp.float32).reshape(r, 1) if jnp.ndim(a) else jnp.full((r, 1), a, jnp.float32)
    per_row = [labels.reshape(r, 1).astype(jnp.int32), col(inv_t), col(st["m_s"]), col(1.0 / st["ls"]),
               col(1.0 / st["l1"]), col(st["m_t"]), col(1.0 / st["lt"]), col(gk), col(gc)]
    tile = pl.BlockSpec((rt, ct), lambda i, j: (i, j))
    row = pl.BlockSpec((rt, 1), lambda i, j: (i, 0))
    return pl.pallas_call(
        functools.partial(_grad_kernel, cap=cap, ct=ct, kl=zt is not None),
        out_shape=jax.ShapeDtypeStruct((r, v), dtype), grid=(r // rt, v // ct),
        in_specs=[tile, tile] + [row] * len(per_row), out_specs=tile,
        interpret=interpret, name="loss_logit_grad",
    )(zs, zs if zt is None else zt, *per_row)
