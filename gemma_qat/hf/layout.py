"""The Hugging Face Gemma 4 layout: config.json ⇄ ModelConfig and tensor names/shapes ⇄ our tree.

Mapping per tensor follows transformers' `convert_gemma4_weights.py` (reference §2.3), reversed.
Both directions live in one table so import and export cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from gemma_qat.model.config import ModelConfig

_TYPES_FROM_HF = {"sliding_attention": "sliding", "full_attention": "global"}
_TYPES_TO_HF = {v: k for k, v in _TYPES_FROM_HF.items()}


def config_from_hf(d: dict, *, name: str = "hf") -> ModelConfig:
    """Our config from a Gemma 4 config.json (text-only or multimodal, whose text part is
    `text_config`). Both the released form (`global_head_dim`, `num_global_key_value_heads`) and
    the newer `per_layer_config` overrides are understood."""
    t = d.get("text_config", d)
    mt = t.get("model_type", "gemma4_text")
    if mt not in ("gemma4_text", "gemma4"):
        raise ValueError(f"config.json describes model_type {mt!r}; gemma-qat imports Gemma 4 (gemma4_text) only")
    try:
        types = tuple(_TYPES_FROM_HF[x] for x in t["layer_types"])
    except KeyError as e:
        raise ValueError(f"config.json: missing or unknown layer type {e}") from None
    k_eq_v = bool(t.get("attention_k_eq_v", False))
    global_head_dim = t.get("global_head_dim", 512)
    global_kv = t.get("num_global_key_value_heads") if k_eq_v else None
    per_layer = {int(k): v for k, v in (t.get("per_layer_config") or {}).items()}
    for i, ty in enumerate(types):
        if ty == "global" and i in per_layer:
            global_head_dim = per_layer[i].get("head_dim", global_head_dim)
            global_kv = per_layer[i].get("num_key_value_heads", global_kv)
    rope = t.get("rope_parameters") or {}
    local_rope, global_rope = rope.get("sliding_attention", {}), rope.get("full_attention", {})
    if t.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported hidden_activation {t['hidden_activation']!r} (Gemma 4 uses gelu_pytorch_tanh)")
    if not t.get("tie_word_embeddings", d.get("tie_word_embeddings", True)):
        raise ValueError("untied output embeddings are not supported (Gemma 4 text decoders tie lm_head)")
    ple_dim = t.get("hidden_size_per_layer_input") or 0
    if ple_dim and t.get("vocab_size_per_layer_input", t["vocab_size"]) != t["vocab_size"]:
        raise ValueError("vocab_size_per_layer_input must equal vocab_size")
    moe = bool(t.get("enable_moe_block", False))
    return ModelConfig(
        name=name, vocab_size=t["vocab_size"], d_model=t["hidden_size"], layer_types=types,
        num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"],
        num_global_kv_heads=global_kv or t["num_key_value_heads"], ffn_dim=t["intermediate_size"],
        sliding_window=t["sliding_window"], head_dim=t.get("head_dim", 256), global_head_dim=global_head_dim,
        k_eq_v_global=k_eq_v, ple_dim=ple_dim, num_kv_shared_layers=t.get("num_kv_shared_layers", 0),
        double_wide_shared_mlp=bool(t.get("use_double_wide_mlp", False)),
        num_experts=(t.get("num_experts") or 0) if moe else 0, top_k_experts=(t.get("top_k_experts") or 0) if moe else 0,
        expert_ffn_dim=(t.get("moe_intermediate_size") or 0) if moe else 0,
        local_rope_theta=local_rope.get("rope_theta", 10_000.0), global_rope_theta=global_rope.get("rope_theta", 1e6),
        global_rope_proportion=global_rope.get("partial_rotary_factor", 0.25),
        final_softcap=t.get("final_logit_softcapping"), norm_eps=t.get("rms_norm_eps", 1e-6),
        max_position=t.get("max_position_embeddings", 131_072))


def config_to_hf(c: ModelConfig) -> dict:
    """config.json for transformers' Gemma4ForCausalLM."""
    if not c.k_eq_v_global and c.num_global_kv_heads != c.num_kv_heads:
        raise ValueError("HF Gemma 4 can give global layers their own KV-head count only together with K=V")
    return {
        "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "global_head_dim": c.global_head_dim, "num_global_key_value_heads": c.num_global_kv_heads,
        "attention_k_eq_v": c.k_eq_v_global, "layer_types": [_TYPES_TO_HF[x] for x in c.layer_types],
        "sliding_window": c.sliding_window, "hidden_size_per_layer_input": c.ple_dim,
        "vocab_size_per_layer_input": c.vocab_size, "num_kv_shared_layers": c.num_kv_shared_layers,
        "use_double_wide_mlp": c.double_wide_shared_mlp, "enable_moe_block": c.is_moe,
        "num_experts": c.num_experts or None, "top_k_experts": c.top_k_experts or None,
        "moe_intermediate_size": c.expert_ffn_dim or None, "final_logit_softcapping": c.final_softcap,
        "rms_norm_eps": c.norm_eps, "max_position_embeddings": c.max_position, "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": c.local_rope_theta},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": c.global_rope_proportion,
                               "rope_theta": c.global_rope_theta}},
    }


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One of our parameters built from one or more HF tensors (several only for stacked K/V and
    gate/up): `to_ours(*hf_arrays)` and `to_hf(ours) -> tuple of hf arrays`."""

    ours: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    to_ours: Callable[..., np.ndarray]
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _same(ours, hf, shape):
    return TensorMap(ours, (hf,), (shape,), lambda x: x, lambda w: (w,))


def _transposed(ours, hf, shape):  # HF Linear [out, in] ⇄ our [in, out]
    return TensorMap(ours, (hf,), (shape,), lambda x: x.T, lambda w: (w.T,))


def _heads_in(ours, hf, n, d, h):  # HF [n·H, D] ⇄ our [n, D, H]
    return TensorMap(ours, (hf,), ((n * h, d),), lambda x: x.T.reshape(d, n, h).transpose(1, 0, 2),
                     lambda w: (w.transpose(1, 0, 2).reshape(d, n * h).T,))


def layer_maps(c: ModelConfig, i: int) -> list[TensorMap]:
    d, n, h, k = c.d_model, c.num_heads, c.layer_head_dim(i), c.layer_kv_heads(i)
    p, a, o = f"model.layers.{i}.", f"layer_{i}/attn/", f"layer_{i}/"
    m = [
        _same(o + "pre_attention_norm/scale", p + "input_layernorm.weight", (d,)),
        _same(o + "post_attention_norm/scale", p + "post_attention_layernorm.weight", (d,)),
        _same(o + "post_ffw_norm/scale", p + "post_feedforward_layernorm.weight", (d,)),
        _same(o + "skip_scale", p + "layer_scalar", (1,)),
        _heads_in(a + "q_einsum/w", p + "self_attn.q_proj.weight", n, d, h),
        _same(a + "query_norm/scale", p + "self_attn.q_norm.weight", (h,)),
        TensorMap(a + "attn_vec_einsum/w", (p + "self_attn.o_proj.weight",), ((d, n * h),),
                  lambda x: x.reshape(d, n, h).transpose(1, 2, 0),
                  lambda w: (w.transpose(2, 0, 1).reshape(d, n * h),)),
    ]
    if not c.is_kv_shared(i):
        m.append(_same(a + "key_norm/scale", p + "self_attn.k_norm.weight", (h,)))
        if c.layer_k_eq_v(i):
            m.append(_heads_in(a + "k_einsum/w", p + "self_attn.k_proj.weight", k, d, h))
        else:
            one = _heads_in("", "", k, d, h)
            m.append(TensorMap(a + "kv_einsum/w", (p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
                               ((k * h, d),) * 2, lambda kk, vv: np.stack([one.to_ours(kk), one.to_ours(vv)]),
                               lambda w: (one.to_hf(w[0])[0], one.to_hf(w[1])[0])))
    f = c.layer_ffn_dim(i)
    dense = "mlp2/" if c.is_moe else "mlp/"
    m += [
        TensorMap(o + dense + "gating_einsum/w", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                  ((f, d), (f, d)), lambda g, u: np.stack([g, u]), lambda w: (w[0], w[1])),
        _transposed(o + dense + "linear/w", p + "mlp.down_proj.weight", (d, f)),
    ]
    if c.is_moe:
        e, fe = c.num_experts, c.expert_ffn_dim
        m += [
            _same(o + "pre_ffw2_norm/scale", p + "pre_feedforward_layernorm.weight", (d,)),
            _same(o + "post_ffw2_norm/scale", p + "post_feedforward_layernorm_1.weight", (d,)),
            _same(o + "pre_ffw_norm/scale", p + "pre_feedforward_layernorm_2.weight", (d,)),
            _same(o + "post_ffw1_norm/scale", p + "post_feedforward_layernorm_2.weight", (d,)),
            _transposed(o + "mlp/router_logits/w", p + "router.proj.weight", (e, d)),
            _same(o + "mlp/router_scale", p + "router.scale", (d,)),
            _same(o + "mlp/per_expert_scale", p + "router.per_expert_scale", (e,)),
            TensorMap(o + "mlp/gating_einsum/w", (p + "experts.gate_up_proj",), ((e, 2 * fe, d),),
                      lambda x: x.reshape(e, 2, fe, d), lambda w: (w.reshape(e, 2 * fe, d),)),
            TensorMap(o + "mlp/linear/w", (p + "experts.down_proj",), ((e, d, fe),),
                      lambda x: x.transpose(0, 2, 1), lambda w: (w.transpose(0, 2, 1),)),
        ]
    else:
        m.append(_same(o + "pre_ffw_norm/scale", p + "pre_feedforward_layernorm.weight", (d,)))
    if c.ple_dim:
        m += [
            _transposed(o + "per_layer_input_gate/w", p + "per_layer_input_gate.weight", (c.ple_dim, d)),
            _transposed(o + "per_layer_projection/w", p + "per_layer_projection.weight", (d, c.ple_dim)),
            _same(o + "post_per_layer_input_norm/scale", p + "post_per_layer_input_norm.weight", (d,)),
        ]
    return m


def tensor_maps(c: ModelConfig) -> list[TensorMap]:
    """Every parameter of our tree, with the HF text-decoder tensors (prefix `model.`) it comes from."""
    v, d, l, p = c.vocab_size, c.d_model, c.num_layers, c.ple_dim
    m = [_same("embedder/input_embedding", "model.embed_tokens.weight", (v, d)),
         _same("final_norm/scale", "model.norm.weight", (d,))]
    if p:
        m += [
            TensorMap("embedder/per_layer_embeddings", ("model.embed_tokens_per_layer.weight",), ((v, l * p),),
                      lambda x: x.reshape(v, l, p), lambda w: (w.reshape(v, l * p),)),
            TensorMap("embedder/per_layer_model_projection/w", ("model.per_layer_model_projection.weight",),
                      ((l * p, d),), lambda x: x.T.reshape(d, l, p), lambda w: (w.reshape(d, l * p).T,)),
            _same("embedder/per_layer_projection_norm/scale", "model.per_layer_projection_norm.weight", (p,)),
        ]
    for i in range(c.num_layers):
        m += layer_maps(c, i)
    return m


def ignored_hf_names(c: ModelConfig) -> set[str]:
    """Text tensors that official checkpoints may carry but the architecture never uses: K/V
    weights of KV-shared layers (HF `_keys_to_ignore_on_load_unexpected`)."""
    out = set()
    for i in range(c.first_kv_shared_layer, c.num_layers) if c.num_kv_shared_layers else ():
        for name in ("k_proj.weight", "v_proj.weight", "k_norm.weight", "v_norm.weight"):
            out.add(f"model.layers.{i}.self_attn.{name}")
    return out
