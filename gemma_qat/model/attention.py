"""Gemma 4 attention: QK-norm with learned scale, scale-free V-norm, no 1/√H scaling, GQA, sliding or
global layers (global: head dim 512, proportional RoPE, optional K=V), KV sharing, and an optional
KV cache for incremental decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_qat import devices, sharding
from gemma_qat.model import splash
from gemma_qat.model.layers import (Array, DType, Einsum, QuantPolicy, RMSNorm, apply_rope, rope_inv_freq,
                                   tie_gradients)

_NEG_INF = -2.3819763e38  # most negative bf16-representable value; keeps fully masked rows finite


def attention_mask(segment_ids: Array, window: int | None) -> Array:
    """[B, T] segment ids (0 = padding) → [B, T, S] bool mask: causal by index, same segment, and for
    sliding layers key index > query index − window (the window holds the current token and W−1
    before it). The whole sequence at once: the cached rule with the sequence as its own cache."""
    return cache_attention_mask(segment_ids, segment_ids, 0, window)


def cache_attention_mask(segment_ids: Array, cached_segment_ids: Array, start: Array, window: int | None) -> Array:
    """The general rule behind `attention_mask`: queries [B, T] sit at absolute indices start..start+T-1
    of the sequence, keys are the cache's S slots, slot j holding the sequence's token j (segment ids
    `cached_segment_ids` [B, S], already updated with this call's tokens) → [B, T, S] bool mask. Same
    rules by absolute index, so feeding a sequence in chunks gives the mask rows of feeding it whole;
    causality also hides the not-yet-written slots ≥ start+T."""
    t, s = segment_ids.shape[1], cached_segment_ids.shape[1]
    q_idx = start + jnp.arange(t)[:, None]
    k_idx = jnp.arange(s)[None, :]
    mask = k_idx <= q_idx
    if window is not None:
        mask &= k_idx > q_idx - window
    same = segment_ids[:, :, None] == cached_segment_ids[:, None, :]
    return mask[None] & same


ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")
CUDNN_MAX_HEAD_DIM = 256  # cuDNN flash attention on Hopper; the 512-wide global heads take the XLA path


def attend(q: Array, key: Array, value: Array, mask: Array, segment_ids: Array | None, window: int | None,
           impl: str = "xla", head_shards: int = 1) -> Array:
    """Softmax attention without 1/√H scaling (Gemma 4 relies on QK-norm; HF `scaling = 1.0`).

    q [B, T, N, H], key/value [B, S, K, H] (N a multiple of K: contiguous groups of N/K query heads
    share a KV head), mask [B, T, S] bool (the full rule: causal, window, segments) → [B, T, N, H].

    impl "xla": einsum logits in fp32, masked softmax, einsum with V; materialises [B, K, G, T, S].
    impl "cudnn": cuDNN's fused flash attention (GPU, bf16/fp16, head dim ≤ 256, self-attention with
    S = T): causal and the sliding window are cuDNN's own masks, and packed documents (segment_ids
    given; None means one document per row) enter as an additive bias built from the segment rule.
    impl "splash": Pallas splash attention on TPU (model/splash.py; T and H multiples of 128, S = T),
    flash-style, in a shard_map under a mesh; off TPU it runs in Pallas' interpreter (tests).
    "auto" takes cudnn where it applies (a GPU backend, head dim and dtype supported, S = T, and the KV
    heads split as the query heads do: `head_shards` ways under tensor parallelism, since cuDNN's
    partitioner needs q, k and v sharded alike; 1 KV head over tensor=2 is replicated), splash on a TPU
    where it fits (KV heads split or repeated to the head shards), xla elsewhere."""
    if impl == "splash" or (impl == "auto" and devices.platform() == "tpu"):
        if splash.applies(q, key, head_shards):
            q, key, value = tie_gradients(q, key, value)
            return splash.splash_attention(q, key, value, segment_ids, window, head_shards=head_shards)
        if impl == "splash":
            raise ValueError(f"attention impl 'splash' needs T = S and T, H multiples of {splash.MIN_BLOCK}, and "
                             f"KV heads {key.shape[2]} split or repeated to {head_shards} head shards, rows and heads "
                             f"splitting every device of the mesh; got q "
                             f"{q.shape}, key {key.shape}: use attention = 'xla' or 'auto'")
        impl = "xla"
    if impl == "auto":
        ok = (devices.platform() == "gpu" and q.shape[-1] <= CUDNN_MAX_HEAD_DIM and q.shape[-1] % 8 == 0
              and q.dtype in (jnp.bfloat16, jnp.float16) and key.shape[1] == q.shape[1]
              and key.shape[2] % head_shards == 0 and q.shape[2] % head_shards == 0)
        if ok:
            try:  # jax checks cuDNN's presence, version and this GPU's limits (e.g. H ≤ 128 before Hopper)
                return fused_sdpa(q, key, value, segment_ids, window, implementation="cudnn")
            except (RuntimeError, NotImplementedError, ValueError):
                pass
        impl = "xla"
    if impl == "cudnn":
        return fused_sdpa(q, key, value, segment_ids, window, implementation="cudnn")
    if impl != "xla":
        raise ValueError(f"unknown attention impl {impl!r}; use one of {ATTENTION_IMPLS}")
    b, t, n, h = q.shape
    k = key.shape[2]
    qg = q.reshape(b, t, k, n // k, h)  # [B, T, K, G, H]
    qg, key, value = tie_gradients(qg, key, value)  # dK, dV computed while dS and P are live (layers.py)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, key, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, value).reshape(b, t, n, h)


def fused_sdpa(q: Array, key: Array, value: Array, segment_ids: Array | None, window: int | None,
               implementation: str = "cudnn") -> Array:
    """Our mask rule through jax.nn.dot_product_attention: causal, the window as (W−1 keys to the
    left, none to the right) so a token sees itself and W−1 before it, and segments (if packed) as
    a [B, 1, T, S] mask that cuDNN folds into a bias. implementation="xla" runs the same call
    through XLA, which is how CPU tests check this translation of the rule."""
    seg_mask = None
    if segment_ids is not None:
        seg_mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q, key.astype(q.dtype), value.astype(q.dtype), mask=seg_mask, scale=1.0, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0), implementation=implementation)


class Attention(nn.Module):
    """One attention layer. Non-shared layers compute and return their post-norm, post-RoPE K and V
    (so later KV-shared layers can reuse them); shared layers get `shared_kv` and own no K/V params.

    Decoding with a KV cache passes `cache_index` (the slot of this call's first token) and, to a
    non-shared layer, `cache` = its (key, value) buffers [B, S, K, H]: this call's K/V are written at
    slots cache_index.., attention runs over the whole updated buffers (the mask hides the slots not
    to attend), and the updated buffers are returned in place of this call's K/V, so KV-shared layers
    (whose `shared_kv` are then the source's buffers) and the next step see them."""

    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_proportion: float
    window: int | None  # None for global layers
    k_eq_v: bool
    kv_shared: bool
    quant: QuantPolicy
    eps: float = 1e-6
    impl: str = "auto"  # attention kernel: "xla" | "cudnn" | "auto" (see `attend`)
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, shared_kv: tuple[Array, Array] | None = None,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | None = None,
                 segment_ids: Array | None = None):
        # x [B, T, D], positions [B, T], mask [B, T, S] (S = T, or the cache length)
        d, n, k, h = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(quant=self.quant, dtype=self.dtype, param_dtype=self.param_dtype)
        norm_kw = dict(eps=self.eps, param_dtype=self.param_dtype, axis_name="head_dim")
        inv_freq = rope_inv_freq(h, self.rope_theta, self.rope_proportion)

        q = Einsum((n, d, h), ("q_heads", "embed", "head_dim"), (1,), name="q_einsum", **kw)("BTD,NDH->BTNH", x)
        q = apply_rope(RMSNorm(name="query_norm", **norm_kw)(q), positions, inv_freq)

        if self.kv_shared:
            if shared_kv is None:
                raise ValueError("a KV-shared attention layer needs the K/V of its source layer")
            key, value = new_kv = shared_kv  # with a cache: the source's updated buffers
        else:
            if self.k_eq_v:
                raw_k = Einsum((k, d, h), ("kv_heads", "embed", "head_dim"), (1,), name="k_einsum", **kw)(
                    "BTD,KDH->BTKH", x)
                raw_v = raw_k  # V is the un-RoPE'd key projection, normalised without scale
            else:
                kv = Einsum((2, k, d, h), (None, "kv_heads", "embed", "head_dim"), (2,), name="kv_einsum", **kw)(
                    "BTD,CKDH->CBTKH", x)
                raw_k, raw_v = kv[0], kv[1]
            key = apply_rope(RMSNorm(name="key_norm", **norm_kw)(raw_k), positions, inv_freq)
            value = RMSNorm(with_scale=False, eps=self.eps)(raw_v)
            new_kv = (key, value)
            if cache is not None:
                # Cache the post-norm, post-RoPE K and V (both, also for K=V layers, where they
                # differ by key_norm and RoPE): decoding then only projects the new tokens.
                at = (0, cache_index, 0, 0)
                new_kv = (jax.lax.dynamic_update_slice(cache[0], key.astype(cache[0].dtype), at),  # [B, S, K, H]
                          jax.lax.dynamic_update_slice(cache[1], value.astype(cache[1].dtype), at))
        if cache_index is not None:  # attend over the whole buffers, in the compute dtype
            key, value = (a.astype(self.dtype) for a in new_kv)

        q = nn.with_logical_constraint(q, ("act_batch", "act_seq", "act_heads", None))
        shards = sharding.logical_shards("act_heads")
        if key.shape[2] % shards == 0:  # K and V split like q (a fused kernel's partitioner needs it)
            key, value = (nn.with_logical_constraint(a, ("act_batch", "act_seq", "act_heads", None))
                          for a in (key, value))
        out = attend(q, key, value, mask, segment_ids, self.window,
                     impl="xla" if cache_index is not None else self.impl, head_shards=shards)  # [B, T, N, H]
        out = nn.with_logical_constraint(out, ("act_batch", "act_seq", "act_heads", None))
        o = Einsum((n, h, d), ("q_heads", "head_dim", "embed"), (0, 1), name="attn_vec_einsum", **kw)
        return o("BTNH,NHD->BTD", out), new_kv
