"""Fused head + loss: the logits, the loss and the loss's gradient in one chunked pass.

The autodiff path (loss/distill.py with remat) runs each [B, c, V] logits chunk three times for the
student (forward, recompute, backward) and twice for the teacher, and walks the fp32 logits in many
separate elementwise passes. Here the loss is a scalar, so its gradient with respect to the logits
is known in closed form during the forward: per chunk we form the student (and teacher) logits once,
reduce the loss terms, build dL/dz, and immediately contract it into dL/dh (= dz · E, [B, c, D]) and
dL/dE (+= dzᵀ · h, [V, D]). The backward only scales those by the incoming cotangent.

    student logits  s = c·tanh(z / c),  z = h · Eᵀ           (bf16 operands, fp32 accumulation)
    q = softmax(s / T),  w = token weight,  N = Σ w
    "kl":   dL/ds = w/N · [ (1−α)·T·(q − softmax(t / T)) + α·(softmax(s) − onehot(label)) ]
    "ce":   dL/ds = w/N · (softmax(s) − onehot(label))
    "topk": KL over the teacher's k cached ids plus one "rest" bucket (distill.topk_distill_loss):
            dL/ds = w/N · T · [ (P + r)·q − p̂ − r·1[∉ ids]·softmax_rest(s / T) ]
            with p̂ the teacher's probabilities scattered to their ids, P = Σ p, r = max(1 − P, 0)
    dL/dz = dL/ds · (1 − (s/c)²)

(the KL terms carry T² · (1/T) from Hinton's scaling and the temperature's chain rule). Loss values and
aux metrics are those of loss/distill.py's autodiff losses; aux is for logging and carries no gradient.
With `impl` auto on one GPU (or "pallas"), the "kl" and "ce" passes over each chunk's logits run as
loss/kernel.py's two kernels (same math, tested against this file's XLA path); "topk" stays on XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_qat import sharding
from gemma_qat.loss import kernel as loss_kernel
from gemma_qat.model.embed import logits_from_hidden

Array = jax.Array
# Finite stand-in for −inf when masking logits: keeps logsumexp and its gradient finite even if every
# entry is masked (k == V in the top-k loss). The loss kernels start their running maxima at it too.
NEG = loss_kernel.NEG
# Under a mesh (sharding.activate) the accumulated dL/dE is pinned to the table's own layout, so the
# [V, D] fp32 carry is sharded like the table whatever XLA's propagation would pick.
_TABLE_AXES = ("vocab", "embed")
# The bf16 head tables the chunks read: gathered over fsdp once, before the loop. Left sharded, XLA
# gathered them inside it, three times per chunk (31B on 4x8xH100: 25 GB per step per GPU, between
# hosts; E2B on 8xH100: 29 GB). preflight/memory.py counts them gathered ("head tables").
_GATHERED_TABLE_AXES = ("vocab", None)
# dL/dE under a mesh whose batch axes split the rows F ways: each device's chunks add into its own
# partial table [F, V, D] (F over the batch axes), summed over F once after the loop. Reduced per chunk
# into the table's layout instead, it was one fp32 reduce-scatter of [V/tensor, D] per chunk (31B on
# 4x8xH100: 16.9 GB per step per GPU between hosts; E2B on 8xH100: 19.3 GB). preflight/memory.py counts
# the fp32 gradient table unsharded over fsdp.
_PARTIAL_TABLE_AXES = ("act_batch", "vocab", None)


def chunk_geometry(t: int, chunk_size: int) -> tuple[int, int]:
    """(chunk length c, number of chunks n) for a sequence of t tokens."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    c = min(chunk_size, t)  # a short sequence is one chunk, no padding
    return c, -(-t // c)


def split_chunks(x: Array, c: int, n: int) -> Array:
    """[B, T, ...] → [n, B, c, ...], zero-padding T up to n·c (padded tokens get weight 0)."""
    pad = n * c - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, c, *x.shape[2:]), 1, 0)


def _ce_terms(s, labels, scale, with_ce: bool):
    """CE per token and (with_ce) its gradient · scale; the one-hot is a fused compare, never stored."""
    lse = jax.nn.logsumexp(s, axis=-1)  # [B, c]
    onehot = jnp.arange(s.shape[-1])[None, None, :] == labels[..., None]
    ce = lse - jnp.sum(jnp.where(onehot, s, 0.0), -1)
    ds = (jnp.exp(s - lse[..., None]) - onehot) * scale if with_ce else 0.0
    return ce, ds


