"""Memory-bounded distillation losses for Gemma QAT (student vs frozen BF16 teacher).

The vocabulary is 262,144, so fp32 logits [B, T, V] are tens of GB. Every loss
here runs over the sequence in chunks of `chunk_size` tokens inside a
`lax.map` (a scan) whose body is wrapped in `jax.checkpoint`: the forward keeps
only per-chunk scalar sums, and the backward recomputes each chunk's [B, c, V]
logits instead of storing them, so peak logits memory is O(B * c * V).

Conventions (shared by all losses):
  * KL term is KL(p_t || p_s) with p = softmax(logits / T), multiplied by T^2
    (Hinton et al. 2015) so its gradient scale does not shrink as 1/T^2 when a
    schedule raises T; `aux["kl"]` is the scaled term that enters the loss and
    `aux["kl_unscaled"]` the raw KL (comparable across temperatures).
  * loss = (1 - alpha) * kl + alpha * ce, ce = next-token CE of the student at T=1.
  * Token weighting: masked mean, sum(w * l) / sum(w); all-zero mask -> 0, no NaN.
  * T not divisible by chunk_size: the sequence is zero-padded to a multiple
    of the chunk with mask weight 0, so padded tokens contribute exactly 0
    (costs at most one partial chunk of extra compute, no error).
  * temperature / alpha may be Python floats or traced scalars (schedules
    under jit); only a *static* alpha == 0 lets us skip the CE work.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

# The chunk helpers live in loss/fused.py (both paths use them); the head's logits in model/embed.py.
from gemma_qat.loss.fused import (NEG, chunk_geometry, fused_ce_loss, fused_distill_loss, fused_topk_loss,
                                  split_chunks)
from gemma_qat.model.embed import logits_from_hidden

Array = jax.Array
Scalar = Any  # Python float or traced jnp scalar


# ----------------------------------------------------------------------------- helpers
def _is_static_zero(x: Scalar) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _check_static(temperature: Scalar, alpha: Scalar) -> None:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _needs_ce(alpha: Scalar, labels: Array | None) -> bool:
    if _is_static_zero(alpha):
        return False  # static alpha == 0: skip CE entirely
    if labels is None:
        raise ValueError("labels are required unless alpha is the Python number 0 "
                         f"(got alpha={alpha!r}); pass labels or alpha=0.0")
    return True


def _weights(mask: Array | None, bt: tuple[int, int]) -> Array:
    if mask is None:
        return jnp.ones(bt, jnp.float32)  # [B, T]
    if mask.shape != bt:
        raise ValueError(f"mask shape {mask.shape} != (B, T) {bt}")
    return mask.astype(jnp.float32)  # [B, T]


def _map_chunks(body: Callable, xs: tuple[Array, ...], chunk_size: int, *, remat: bool):
    """Apply body to each [B, c, ...] chunk of the [B, T, ...] arrays xs; stacked outputs."""
    c, n = chunk_geometry(xs[0].shape[1], chunk_size)
    # prevent_cse=False is the documented-safe setting inside scan and avoids
    # optimisation barriers; remat makes backward recompute [B, c, V] logits.
    f = jax.checkpoint(body, prevent_cse=False) if remat else body
    return jax.lax.map(f, tuple(split_chunks(x, c, n) for x in xs))


def _token_terms(s_logits: Array, t_logits: Array, labels: Array | None,
                 temperature: Array) -> dict[str, Array]:
    """Per-token unscaled KL, CE and top-1 agreement from [..., V] fp32 logits."""
    log_ps = jax.nn.log_softmax(s_logits / temperature, axis=-1)  # [..., V]
    log_pt = jax.nn.log_softmax(t_logits / temperature, axis=-1)  # [..., V]
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)  # [...]
    agree = (jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32)
    if labels is None:
        ce = jnp.zeros_like(kl)
    else:
        # clip: masked positions may hold ignore-ids (-100); their weight is 0 anyway
        tgt = jnp.take_along_axis(s_logits, labels[..., None].astype(jnp.int32), -1, mode="clip")
        ce = jax.nn.logsumexp(s_logits, axis=-1) - tgt[..., 0]  # [...]
    return {"kl": kl, "ce": ce, "agree": agree}


def _weighted_sums(terms: dict[str, Array], w: Array) -> dict[str, Array]:
    out = {k: jnp.sum(v * w, dtype=jnp.float32) for k, v in terms.items()}
    out["tokens"] = jnp.sum(w, dtype=jnp.float32)
    return out


def _finish(sums: dict[str, Array], temperature: Array, alpha: Scalar,
            with_ce: bool) -> tuple[Array, dict[str, Array]]:
    n = sums["tokens"]
    denom = jnp.where(n > 0, n, 1.0)  # all-zero mask: sums are 0 -> mean 0, grads finite
    kl_raw = sums["kl"] / denom
    kl = jnp.square(temperature) * kl_raw  # Hinton T^2 scaling
    ce = sums["ce"] / denom
    alpha = jnp.asarray(alpha, jnp.float32)
    loss = (1.0 - alpha) * kl + alpha * ce if with_ce else (1.0 - alpha) * kl
    aux = {"kl": kl, "kl_unscaled": kl_raw, "ce": ce,
           "top1_agree": sums["agree"] / denom, "tokens": n}
    return loss, aux


# ----------------------------------------------------------------------------- online KD
def chunked_distill_loss(student_h: Array, teacher_h: Array, student_embed: Array,
                         teacher_embed: Array, *, softcap: float | None,
                         temperature: Scalar = 1.0, alpha: Scalar = 0.0,
                         labels: Array | None = None, mask: Array | None = None,
                         chunk_size: int = 256, fused: bool = True, loss_impl: str = "auto"
                         ) -> tuple[Array, dict[str, Array]]:
    """(1-alpha) * T^2 * KL(teacher || student) + alpha * CE, masked mean, chunked over T.

    student_h/teacher_h [B, T, D] (after final norm); embeds [V, D]; labels [B, T] int;
    mask [B, T] 0/1 or bool. Teacher inputs get stop_gradient.
    fused (default): fused.py forms the gradient in the forward, one pass per chunk; aux then
    carries no gradient; `loss_impl` (kernel.IMPLS) picks its vocabulary passes: XLA, or two Pallas
    kernels (auto: on one GPU). fused=False: autodiff through a rematerialised chunk (the reference).
    """
    _check_static(temperature, alpha)
    with_ce = _needs_ce(alpha, labels)
    bt = student_h.shape[:2]
    w = _weights(mask, bt)  # [B, T]
    if fused:
        return fused_distill_loss(student_h, teacher_h, student_embed, teacher_embed, softcap=softcap,
                                  temperature=temperature, alpha=alpha, labels=labels if with_ce else None,
                                  weights=w, with_ce=with_ce, chunk_size=chunk_size, impl=loss_impl)
    temp = jnp.asarray(temperature, jnp.float32)
    t_h = jax.lax.stop_gradient(teacher_h)  # [B, T, D]
    t_e = jax.lax.stop_gradient(teacher_embed)  # [V, D]
    lab = labels.astype(jnp.int32) if with_ce else jnp.zeros(bt, jnp.int32)  # [B, T]

    def body(xs):
        sh, th, lb, wc = xs  # [B, c, D], [B, c, D], [B, c], [B, c]
        s = logits_from_hidden(sh, student_embed, softcap=softcap)  # [B, c, V]
        t = logits_from_hidden(th, t_e, softcap=softcap)  # [B, c, V]
        terms = _token_terms(s, t, lb if with_ce else None, temp)
        return _weighted_sums(terms, wc)  # scalars: only these survive the forward

    per_chunk = _map_chunks(body, (student_h, t_h, lab, w), chunk_size, remat=True)
    sums = jax.tree.map(lambda a: jnp.sum(a, 0), per_chunk)  # [n] -> scalar
    return _finish(sums, temp, alpha, with_ce)


def chunked_ce_loss(h: Array, embed: Array, labels: Array, *, softcap: float | None,
                    mask: Array | None = None, chunk_size: int = 256, fused: bool = True,
                    loss_impl: str = "auto") -> tuple[Array, dict[str, Array]]:
    """Next-token cross-entropy without a teacher (plain training, QAT on labels), chunked like
    the distillation loss so no [B, T, V] fp32 logits exist at once (fused: as chunked_distill_loss)."""
    bt = h.shape[:2]
    w = _weights(mask, bt)  # [B, T]
    if fused:
        return fused_ce_loss(h, embed, labels, softcap=softcap, weights=w, chunk_size=chunk_size, impl=loss_impl)

    def body(xs):
        hc, lb, wc = xs  # [B, c, D], [B, c], [B, c]
        z = logits_from_hidden(hc, embed, softcap=softcap)  # [B, c, V]
        tgt = jnp.take_along_axis(z, lb[..., None], -1, mode="clip")[..., 0]
        ce = jax.nn.logsumexp(z, axis=-1) - tgt
        return {"ce": jnp.sum(ce * wc, dtype=jnp.float32), "tokens": jnp.sum(wc, dtype=jnp.float32)}

    per_chunk = _map_chunks(body, (h, labels.astype(jnp.int32), w), chunk_size, remat=True)
    sums = jax.tree.map(lambda a: jnp.sum(a, 0), per_chunk)
    ce = sums["ce"] / jnp.where(sums["tokens"] > 0, sums["tokens"], 1.0)
    return ce, {"ce": ce, "tokens": sums["tokens"]}


def unchunked_distill_loss(student_h: Array, teacher_h: Array, student_embed: Array,
                           teacher_embed: Array, *, softcap: float | None,
                           temperature: Scalar = 1.0, alpha: Scalar = 0.0,
                           labels: Array | None = None, mask: Array | None = None
                           ) -> tuple[Array, dict[str, Array]]:
    """Reference: same as chunked_distill_loss but materialises [B, T, V]. Small V only."""
    _check_static(temperature, alpha)
    with_ce = _needs_ce(alpha, labels)
    w = _weights(mask, student_h.shape[:2])
    temp = jnp.asarray(temperature, jnp.float32)
    s = logits_from_hidden(student_h, student_embed, softcap=softcap)  # [B, T, V]
    t = logits_from_hidden(jax.lax.stop_gradient(teacher_h),
                           jax.lax.stop_gradient(teacher_embed), softcap=softcap)  # [B, T, V]
    terms = _token_terms(s, t, labels if with_ce else None, temp)
    return _finish(_weighted_sums(terms, w), temp, alpha, with_ce)


# ----------------------------------------------------------------------------- offline KD
def teacher_topk(teacher_h: Array, teacher_embed: Array, *, k: int, softcap: float | None,
                 temperature: float = 1.0, chunk_size: int = 256) -> tuple[Array, Array]:
    """Cache for offline KD: top-k of log_softmax(teacher_logits / T) over the FULL vocab.

    Returns (logprobs [B, T, k] fp32, ids [B, T, k] int32), chunked like the losses.
    """
    e = jax.lax.stop_gradient(teacher_embed)

    def body(xs):
        (th,) = xs  # [B, c, D]
        lp = jax.nn.log_softmax(logits_from_hidden(th, e, softcap=softcap) / temperature, -1)
        return jax.lax.top_k(lp, k)  # [B, c, k] x2

    t = teacher_h.shape[1]
    lp, ids = _map_chunks(body, (jax.lax.stop_gradient(teacher_h),), chunk_size, remat=False)

    def merge(x):  # [n, B, c, k] -> [B, T, k]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(x.shape[0], -1, k)[:, :t]

    return merge(lp), merge(ids).astype(jnp.int32)


def topk_distill_loss(student_h: Array, student_embed: Array, teacher_topk_logprobs: Array,
                      teacher_topk_ids: Array, *, softcap: float | None,
                      temperature: Scalar = 1.0, mask: Array | None = None,
                      chunk_size: int = 256, fused: bool = True) -> tuple[Array, dict[str, Array]]:
    """T^2 * KL over the teacher's top-k support plus ONE residual bucket, chunked over T.

    Partition the vocab into the k cached ids and a "rest" bucket. Teacher mass
    of the bucket is r = 1 - sum_k p_k (exact, because the cached values are
    full-vocab log-probs); the student's bucket mass q_rest is computed exactly
    as logsumexp over the complement of the ids. The result is the exact KL
    between the two coarsened distributions: it equals the full KL when k == V,
    is <= the full KL otherwise (data processing), and is 0 iff the student
    matches the teacher on the top-k and on the residual mass. Unlike
    renormalising over the top-k, it penalises a student that puts too much
    (or too little) mass outside the teacher's top-k.

    teacher_topk_logprobs [B, T, k] must be log_softmax(teacher_logits / T) at
    the SAME temperature as `temperature` (see `teacher_topk`): the teacher's
    residual mass at another T cannot be recovered from a top-k cache, so a
    temperature schedule needs a re-cache. ids [B, T, k] must be distinct per token.
    fused (default): fused.py, the gradient formed in the forward; False: autodiff (reference).
    """
    _check_static(temperature, 0.0)
    bt = student_h.shape[:2]
    w = _weights(mask, bt)
    if fused:
        return fused_topk_loss(student_h, student_embed, teacher_topk_logprobs, teacher_topk_ids, softcap=softcap,
                               temperature=temperature, weights=w, chunk_size=chunk_size)
    temp = jnp.asarray(temperature, jnp.float32)
    k, v = teacher_topk_ids.shape[-1], student_embed.shape[0]
    lp_all = jax.lax.stop_gradient(teacher_topk_logprobs).astype(jnp.float32)
    ids_all = teacher_topk_ids.astype(jnp.int32)

    def body(xs):
        sh, lp_t, ids, wc = xs  # [B, c, D], [B, c, k], [B, c, k], [B, c]
        z = logits_from_hidden(sh, student_embed, softcap=softcap)  # [B, c, V]
        zt = z / temp
        lse = jax.nn.logsumexp(zt, axis=-1)  # [B, c]
        log_q = jnp.take_along_axis(zt, ids, -1) - lse[..., None]  # [B, c, k]
        kl = jnp.sum(jnp.exp(lp_t) * (lp_t - log_q), -1)  # [B, c]
        if k < v:  # k == V: bucket is empty by construction; r is only rounding noise
            z_rest = jnp.put_along_axis(zt, ids, NEG, axis=-1, inplace=False)  # [B, c, V]
            log_q_rest = jax.nn.logsumexp(z_rest, axis=-1) - lse  # [B, c]
            r = jnp.clip(1.0 - jnp.sum(jnp.exp(lp_t), -1), 0.0, 1.0)  # [B, c]
            r_safe = jnp.where(r > 0, r, 1.0)  # 0 * log 0 := 0 without NaN grads
            kl = kl + jnp.where(r > 0, r * (jnp.log(r_safe) - log_q_rest), 0.0)
        t_top = jnp.take_along_axis(ids, jnp.argmax(lp_t, -1)[..., None], -1)[..., 0]
        agree = (jnp.argmax(z, -1) == t_top).astype(jnp.float32)  # [B, c]
        return _weighted_sums({"kl": kl, "ce": jnp.zeros_like(kl), "agree": agree}, wc)

    per_chunk = _map_chunks(body, (student_h, lp_all, ids_all, w), chunk_size, remat=True)
    sums = jax.tree.map(lambda a: jnp.sum(a, 0), per_chunk)
    return _finish(sums, temp, 0.0, with_ce=False)


# ----------------------------------------------------------------------------- schedules
def constant(value: float) -> Callable[[Any], Array]:
    return optax.constant_schedule(value)


def linear(start: float, end: float, steps: int) -> Callable[[Any], Array]:
    """start -> end linearly over `steps`, then held at end."""
    return optax.linear_schedule(init_value=start, end_value=end, transition_steps=steps)


def cosine(start: float, end: float, steps: int) -> Callable[[Any], Array]:
    """Half-cosine start -> end over `steps`, then held. (optax's cosine_decay
    parametrises end as a fraction of start, which cannot express start == 0.)"""
    def fn(step):
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    return fn


@dataclasses.dataclass(frozen=True)
class DistillSchedule:
    """Step -> (temperature, alpha); plain floats are promoted to constant schedules."""
    temperature: Callable[[Any], Array] | float = 1.0
    alpha: Callable[[Any], Array] | float = 0.0

    def __post_init__(self):
        for name in ("temperature", "alpha"):
            val = getattr(self, name)
            if not callable(val):
                object.__setattr__(self, name, constant(float(val)))

    def __call__(self, step) -> tuple[Array, Array]:
        return (jnp.asarray(self.temperature(step), jnp.float32),
                jnp.asarray(self.alpha(step), jnp.float32))
