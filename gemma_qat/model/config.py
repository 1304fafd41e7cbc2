"""Gemma 4 text-decoder configs: the five released variants and a `tiny-*` sibling of each.

Facts come from shared/reference/gemma4-architecture.md §1 (google-deepmind/gemma `_gemma4.py`,
transformers `configuration_gemma4.py`); derived per-layer facts are properties so nothing is stored
twice. Every variant has a tiny sibling with the same structural features (PLE, KV sharing, double-wide
MLP, K=V global layers, MoE) and small dims, for CPU tests.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

LayerType = Literal["sliding", "global"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of one Gemma 4 text decoder. Letters: V vocab, D model, L layers, N q heads, K kv heads,
    H head dim, F FFN hidden, P per-layer-embedding dim, E experts."""

    name: str
    vocab_size: int
    d_model: int
    layer_types: tuple[LayerType, ...]
    num_heads: int
    num_kv_heads: int  # sliding layers
    num_global_kv_heads: int  # global layers (equals num_kv_heads where the variant has no override)
    ffn_dim: int  # dense FFN; for MoE variants the parallel dense MLP ("mlp2")
    sliding_window: int
    head_dim: int = 256
    global_head_dim: int = 512
    k_eq_v_global: bool = False  # global layers project K only and use it (un-RoPE'd) as V
    ple_dim: int = 0  # per-layer embedding width, 0 = no PLE
    num_kv_shared_layers: int = 0  # the last n layers reuse K/V of earlier layers
    double_wide_shared_mlp: bool = False  # KV-shared layers use FFN 2·ffn_dim (E2B)
    num_experts: int = 0  # 0 = dense
    top_k_experts: int = 0
    expert_ffn_dim: int = 0
    local_rope_theta: float = 10_000.0
    global_rope_theta: float = 1_000_000.0
    global_rope_proportion: float = 0.25
    final_softcap: float | None = 30.0
    norm_eps: float = 1e-6
    max_position: int = 131_072

    def __post_init__(self):
        problems = []
        if not self.layer_types or self.layer_types[-1] != "global":
            problems.append("the last layer must be 'global' (Gemma 4 forces it)")
        if any(t not in ("sliding", "global") for t in self.layer_types):
            problems.append(f"layer_types may hold only 'sliding'/'global', got {set(self.layer_types)}")
        for kv in (self.num_kv_heads, self.num_global_kv_heads):
            if kv <= 0 or self.num_heads % kv:
                problems.append(f"num_heads={self.num_heads} must be a multiple of kv heads {kv}")
        for h in (self.head_dim, self.global_head_dim):
            if h % 2:
                problems.append(f"head dims must be even for RoPE, got {h}")
        if self.num_experts and not (0 < self.top_k_experts <= self.num_experts and self.expert_ffn_dim):
            problems.append("MoE needs 0 < top_k_experts <= num_experts and expert_ffn_dim > 0")
        if not 0 <= self.num_kv_shared_layers < self.num_layers:
            problems.append(f"num_kv_shared_layers={self.num_kv_shared_layers} must be in [0, num_layers)")
        elif self.num_kv_shared_layers:
            unshared = set(self.layer_types[: self.first_kv_shared_layer])
            if unshared != set(self.layer_types):
                problems.append("every layer type that is KV-shared needs a non-shared layer of that type first")
        if problems:
            raise ValueError(f"invalid ModelConfig {self.name!r}: " + "; ".join(problems))

    # --- derived, per layer ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    def is_global(self, i: int) -> bool:
        return self.layer_types[i] == "global"

    def layer_head_dim(self, i: int) -> int:
        return self.global_head_dim if self.is_global(i) else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        return self.num_global_kv_heads if self.is_global(i) else self.num_kv_heads

    def layer_k_eq_v(self, i: int) -> bool:
        return self.k_eq_v_global and self.is_global(i)

    def is_kv_shared(self, i: int) -> bool:
        return self.num_kv_shared_layers > 0 and i >= self.first_kv_shared_layer

    @functools.cached_property
    def kv_source(self) -> tuple[int, ...]:
        """Layer whose K/V layer i attends to: itself, or for KV-shared layers the last non-shared
        layer of the same type (reference §1.1 "KV sharing")."""
        first = self.first_kv_shared_layer
        last_of_type = {t: max(j for j in range(first) if self.layer_types[j] == t) for t in set(self.layer_types[:first])}
        return tuple(last_of_type[t] if self.is_kv_shared(i) else i for i, t in enumerate(self.layer_types))

    def layer_ffn_dim(self, i: int) -> int:
        wide = self.double_wide_shared_mlp and self.is_kv_shared(i)
        return self.ffn_dim * (2 if wide else 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(fields)}")
        d = dict(d)
        d["layer_types"] = tuple(d["layer_types"])
        return cls(**d)