def _kl_terms(s, tz, temp, scale):
    ls = jax.nn.log_softmax(s / temp, axis=-1)
    lt = jax.nn.log_softmax(tz / temp, axis=-1)
    pt = jnp.exp(lt)
    kl = jnp.sum(pt * (lt - ls), -1)
    agree = jnp.argmax(s, -1) == jnp.argmax(tz, -1)
    return kl, agree, scale * (jnp.exp(ls) - pt)


def _topk_terms(s, lp, ids, temp, scale):
    zt = s / temp
    lse = jax.nn.logsumexp(zt, axis=-1)  # [B, c]
    log_q = jnp.take_along_axis(zt, ids, -1) - lse[..., None]  # [B, c, k]
    p = jnp.exp(lp)
    kl = jnp.sum(p * (lp - log_q), -1)
    psum = jnp.sum(p, -1)
    q = jnp.exp(zt - lse[..., None])  # [B, c, V]
    p_hat = jnp.put_along_axis(jnp.zeros_like(zt), ids, p, axis=-1, inplace=False)
    g = psum[..., None] * q - p_hat
    if ids.shape[-1] < s.shape[-1]:  # k == V: the bucket is empty by construction
        z_rest = jnp.put_along_axis(zt, ids, NEG, axis=-1, inplace=False)
        lse_rest = jax.nn.logsumexp(z_rest, axis=-1)
        r = jnp.clip(1.0 - psum, 0.0, 1.0)
        r_safe = jnp.where(r > 0, r, 1.0)  # 0 · log 0 := 0
        kl = kl + jnp.where(r > 0, r * (jnp.log(r_safe) - (lse_rest - lse)), 0.0)
        g = g + r[..., None] * (q - jnp.exp(z_rest - lse_rest[..., None]))  # exp(−1e30 − ·) = 0 on ids
    t_top = jnp.take_along_axis(ids, jnp.argmax(lp, -1)[..., None], -1)[..., 0]
    agree = jnp.argmax(s, -1) == t_top
    return kl, agree, scale * g


