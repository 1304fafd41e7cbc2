"""The Gemma 4 text decoder: blocks (dense, MoE, PLE), KV sharing, masks, tied head and softcap, and
incremental decoding through a KV cache (kv_cache.py).

Parameter names follow the official Flax layout (google-deepmind/gemma, reference §2.1), e.g.
`layer_3/attn/q_einsum/w`, so official checkpoints map onto this tree one to one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_qat.model import scan
from gemma_qat.model.attention import Attention, attention_mask, cache_attention_mask
from gemma_qat.model.config import ModelConfig
from gemma_qat.model.embed import Embedder, logits_from_hidden
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
    scan_layers: bool = False  # lax.scan over the repeating layer pattern (model/scan.py): compile time

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
        block_kw = dict(attention=self.attention, grouped=self.grouped, **kw)
        sources = set(cfg.kv_source)
        kv_store = {}
        for g in self._groups(cache):
            if g.repeats > 1:
                x = self._scan_group(g, x, positions, masks, ple, kv_store, packed, block_kw)
                continue
            i = g.start
            shared = kv_store[cfg.kv_source[i]] if cfg.is_kv_shared(i) else None
            # With a cache the block also gets this layer's buffers (none for KV-shared layers:
            # `shared` are then the source's buffers) and the slot of this call's first token.
            cache_args = (None, None) if cache is None else (cache.layers.get(f"layer_{i}"), start)
            x, kv = block_cls(cfg, i, name=f"layer_{i}", **block_kw)(
                x, positions, masks[cfg.layer_types[i]], None if ple is None else ple[:, :, i], shared, *cache_args,
                packed)
            if i in sources:
                kv_store[i] = kv
            if cache is not None and not cfg.is_kv_shared(i):
                new_layers[f"layer_{i}"] = kv

        h = RMSNorm(eps=cfg.norm_eps, param_dtype=self.param_dtype, name="final_norm")(x)
        table = embedder.decode_table()  # [V, D]
        if cache is not None:
            out = (h, table) if return_hidden else _head(h, table, cfg.final_softcap)
            return out, KVCache(length=start + t, segment_ids=cached_segments, layers=new_layers)
        if return_hidden:
            return h, table
        return _head(h, table, cfg.final_softcap)

    def _groups(self, cache) -> list[scan.Group]:
        """Scanned groups where `scan_layers` asks for them and the call allows (a training or scoring
        forward over bound parameters only: not init, which creates the per-layer tree, not a decode
        step, whose cache is per layer, not a call that reads or writes other collections, such as the
        calibration of activation scales)."""
        cfg = self.config
        plain = not self.is_initializing() and not self.scope.mutable and set(self.variables) == {"params"}
        if self.scan_layers and cache is None and plain:
            return scan.layer_groups(cfg, getattr(self.quant, "layer_key", None))
        return [scan.Group(i, 1, 1) for i in range(cfg.num_layers)]

    def _scan_group(self, g: scan.Group, x, positions, masks, ple, kv_store, packed, block_kw):
        """`lax.scan` over the group's windows: the per-layer parameters stacked per window position
        ([repeats, ...]), PLE inputs as the scanned inputs, remat per layer as in the unrolled model."""
        cfg, params = self.config, self.variables["params"]
        assert not any(i in scan.kv_sources(cfg) for i in range(g.start, g.stop)), g  # layer_groups keeps them out
        stacked = [jax.tree.map(lambda *ws: jnp.stack(ws), *[params[f"layer_{i}"] for i in
                                                             range(g.start + k, g.stop, g.period)])
                   for k in range(g.period)]
        ple_xs = None
        if ple is not None:  # [B, T, L, P] -> [repeats, B, T, period, P]
            b, t = ple.shape[:2]
            ple_xs = jnp.moveaxis(ple[:, :, g.start:g.stop].reshape(b, t, g.repeats, g.period, -1), 2, 0)
        # The policy's per-layer constants (frozen activation scales) ride along as [repeats] inputs.
        constants = getattr(self.quant, "layer_constants", lambda i: {})
        consts = [{key: jnp.asarray([constants(i)[key] for i in range(g.start + k, g.stop, g.period)], jnp.float32)
                   for key in constants(g.start + k)} for k in range(g.period)]

        def layer_fn(i):
            shared = kv_store[cfg.kv_source[i]] if cfg.is_kv_shared(i) else None

            def f(p, x, ple_i, c):
                quant = self.quant.with_layer_constants(i, c) if c else self.quant
                one = _Layer(cfg, i, {**block_kw, "quant": quant}, parent=None)
                return one.apply({"params": {f"layer_{i}": p}}, x, positions, masks[cfg.layer_types[i]], ple_i,
                                 shared, None, None, packed)[0]
            return f if self.remat == "none" else jax.checkpoint(f, policy=REMAT_POLICIES[self.remat],
                                                                 prevent_cse=False)

        fns = [layer_fn(i) for i in g.layers(0)]  # the first window's layers stand for every window

        def body(x, xs):
            ps, pl, cs = xs
            for k, f in enumerate(fns):
                x = f(ps[k], x, None if pl is None else pl[:, :, k], cs[k])
            return x, None

        return jax.lax.scan(body, x, (stacked, ple_xs, consts))[0]


class _Layer(nn.Module):
    """Layer `layer` alone under its own name (`layer_3/...`), applied functionally in a scan body, so the
    quantization policy and the logical-axis constraints see the same paths as in the unrolled model."""

    config: ModelConfig
    layer: int
    block_kw: dict

    @nn.compact
    def __call__(self, *args):
        return Block(self.config, self.layer, name=f"layer_{self.layer}", **self.block_kw)(*args)


def _head(h: Array, table: Array, softcap: float | None) -> Array:
    """[B, T, D] → [B, T, V] fp32 logits (embed.logits_from_hidden), laid out over the mesh's vocab axis."""
    z = logits_from_hidden(h, table, softcap=softcap)
    return nn.with_logical_constraint(z, ("act_batch", "act_seq", "act_vocab"))
