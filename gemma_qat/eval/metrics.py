"""Held-out metrics of candidates against the teacher, and per-tensor quantization error.

Per token (masked by loss_mask, i.e. positions with a real next token of the same document):
  ce     = −log p_c(target)            → perplexity = exp(mean ce)
  kl     = KL(p_teacher ‖ p_c)          → mean, standard deviation and standard error over tokens
  agree  = argmax p_c == argmax p_teacher
The teacher's hidden states are computed once per batch and every candidate is scored against them.
Logits exist only per chunk of `chunk_size` positions ([B, c, V] inside a jitted lax.map for JAX
candidates, [1, c, V] per row for GGUF), never [B, T, V]. Per-token values ([B, T]) come back to the
host and are summed in float64.

The standard error is std/√n over tokens. Tokens of one document are correlated, so it understates
the uncertainty of the mean; treat it as a lower bound (compare candidates on the same batches, where
most of that variance is shared).

Recovery of the PTQ gap: (PPL_PTQ − PPL_X) / (PPL_PTQ − PPL_teacher) — 1 = all of the perplexity
lost to PTQ is won back, 0 = no better than PTQ. Undefined (None, with a note) without a PTQ row or
when PTQ is not worse than the teacher.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gemma_qat.eval.candidates import Candidate
from gemma_qat.model.embed import logits_from_hidden
from gemma_qat.quant import formats
from gemma_qat.quant.policy import weight_axes, weight_in_axes
from gemma_qat.quant.recipe import FLOAT, Resolution

STATS = ("ce", "kl", "agree")


def _token_stats(t_logits, c_logits, targets):
    """[..., V] fp32 teacher/candidate logits, [...] targets -> dict of [...] per-token values."""
    log_pt = jax.nn.log_softmax(t_logits, -1)
    log_pc = jax.nn.log_softmax(c_logits, -1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_pc), -1)
    ce = -jnp.take_along_axis(log_pc, targets[..., None], -1, mode="clip")[..., 0]
    agree = (jnp.argmax(c_logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32)
    return {"ce": ce, "kl": kl, "agree": agree}


def _chunks(x, c: int, n: int):
    """[B, T, ...] -> [n, B, c, ...] (zero-padded to n·c)."""
    x = jnp.pad(x, [(0, 0), (0, n * c - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, c, *x.shape[2:]), 1, 0)


@functools.partial(jax.jit, static_argnames=("softcap_t", "softcap_c", "chunk"))
def _hidden_stats(h_t, e_t, h_c, e_c, targets, *, softcap_t, softcap_c, chunk):
    """Teacher and candidate hidden states [B, T, D] + tables [V, D] -> per-token stats [B, T]."""
    b, t = targets.shape
    c = min(chunk, t)
    n = -(-t // c)

    def body(xs):
        ht, hc, tg = xs  # [B, c, D], [B, c, D], [B, c]
        return _token_stats(logits_from_hidden(ht, e_t, softcap=softcap_t),
                            logits_from_hidden(hc, e_c, softcap=softcap_c), tg)

    out = jax.lax.map(body, (_chunks(h_t, c, n), _chunks(h_c, c, n), _chunks(targets, c, n)))
    return {k: jnp.moveaxis(v, 0, 1).reshape(b, n * c)[:, :t] for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("softcap",))
def _logits_stats(h_t, e_t, c_logits, targets, *, softcap):
    """One chunk: teacher hidden [1, c, D] vs candidate logits [1, c, V] -> stats [1, c]."""
    return _token_stats(logits_from_hidden(h_t, e_t, softcap=softcap), c_logits, targets)


def _row_stats(cand: Candidate, batch, h_t, e_t, softcap, chunk: int) -> dict:
    """Logits-mode candidates (GGUF): one row at a time, chunks of a fixed size (one compile)."""
    b, t = batch["targets"].shape
    out = {k: np.zeros((b, t), np.float32) for k in STATS}
    for r in range(b):
        if not np.asarray(batch["loss_mask"][r]).any():
            continue  # all-padding row: nothing to score, skip the llama.cpp call
        z = cand.logits_row(batch, r)  # [T, V]
        if z.shape[-1] != e_t.shape[0]:
            raise ValueError(f"candidate {cand.name!r} has vocabulary {z.shape[-1]}, the teacher {e_t.shape[0]}")
        for t0 in range(0, t, chunk):
            t1 = min(t0 + chunk, t)
            pad = chunk - (t1 - t0)
            zc = np.pad(z[t0:t1], [(0, pad), (0, 0)])[None]
            hc = jnp.pad(h_t[r:r + 1, t0:t1], [(0, 0), (0, pad), (0, 0)])
            tg = np.pad(np.asarray(batch["targets"][r, t0:t1], np.int32), (0, pad))[None]
            s = _logits_stats(hc, e_t, jnp.asarray(zc), jnp.asarray(tg), softcap=softcap)
            for k in STATS:
                out[k][r, t0:t1] = np.asarray(s[k])[0, : t1 - t0]
    return out


def evaluate(teacher: Candidate, candidates: Iterable[Candidate], batches, *, chunk_size: int = 256,
             include_teacher: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Scores the teacher (first row, KL 0 by construction) and each candidate on `batches` (dicts of
    [B, T] int32 with tokens/targets/loss_mask/segment_ids/positions). Returns
    {"reference", "tokens", "batches", "rows": [per-candidate dicts], "ptq"} with recovery filled in.

    Batches are the outer loop so the teacher runs once per batch; every candidate's weights are
    therefore resident together (on the default device, unsharded). For models that do not fit
    together, evaluate candidates in separate calls on the same batches: the rows are comparable,
    and recovery only needs the PTQ row alongside (or `add_recovery` on the merged rows)."""
    if not teacher.is_jax:
        raise ValueError(f"the teacher must be a JAX model, not {teacher.kind}")
    cands = ([teacher] if include_teacher else []) + list(candidates)
    names = [c.name for c in cands]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    acc = {c.name: dict(n=0.0, ce=0.0, kl=0.0, kl2=0.0, agree=0.0, kls=[]) for c in cands}
    n_batches = 0
    for i, batch in enumerate(batches):
        w = np.asarray(batch["loss_mask"], np.float64)  # [B, T]
        targets = jnp.asarray(batch["targets"], jnp.int32)
        h_t, e_t = teacher.hidden(batch)
        for cand in cands:
            if cand is teacher:
                s = _hidden_stats(h_t, e_t, h_t, e_t, targets, softcap_t=teacher.softcap,
                                  softcap_c=teacher.softcap, chunk=chunk_size)
            elif cand.is_jax:
                h_c, e_c = cand.hidden(batch)
                if e_c.shape[0] != e_t.shape[0]:
                    raise ValueError(f"candidate {cand.name!r} has vocabulary {e_c.shape[0]}, the teacher {e_t.shape[0]}")
                s = _hidden_stats(h_t, e_t, h_c, e_c, targets, softcap_t=teacher.softcap,
                                  softcap_c=cand.softcap, chunk=chunk_size)
            else:
                s = _row_stats(cand, batch, h_t, e_t, teacher.softcap, min(chunk_size, w.shape[1]))
            s = {k: np.asarray(v, np.float64) for k, v in s.items()}
            a = acc[cand.name]
            a["n"] += w.sum()
            a["ce"] += (w * s["ce"]).sum()
            a["kl"] += (w * s["kl"]).sum()
            a["kl2"] += (w * s["kl"] ** 2).sum()
            a["agree"] += (w * s["agree"]).sum()
            a["kls"].append(s["kl"][w > 0])  # the scored tokens' KL, for the tail percentiles
        n_batches += 1
        if progress:
            progress(f"batch {i + 1}: {int(w.sum())} tokens")
    rows = [{**c.info(), **_summarise(acc[c.name])} for c in cands]
    out = {"reference": teacher.name, "tokens": int(acc[teacher.name]["n"]) if cands else 0,
           "batches": n_batches, "rows": rows}
    out["ptq"] = add_recovery(rows, reference=teacher.name)
    return out


