"""The Gemma 4 text decoder: blocks (dense, MoE, PLE), KV sharing, masks, tied head and softcap, and
incremental decoding through a KV cache (kv_cache.py).

Parameter names follow the official Flax layout (google-deepmind/gemma, reference §2.1), e.g.
`layer_3/attn/q_einsum/w`, so official checkpoints map onto this tree one to one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_qat.model.attention import Attention, attention_mask, cache_attention_mask
from gemma_qat.model.config import ModelConfig
from gemma_qat.model.embed import Embedder
from gemma_qat.model.kv_cache import KVCache, init_cache  # noqa: F401 (re-exported)
from gemma_qat.model.layers import WEIGHT_NAME, Array, DType, Einsum, FeedForward, NoQuant, QuantPolicy, RMSNorm, gelu_tanh
from gemma_qat.model.moe import MoE

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Full remat, but each layer keeps its weights as the matmuls see them (quantized, bf16): the
    # backward recomputes activations only, not the fake-quant (+2 bytes per weight). Meant for unsharded
    # weights: under FSDP the kept copies are full-size wherever XLA gathers before it quantizes.
    "weights": jax.checkpoint_policies.save_only_these_names(WEIGHT_NAME),
}


class Block(nn.Module):
    config: ModelConfig
    layer: int
    quant: QuantPolicy
    attention: str = "auto"
    grouped: str = "auto"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, ple: Array | None, shared_kv,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | None = None,
                 segment_ids: Array | None = None):
        # x [B, T, D]; ple [B, T, P] or None; returns (x, (key, value)) of this layer's attention
        # (with a cache: its updated buffers; see Attention).
        cfg, i = self.config, self.layer
        kw = dict(quant=self.quant, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: RMSNorm(eps=cfg.norm_eps, axis_name="norm", param_dtype=self.param_dtype, name=name)
        glob = cfg.is_global(i)
        attn = Attention(
            d_model=cfg.d_model, num_heads=cfg.num_heads, num_kv_heads=cfg.layer_kv_heads(i),
            head_dim=cfg.layer_head_dim(i),
            rope_theta=cfg.global_rope_theta if glob else cfg.local_rope_theta,
            rope_proportion=cfg.global_rope_proportion if glob else 1.0,
            window=None if glob else cfg.sliding_window, k_eq_v=cfg.layer_k_eq_v(i),
            kv_shared=cfg.is_kv_shared(i), eps=cfg.norm_eps, impl=self.attention, name="attn", **kw)
        a, kv = attn(norm("pre_attention_norm")(x), positions, mask, shared_kv, cache, cache_index, segment_ids)
        x = x + norm("post_attention_norm")(a)

        if cfg.is_moe:
            r = x
            dense = FeedForward(cfg.d_model, cfg.layer_ffn_dim(i), name="mlp2", **kw)(norm("pre_ffw2_norm")(r))
            moe = MoE(cfg.d_model, cfg.num_experts, cfg.top_k_experts, cfg.expert_ffn_dim, eps=cfg.norm_eps,
                      grouped=self.grouped, name="mlp", **kw)(norm("pre_ffw_norm")(r), router_input=r)
            x = r + norm("post_ffw_norm")(norm("post_ffw2_norm")(dense) + norm("post_ffw1_norm")(moe))
        else:
            f = FeedForward(cfg.d_model, cfg.layer_ffn_dim(i), name="mlp", **kw)(norm("pre_ffw_norm")(x))
            x = x + norm("post_ffw_norm")(f)

        if cfg.ple_dim:
            gate = Einsum((cfg.d_model, cfg.ple_dim), ("embed", "ple"), (0,), name="per_layer_input_gate", **kw)
            proj = Einsum((cfg.ple_dim, cfg.d_model), ("ple", "embed"), (0,), name="per_layer_projection", **kw)
            p = proj("BTP,PD->BTD", gelu_tanh(gate("BTD,DP->BTP", x)) * ple)
            x = x + norm("post_per_layer_input_norm")(p)

        skip = self.param("skip_scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (1,),
                          self.param_dtype)
        x = x * skip.astype(x.dtype)
        return nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed")), kv


class Transformer(nn.Module):
    """tokens [B, T] → fp32 logits [B, T, V] (or the final hidden states and the head's table, for
    losses that form logits chunk by chunk).

    With `cache` (a KVCache from `init_cache`) the tokens continue the cached sequence: they take slots
    cache.length.. (default positions continue from there too), attend to the cache and themselves
    under the same causal / sliding-window / segment rules by absolute index, and the call returns
    (output, updated cache). Prefill the prompt in one call, then feed one token per step; any
    chunking gives the full forward's logits for those tokens."""

    config: ModelConfig
    quant: QuantPolicy = NoQuant()
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    remat: str = "none"
    attention: str = "auto"  # attention kernel, see attention.attend: "xla" | "cudnn" | "auto" (GPU: cuDNN)
    grouped: str = "auto"  # MoE grouped matmul, see grouped_matmul: "ragged" | "blocked" | "kernel" | "auto"

    @nn.compact
    def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
                 *, cache: KVCache | None = None, return_hidden: bool = False):
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if cache is not None:
                positions = positions + cache.length  # [B, T] continue the cached sequence
        packed = segment_ids  # None: one document per row, so fused kernels need no segment mask
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        kw = dict(quant=self.quant, dtype=self.dtype, param_dtype=self.param_dtype)

        embedder = Embedder(cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.ple_dim, eps=cfg.norm_eps,
                            name="embedder", **kw)
        x = embedder.encode(tokens)
        ple = embedder.per_layer_inputs(tokens, x) if cfg.ple_dim else None
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))
        if cache is None:
            masks = {"global": attention_mask(segment_ids, None),
                     "sliding": attention_mask(segment_ids, cfg.sliding_window)}
        else:
            start = cache.length
            cached_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                           (0, start))  # [B, S]
            masks = {"global": cache_attention_mask(segment_ids, cached_segments, start, None),
                     "sliding": cache_attention_mask(segment_ids, cached_segments, start, cfg.sliding_window)}
            new_layers = {}

        policy = REMAT_POLICIES[self.remat]
        block_cls = Block if self.remat == "none" else nn.remat(Block, policy=policy)
        sources = set(cfg.kv_source)
        kv_store = {}
        for i in range(cfg.num_layers):
            shared = kv_store[cfg.kv_source[i]] if cfg.is_kv_shared(i) else None
            # With a cache the block also gets this layer's buffers (none for KV-shared layers:
            # `shared` are then the source's buffers) and the slot of this call's first token.
            cache_args = (None, None) if cache is None else (cache.layers.get(f"layer_{i}"), start)
            x, kv = block_cls(cfg, i, attention=self.attention, grouped=self.grouped, name=f"layer_{i}", **kw)(
                x, positions, masks[cfg.layer_types[i]], None if ple is None else ple[:, :, i], shared, *cache_args,
                packed)
            if i in sources:
                kv_store[i] = kv
            if cache is not None and not cfg.is_kv_shared(i):
                new_layers[f"layer_{i}"] = kv

        h = RMSNorm(eps=cfg.norm_eps, param_dtype=self.param_dtype, name="final_norm")(x)
        table = embedder.decode_table()  # [V, D]
        if cache is not None:
            out = (h, table) if return_hidden else logits_from_hidden(h, table, cfg.final_softcap)
            return out, KVCache(length=start + t, segment_ids=cached_segments, layers=new_layers)
        if return_hidden:
            return h, table
        return logits_from_hidden(h, table, cfg.final_softcap)


def logits_from_hidden(h: Array, table: Array, softcap: float | None) -> Array:
    """[B, T, D] @ [V, D]ᵀ in fp32 accumulation, then c·tanh(z/c)."""
    z = jnp.einsum("BTD,VD->BTV", h, table.astype(h.dtype), preferred_element_type=jnp.float32)
    if softcap:
        z = softcap * jnp.tanh(z / softcap)
    return nn.with_logical_constraint(z, ("act_batch", "act_seq", "act_vocab"))
