"""Tiny random transformers Gemma 4 models of each structural kind, saved with `save_pretrained`.

The HF configs are written here by hand (not derived from our configs) so that the import path's
config translation is checked against an independent statement of the same architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

_COMMON = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, head_dim=32, global_head_dim=64,
               sliding_window=8, final_logit_softcapping=30.0, vocab_size_per_layer_input=512,
               max_position_embeddings=4096)

KINDS = {
    # E-type: PLE, KV sharing of the last 4 layers, double-wide MLP on shared layers, MQA.
    "e": dict(_COMMON, intermediate_size=128, num_hidden_layers=8, num_key_value_heads=1,
              layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
              hidden_size_per_layer_input=32, num_kv_shared_layers=4, use_double_wide_mlp=True),
    # Dense 31B-like: K=V on global layers with fewer global KV heads.
    "dense": dict(_COMMON, intermediate_size=128, num_hidden_layers=6, num_key_value_heads=2,
                  num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=0,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2),
    # 26B-A4B-like: MoE (8 experts, top-2) beside the dense MLP, K=V globals.
    "moe": dict(_COMMON, intermediate_size=64, num_hidden_layers=6, num_key_value_heads=2,
                num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=0,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere, norms and scalars included (around 1), so that a mapping mistake
    in any tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name or "embed_scale" in name:
                continue
            if t.ndim == 1 or name.endswith("layer_scalar"):
                t.copy_(1.0 + 0.3 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.15 * torch.randn(t.shape, generator=g))


def make_text_model(kind: str, seed: int = 0) -> transformers.Gemma4ForCausalLM:
    config = transformers.Gemma4TextConfig(**KINDS[kind])
    torch.manual_seed(seed)
    model = transformers.Gemma4ForCausalLM(config).eval().to(torch.float32)
    randomize_(model, seed)
    return model


def save_text_model(kind: str, out: Path, *, seed: int = 0, max_shard_size: str | None = None):
    model = make_text_model(kind, seed)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    return model


def save_multimodal_model(kind: str, out: Path, *, seed: int = 0):
    """A Gemma4ForConditionalGeneration with a tiny vision tower: text weights live under
    `model.language_model.` and the tower must be skipped by the importer."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, position_embedding_size=64)
    config = transformers.Gemma4Config(text_config=KINDS[kind], vision_config=vision, audio_config=None)
    torch.manual_seed(seed)
    model = transformers.Gemma4ForConditionalGeneration(config).eval().to(torch.float32)
    randomize_(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    return model


def hf_logits(model, tokens) -> "torch.Tensor":
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens)).logits.float()