def _summarise(a: dict) -> dict:
    n = a["n"]
    if n == 0:
        raise ValueError("the evaluation batches hold no scored tokens (loss_mask is all 0)")
    nll, kl = a["ce"] / n, a["kl"] / n
    var = max(a["kl2"] / n - kl * kl, 0.0) * (n / (n - 1) if n > 1 else 0.0)  # unbiased sample variance
    std = math.sqrt(var)
    # The tail the KLD audits of llama.cpp quants report: a mean can hide a few tokens the format breaks.
    p99, p999 = np.percentile(np.concatenate(a["kls"]), [99.0, 99.9]) if a["kls"] else (math.nan, math.nan)
    return {"tokens": int(n), "nll": float(nll), "ppl": math.exp(nll), "kl_mean": float(kl), "kl_std": std,
            "kl_sem": std / math.sqrt(n), "kl_p99": float(p99), "kl_p999": float(p999), "top1": float(a["agree"] / n)}


def recovery_ratio(ppl_ptq: float, ppl_x: float, ppl_ref: float, *, rtol: float = 1e-9) -> float | None:
    """(PPL_PTQ − PPL_X) / (PPL_PTQ − PPL_ref); None when PTQ is not measurably worse than the
    reference (the gap, relative to PPL_ref, is ≤ rtol), where the ratio means nothing."""
    gap = ppl_ptq - ppl_ref
    if not gap > rtol * abs(ppl_ref):
        return None
    return (ppl_ptq - ppl_x) / gap


