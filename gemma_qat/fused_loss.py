"""Fused head + loss: the logits, the loss and the loss's gradient in one chunked pass.

The autodiff path (distill.py with remat) runs each [B, c, V] logits chunk three times for the
student (forward, recompute, backward) and twice for the teacher, and walks the fp32 logits in many
separate elementwise passes. Here the loss is a scalar, so its gradient with respect to the logits
is known in closed form during the forward: per chunk we form the student and teacher logits once,
reduce the loss terms, build dL/dz, and immediately contract it into dL/dh (= dz · E, [B, c, D]) and
dL/dE (+= dzᵀ · h, [V, D]). The backward only scales those by the incoming cotangent.

    student logits  s = c·tanh(z / c),  z = h · Eᵀ           (bf16 operands, fp32 accumulation)
    dL/ds = w/N · [ (1−α)·T·(softmax(s/T) − softmax(t/T)) + α·(softmax(s) − onehot(label)) ]
    dL/dz = dL/ds · (1 − (s/c)²)

(the KL term carries T² · (1/T) from Hinton's scaling and the temperature's chain rule). Without a
teacher the bracket is softmax(s) − onehot(label). The same loss value and aux metrics as
distill.chunked_distill_loss / chunked_ce_loss; aux is for logging and carries no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _split(x: Array, c: int, n: int) -> Array:
    """[B, T, ...] → [n, B, c, ...], zero-padding T up to n·c (padded tokens get weight 0)."""
    pad = n * c - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, c, *x.shape[2:]), 1, 0)


def _softcap(z: Array, cap: float | None) -> Array:
    return z if not cap else cap * jnp.tanh(z / cap)


def _run(sh, table, th, t_table, labels, w, temp, alpha, *, cap, teacher: bool, with_ce: bool, chunk: int,
         grads: bool):
    """Loss sums (and with `grads`, dL/dh [B, T, D] f32 and dL/dE [V, D] f32) over chunks of T."""
    b, t, d = sh.shape
    c = min(chunk, t)
    n = -(-t // c)
    tokens = jnp.sum(w, dtype=jnp.float32)
    denom = jnp.where(tokens > 0, tokens, 1.0)
    g_kl = (1.0 - alpha) * temp / denom  # T² (Hinton) × 1/T (d(s/T)/ds), per token weight
    g_ce = (alpha if teacher else 1.0) / denom
    e = table.astype(sh.dtype)  # [V, D] in the compute dtype, like the model's own head
    te = t_table.astype(th.dtype) if teacher else None

    def body(carry, xs):
        d_table, sums = carry
        hc, thc, lbc, wc = xs  # [B, c, D], [B, c, D] (or unused), [B, c], [B, c]
        s = _softcap(jnp.einsum("bcd,vd->bcv", hc, e, preferred_element_type=jnp.float32), cap)  # [B, c, V]
        lse1 = jax.nn.logsumexp(s, axis=-1)  # [B, c]
        onehot = jnp.arange(s.shape[-1])[None, None, :] == lbc[..., None]  # fused compare, never stored
        ce = lse1 - jnp.sum(jnp.where(onehot, s, 0.0), -1)
        new = {"ce": jnp.sum(ce * wc), "tokens": jnp.sum(wc)}
        ds = (jnp.exp(s - lse1[..., None]) - onehot) * g_ce if with_ce else 0.0
        if teacher:
            tz = _softcap(jnp.einsum("bcd,vd->bcv", thc, te, preferred_element_type=jnp.float32), cap)
            ls = jax.nn.log_softmax(s / temp, axis=-1)
            lt = jax.nn.log_softmax(tz / temp, axis=-1)
            pt = jnp.exp(lt)
            new["kl"] = jnp.sum(jnp.sum(pt * (lt - ls), -1) * wc)
            new["agree"] = jnp.sum((jnp.argmax(s, -1) == jnp.argmax(tz, -1)) * wc)
            ds = ds + g_kl * (jnp.exp(ls) - pt)
        sums = {k: sums[k] + v.astype(jnp.float32) for k, v in new.items()}
        if not grads:
            return (d_table, sums), None
        dz = ds * wc[..., None]
        if cap:
            dz = dz * (1.0 - jnp.square(s / cap))
        dz = dz.astype(e.dtype)  # bf16 operands for both gradient GEMMs, fp32 accumulation
        dh = jnp.einsum("bcv,vd->bcd", dz, e, preferred_element_type=jnp.float32)
        d_table = d_table + jnp.einsum("bcv,bcd->vd", dz, hc, preferred_element_type=jnp.float32)
        return (d_table, sums), dh

    keys = ("ce", "tokens") + (("kl", "agree") if teacher else ())
    sums0 = {k: jnp.zeros((), jnp.float32) for k in keys}
    d0 = jnp.zeros(table.shape, jnp.float32) if grads else jnp.zeros((), jnp.float32)
    xs = (_split(sh, c, n), _split(th, c, n) if teacher else jnp.zeros((n,)), _split(labels, c, n), _split(w, c, n))
    (d_table, sums), dh = jax.lax.scan(body, (d0, sums0), xs)
    if grads:  # stored in the primal dtypes: the backward only scales them
        dh = jnp.moveaxis(dh, 0, 1).reshape(b, n * c, d)[:, :t].astype(sh.dtype)  # [B, T, D]
        d_table = d_table.astype(table.dtype)
    return sums, dh, d_table


def _loss_aux(sums, temp, alpha, teacher: bool, with_ce: bool):
    tokens = sums["tokens"]
    denom = jnp.where(tokens > 0, tokens, 1.0)
    ce = sums["ce"] / denom
    if not teacher:
        return ce, {"ce": ce, "tokens": tokens}
    kl_raw = sums["kl"] / denom
    kl = jnp.square(temp) * kl_raw
    loss = (1.0 - alpha) * kl + (alpha * ce if with_ce else 0.0)
    return loss, {"kl": kl, "kl_unscaled": kl_raw, "ce": ce, "top1_agree": sums["agree"] / denom, "tokens": tokens}


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _fused(sh, table, th, t_table, labels, w, temp, alpha, cap, teacher, with_ce, chunk):
    sums, _, _ = _run(sh, table, th, t_table, labels, w, temp, alpha, cap=cap, teacher=teacher, with_ce=with_ce,
                      chunk=chunk, grads=False)
    return _loss_aux(sums, temp, alpha, teacher, with_ce)


def _fused_fwd(sh, table, th, t_table, labels, w, temp, alpha, cap, teacher, with_ce, chunk):
    sums, dh, d_table = _run(sh, table, th, t_table, labels, w, temp, alpha, cap=cap, teacher=teacher,
                             with_ce=with_ce, chunk=chunk, grads=True)
    zeros = (jnp.zeros_like(th), jnp.zeros_like(t_table), jnp.zeros_like(w), jnp.zeros_like(temp),
             jnp.zeros_like(alpha))
    return _loss_aux(sums, temp, alpha, teacher, with_ce), (dh, d_table, labels, zeros)


def _fused_bwd(cap, teacher, with_ce, chunk, res, cts):
    dh, d_table, labels, (z_th, z_tt, z_w, z_temp, z_alpha) = res
    g = cts[0]  # only the loss is differentiable; aux is logging
    int_zero = jnp.zeros(labels.shape, jax.dtypes.float0)
    return ((g * dh).astype(dh.dtype), (g * d_table).astype(d_table.dtype), z_th, z_tt, int_zero, z_w, z_temp,
            z_alpha)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_distill_loss(student_h: Array, teacher_h: Array, student_table: Array, teacher_table: Array, *,
                       softcap: float | None, temperature, alpha, labels: Array | None, weights: Array,
                       with_ce: bool, chunk_size: int) -> tuple[Array, dict[str, Array]]:
    """(1−α)·T²·KL(teacher ‖ student) + α·CE with its gradient formed in the forward (module doc).
    student_h/teacher_h [B, T, D], tables [V, D], labels/weights [B, T]."""
    temp = jnp.asarray(temperature, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    lab = jnp.zeros(weights.shape, jnp.int32) if labels is None else labels.astype(jnp.int32)
    loss, aux = _fused(student_h, student_table, jax.lax.stop_gradient(teacher_h),
                       jax.lax.stop_gradient(teacher_table), lab, weights, temp, alpha, softcap, True, with_ce,
                       chunk_size)
    if labels is None:  # no labels: no CE metric (the placeholder labels' CE means nothing)
        aux = {**aux, "ce": jnp.zeros_like(aux["ce"])}
    return loss, aux


def fused_ce_loss(h: Array, table: Array, labels: Array, *, softcap: float | None, weights: Array,
                  chunk_size: int) -> tuple[Array, dict[str, Array]]:
    """Next-token cross-entropy with its gradient formed in the forward (module doc)."""
    one = jnp.ones((), jnp.float32)
    return _fused(h, table, jnp.zeros((1, 1, 1), h.dtype), jnp.zeros((1, 1), table.dtype), labels.astype(jnp.int32),
                  weights, one, one, softcap, False, True, chunk_size)