def interleave(num_layers: int, period: int) -> tuple[LayerType, ...]:
    """`period-1` sliding layers then one global, repeated; the last layer is global."""
    types = ["global" if (i + 1) % period == 0 else "sliding" for i in range(num_layers)]
    types[-1] = "global"
    return tuple(types)


_V = 262_144

E2B = ModelConfig(
    name="e2b", vocab_size=_V, d_model=1536, layer_types=interleave(35, 5), num_heads=8,
    num_kv_heads=1, num_global_kv_heads=1, ffn_dim=6144, sliding_window=512, ple_dim=256,
    num_kv_shared_layers=20, double_wide_shared_mlp=True)
E4B = ModelConfig(
    name="e4b", vocab_size=_V, d_model=2560, layer_types=interleave(42, 6), num_heads=8,
    num_kv_heads=2, num_global_kv_heads=2, ffn_dim=10240, sliding_window=512, ple_dim=256,
    num_kv_shared_layers=18)
G12B = ModelConfig(
    name="12b", vocab_size=_V, d_model=3840, layer_types=interleave(48, 6), num_heads=16,
    num_kv_heads=8, num_global_kv_heads=1, ffn_dim=15360, sliding_window=1024, k_eq_v_global=True,
    max_position=262_144)
G26B_A4B = ModelConfig(
    name="26b-a4b", vocab_size=_V, d_model=2816, layer_types=interleave(30, 6), num_heads=16,
    num_kv_heads=8, num_global_kv_heads=2, ffn_dim=2112, sliding_window=1024, k_eq_v_global=True,
    num_experts=128, top_k_experts=8, expert_ffn_dim=704, max_position=262_144)
G31B = ModelConfig(
    name="31b", vocab_size=_V, d_model=5376, layer_types=interleave(60, 6), num_heads=32,
    num_kv_heads=16, num_global_kv_heads=4, ffn_dim=21504, sliding_window=1024, k_eq_v_global=True,
    max_position=262_144)

# bench-1b (shared/bench/README.md): the dense Gemma-4-shaped ~1.7B config used for benchmarks.
BENCH_1B = ModelConfig(
    name="bench-1b", vocab_size=_V, d_model=2048, layer_types=interleave(18, 6), num_heads=8,
    num_kv_heads=4, num_global_kv_heads=1, ffn_dim=8192, sliding_window=1024, k_eq_v_global=True)

# fid-e2b (benchmarks/fidelity.py): an E2B-shaped teacher big enough for Q4_0 to hurt and small enough to
# train from scratch in minutes on one GPU: PLE, KV sharing and the double-wide shared MLPs of E2B.
FID_E2B = dataclasses.replace(
    E2B, name="fid-e2b", vocab_size=8192, d_model=768, layer_types=interleave(12, 4), num_heads=6, head_dim=128,
    global_head_dim=256, ffn_dim=3072, ple_dim=128, num_kv_shared_layers=4, sliding_window=512, max_position=4096)


def _tiny(base: ModelConfig, **kw) -> ModelConfig:
    """Small dims, same structural features. Head dims stay multiples of 32 (Q4_0 blocks) and the
    global head dim stays 2× the local one; windows are short so tests cross them."""
    small = dict(name=f"tiny-{base.name}", vocab_size=512, d_model=64, num_heads=4, head_dim=32,
               global_head_dim=64, sliding_window=8, max_position=4096)
    small.update(kw)
    return dataclasses.replace(base, **small)


# Tiny E-types keep the last two non-shared layers [sliding, global] (llama.cpp assumes it).
TINY_E2B = _tiny(E2B, layer_types=interleave(8, 4), num_kv_heads=1, num_global_kv_heads=1, ffn_dim=128,
                 ple_dim=32, num_kv_shared_layers=4)
TINY_E4B = _tiny(E4B, layer_types=interleave(8, 4), num_kv_heads=2, num_global_kv_heads=2, ffn_dim=128,
                 ple_dim=32, num_kv_shared_layers=4)
TINY_12B = _tiny(G12B, layer_types=interleave(6, 3), num_kv_heads=2, num_global_kv_heads=1, ffn_dim=128)
TINY_26B_A4B = _tiny(G26B_A4B, layer_types=interleave(6, 3), num_kv_heads=2, num_global_kv_heads=1,
                     ffn_dim=64, num_experts=8, top_k_experts=2, expert_ffn_dim=32)
TINY_31B = _tiny(G31B, layer_types=interleave(6, 3), num_kv_heads=2, num_global_kv_heads=1, ffn_dim=128)

VARIANTS: dict[str, ModelConfig] = {
    c.name: c for c in (E2B, E4B, G12B, G26B_A4B, G31B, BENCH_1B, FID_E2B,
                        TINY_E2B, TINY_E4B, TINY_12B, TINY_26B_A4B, TINY_31B)
}


def get_config(name: str) -> ModelConfig:
    try:
        return VARIANTS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(VARIANTS)}") from None