def add_recovery(rows: list[dict], *, reference: str) -> str | None:
    """Sets row['recovery'] (and 'recovery_vs', 'recovery_note') for every row against a PTQ row —
    one with the row's own recipe; rows without a recipe use the first PTQ row. Returns that first PTQ name."""
    ref = next(r for r in rows if r["name"] == reference)
    ptqs = [r for r in rows if r["kind"] == "ptq"]
    for r in rows:
        same = [p for p in ptqs if p["recipe"] and p["recipe"] == r.get("recipe")]
        # A quantized row is only compared with PTQ of its own recipe: another recipe's gap says nothing.
        ptq = same[0] if same else (ptqs[0] if ptqs and not r.get("recipe") else None)
        r["recovery_vs"] = ptq["name"] if ptq else None
        r["recovery"] = recovery_ratio(ptq["ppl"], r["ppl"], ref["ppl"]) if ptq else None
        r["recovery_note"] = ((f"no PTQ baseline with recipe {r['recipe']!r}" if r.get("recipe") else
                               "no PTQ baseline among the candidates") if ptq is None else
                              f"PTQ ({ptq['name']}) is not worse than the teacher"
                              if r["recovery"] is None else "")
    return ptqs[0]["name"] if ptqs else None


# ----------------------------------------------------------------------------- quantization error
@functools.partial(jax.jit, static_argnums=(1, 2))
def _sq_err(w, fmt: str, axes):
    w32 = w.astype(jnp.float32)
    d = formats.get_format(fmt).fake_quant(w, axes).astype(jnp.float32) - w32
    return jnp.sum(d * d), jnp.sum(w32 * w32)


def quant_errors(config, params, resolution: Resolution) -> list[dict]:
    """Every quantized parameter's relative Frobenius error ‖W − fq(W)‖/‖W‖ under the recipe, with
    the same fake-quant and axes the student trains with; sorted worst first."""
    axes = weight_in_axes(config)
    rows = []
    for key, w in traverse_util.flatten_dict(params).items():
        path = "/".join(key)
        fmt = resolution.formats[path]
        if fmt == FLOAT:
            continue
        err2, norm2 = (float(x) for x in _sq_err(jnp.asarray(w), fmt, weight_axes(fmt, axes[path])))
        rows.append({"param": path, "format": fmt, "size": int(np.size(w)), "err_sq": err2, "norm_sq": norm2,
                     "rel_error": math.sqrt(err2 / norm2) if norm2 > 0 else 0.0})
    return sorted(rows, key=lambda r: -r["rel_error"])


def _group(path: str) -> str:
    m = re.match(r"(layer_\d+)/", path)
    return m.group(1) if m else path.split("/")[0]


def layer_errors(rows: list[dict]) -> list[dict]:
    """Per layer (and 'embedder'): sqrt(Σ‖ΔW‖² / Σ‖W‖²) over its quantized tensors, in layer order."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        g = groups.setdefault(_group(r["param"]), [0.0, 0.0, 0])
        g[0] += r["err_sq"]
        g[1] += r["norm_sq"]
        g[2] += 1
    order = lambda k: (1, int(k[6:])) if re.fullmatch(r"layer_\d+", k) else (0, 0) if k == "embedder" else (2, 0)
    return [{"group": k, "tensors": v[2], "rel_error": math.sqrt(v[0] / v[1]) if v[1] > 0 else 0.0}
            for k, v in sorted(groups.items(), key=lambda kv: (order(kv[0]), kv[0]))]