def _run(sh, table, teacher, labels, w, temp, alpha, *, cap, kind: str, with_ce: bool, chunk: int, grads: bool,
         impl: str = "auto"):
    """Loss sums (and with `grads`, dL/dh [B, T, D] and dL/dE [V, D]) over chunks of T."""
    b, t, d = sh.shape
    c, n = chunk_geometry(t, chunk)
    tokens = jnp.sum(w, dtype=jnp.float32)
    denom = jnp.where(tokens > 0, tokens, 1.0)
    g_kl = (1.0 - alpha) * temp / denom  # T² (Hinton) × 1/T (d(s/T)/ds), per unit token weight
    g_ce = (alpha if kind == "kl" else 1.0) / denom
    e = nn.with_logical_constraint(table.astype(sh.dtype), _GATHERED_TABLE_AXES)  # [V, D], compute dtype
    te = None
    if kind == "kl":
        th, t_table = teacher
        te = nn.with_logical_constraint(t_table.astype(th.dtype), _GATHERED_TABLE_AXES)
        t_xs = (split_chunks(th, c, n),)
    elif kind == "topk":
        t_xs = tuple(split_chunks(a, c, n) for a in teacher)  # log-probs, ids [n, B, c, k]
    else:
        t_xs = ()

    vocab = table.shape[0]
    parts = sharding.logical_shards("act_batch")  # F: the rows' shards (module constants above)
    parts = parts if parts > 1 and b % parts == 0 else 1
    kernel = kind != "topk" and loss_kernel.use_kernel(impl, vocab)
    interpret = jax.default_backend() != "gpu"

    def kernel_terms(hc, lbc, wc, tc):
        """new sums and dL/dz [B, c, V] (bf16) through loss_kernel's two passes (xla_terms' math)."""
        r, inv_t = b * c, 1.0 / temp
        zs = logits_from_hidden(hc, e, softcap=None).reshape(r, vocab)  # [B·c, V] fp32; the cap is in-kernel
        zt = logits_from_hidden(tc[0], te, softcap=None).reshape(r, vocab) if kind == "kl" else None
        st = loss_kernel.row_stats(zs, zt, lbc.reshape(r), inv_t, cap=cap, interpret=interpret)
        ce, kl, agree = loss_kernel.losses(st, inv_t)
        wf = wc.reshape(r)
        new = {"tokens": jnp.sum(wc), "ce": jnp.sum(ce * wf)}
        if kind == "kl":
            new["kl"], new["agree"] = jnp.sum(kl * wf), jnp.sum(agree * wf)
        if not grads:
            return new, None
        gk = g_kl * wf if kind == "kl" else 0.0
        gc = g_ce * wf if with_ce else 0.0
        dz = loss_kernel.logit_grad(zs, zt, lbc.reshape(r), st, inv_t, gk, gc, cap=cap, dtype=e.dtype,
                                    interpret=interpret)
        return new, dz.reshape(b, c, vocab)

    def xla_terms(hc, lbc, wc, tc):
        """new sums and dL/dz [B, c, V] (bf16) through XLA's passes over the logits."""
        s = logits_from_hidden(hc, e, softcap=cap)  # [B, c, V]
        new = {"tokens": jnp.sum(wc)}
        ds = 0.0
        if kind != "topk":
            ce, ds = _ce_terms(s, lbc, g_ce, with_ce)
            new["ce"] = jnp.sum(ce * wc)
        if kind == "kl":
            tz = logits_from_hidden(tc[0], te, softcap=cap)
            kl, agree, ds_kl = _kl_terms(s, tz, temp, g_kl)
        elif kind == "topk":
            kl, agree, ds_kl = _topk_terms(s, tc[0].astype(jnp.float32), tc[1], temp, g_kl)  # α = 0
        if kind != "ce":
            new["kl"], new["agree"] = jnp.sum(kl * wc), jnp.sum(agree * wc)
            ds = ds + ds_kl
        if not grads:
            return new, None
        dz = ds * wc[..., None]
        if cap is not None:
            dz = dz * (1.0 - jnp.square(s / cap))
        return new, dz.astype(e.dtype)  # bf16 dz: both gradient GEMMs in bf16

    def body(carry, xs):
        d_table, sums = carry
        hc, lbc, wc, *tc = xs  # [B, c, D], [B, c], [B, c], teacher chunks
        new, dz = (kernel_terms if kernel else xla_terms)(hc, lbc, wc, tc)
        sums = {k: sums[k] + val.astype(jnp.float32) for k, val in new.items()}
        if not grads:
            return (d_table, sums), None
        dh = jnp.einsum("bcv,vd->bcd", dz, e, preferred_element_type=jnp.float32)
        if parts > 1:  # [F, V, D] += per-shard dzᵀ·h: no collective in the loop
            split = lambda a: a.reshape(parts, b // parts, *a.shape[1:])  # noqa: E731
            d_table = d_table + jnp.einsum("fbcv,fbcd->fvd", split(dz), split(hc), preferred_element_type=jnp.float32)
            d_table = nn.with_logical_constraint(d_table, _PARTIAL_TABLE_AXES)
        else:
            d_table = d_table + jnp.einsum("bcv,bcd->vd", dz, hc, preferred_element_type=jnp.float32)
            d_table = nn.with_logical_constraint(d_table, _TABLE_AXES)
        return (d_table, sums), nn.with_logical_constraint(dh, ("act_batch", None, "act_embed"))

    keys = ("tokens",) + (("ce",) if kind != "topk" else ()) + (("kl", "agree") if kind != "ce" else ())
    sums0 = {k: jnp.zeros((), jnp.float32) for k in keys}
    if not grads:
        d0 = jnp.zeros(())
    elif parts > 1:
        d0 = nn.with_logical_constraint(jnp.zeros((parts, *table.shape), jnp.float32), _PARTIAL_TABLE_AXES)
    else:
        d0 = nn.with_logical_constraint(jnp.zeros(table.shape, jnp.float32), _TABLE_AXES)
    xs = (split_chunks(sh, c, n), split_chunks(labels, c, n), split_chunks(w, c, n)) + t_xs
    (d_table, sums), dh = jax.lax.scan(body, (d0, sums0), xs)
    if grads:  # stored in the primal dtypes: the backward only scales them
        dh = jnp.moveaxis(dh, 0, 1).reshape(b, n * c, d)[:, :t].astype(sh.dtype)  # [B, T, D]
        if parts > 1:  # the one reduction of the step's partial tables into the table's layout
            d_table = nn.with_logical_constraint(jnp.sum(d_table, axis=0), _TABLE_AXES)
        d_table = d_table.astype(table.dtype)
    return sums, dh, d_table


def _loss_aux(sums, temp, alpha, kind: str, with_ce: bool):
    tokens = sums["tokens"]
    denom = jnp.where(tokens > 0, tokens, 1.0)
    if kind == "ce":
        ce = sums["ce"] / denom
        return ce, {"ce": ce, "tokens": tokens}
    ce = sums["ce"] / denom if kind == "kl" else jnp.zeros((), jnp.float32)
    kl_raw = sums["kl"] / denom
    kl = jnp.square(temp) * kl_raw
    loss = (1.0 - alpha) * kl + (alpha * ce if with_ce else 0.0)
    return loss, {"kl": kl, "kl_unscaled": kl_raw, "ce": ce, "top1_agree": sums["agree"] / denom, "tokens": tokens}


def _zero_cotangent(x: Array) -> Array:
    return jnp.zeros(x.shape, jax.dtypes.float0) if not jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros_like(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _fused(sh, table, teacher, labels, w, temp, alpha, cap, kind, with_ce, chunk, impl):
    sums, _, _ = _run(sh, table, teacher, labels, w, temp, alpha, cap=cap, kind=kind, with_ce=with_ce,
                      chunk=chunk, grads=False, impl=impl)
    return _loss_aux(sums, temp, alpha, kind, with_ce)


def _fused_fwd(sh, table, teacher, labels, w, temp, alpha, cap, kind, with_ce, chunk, impl):
    sums, dh, d_table = _run(sh, table, teacher, labels, w, temp, alpha, cap=cap, kind=kind, with_ce=with_ce,
                             chunk=chunk, grads=True, impl=impl)
    zeros = jax.tree.map(_zero_cotangent, (teacher, labels, w, temp, alpha))
    return _loss_aux(sums, temp, alpha, kind, with_ce), (dh, d_table, zeros)


def _fused_bwd(cap, kind, with_ce, chunk, impl, res, cts):
    dh, d_table, zeros = res
    g = cts[0]  # only the loss is differentiable; aux is logging
    return ((g * dh).astype(dh.dtype), (g * d_table).astype(d_table.dtype)) + zeros


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_distill_loss(student_h: Array, teacher_h: Array, student_table: Array, teacher_table: Array, *,
                       softcap: float | None, temperature, alpha, labels: Array | None, weights: Array,
                       with_ce: bool, chunk_size: int, impl: str = "auto") -> tuple[Array, dict[str, Array]]:
    """(1−α)·T²·KL(teacher ‖ student) + α·CE with its gradient formed in the forward (module doc).
    student_h/teacher_h [B, T, D], tables [V, D], labels/weights [B, T]. `impl`: loss_kernel.IMPLS."""
    temp = jnp.asarray(temperature, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    lab = jnp.zeros(weights.shape, jnp.int32) if labels is None else labels.astype(jnp.int32)
    teacher = (jax.lax.stop_gradient(teacher_h), jax.lax.stop_gradient(teacher_table))
    loss, aux = _fused(student_h, student_table, teacher, lab, weights, temp, alpha, softcap, "kl", with_ce,
                       chunk_size, impl)
    if labels is None:  # no labels: no CE metric (the placeholder labels' CE means nothing)
        aux = {**aux, "ce": jnp.zeros_like(aux["ce"])}
    return loss, aux


def fused_ce_loss(h: Array, table: Array, labels: Array, *, softcap: float | None, weights: Array,
                  chunk_size: int, impl: str = "auto") -> tuple[Array, dict[str, Array]]:
    """Next-token cross-entropy with its gradient formed in the forward (module doc)."""
    one = jnp.ones((), jnp.float32)
    return _fused(h, table, (), labels.astype(jnp.int32), weights, one, one, softcap, "ce", True, chunk_size,
                  impl)


def fused_topk_loss(student_h: Array, student_table: Array, topk_logprobs: Array, topk_ids: Array, *,
                    softcap: float | None, temperature, weights: Array, chunk_size: int
                    ) -> tuple[Array, dict[str, Array]]:
    """T²·KL over the cached top-k plus the rest bucket (distill.topk_distill_loss), gradient formed in
    the forward (module doc). topk_logprobs/ids [B, T, k]."""
    temp = jnp.asarray(temperature, jnp.float32)
    teacher = (jax.lax.stop_gradient(topk_logprobs).astype(jnp.float32), topk_ids.astype(jnp.int32))
    labels = jnp.zeros(weights.shape, jnp.int32)
    return _fused(student_h, student_table, teacher, labels, weights, temp, jnp.zeros((), jnp.float32), softcap,
                  "topk", False, chunk_size, "xla")
