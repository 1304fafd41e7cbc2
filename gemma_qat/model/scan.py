"""Scan over the repeating layer pattern: the compiler sees one period of layers per group instead of
every layer, so the layer bodies stop growing with depth (what still grows is per parameter leaf: the
optimizer update, the stacking; launch/README.md measures it), while the parameter tree stays the official
per-layer one (`layer_3/attn/q_einsum/w`), which official checkpoints, the optimizer state, checkpoints
and exports all keep.

Gemma 4 is not one layer repeated: a period of sliding layers closes with a global one, the KV-shared
tail attends to two source layers' K/V (and in E2B has double-wide MLPs), and a quantization recipe may
treat layers by index (mobile: int2 back-layer MLPs, per-layer static activation scales). So a group is
a run of windows of `period` consecutive layers whose signatures are equal: layer type, KV sharing, FFN
width, whether later layers read its K/V (a source's K/V must leave the loop, so sources stay unrolled)
and the quantization policy's own key for the layer (`layer_key`, formats and frozen scales). Layers in
no such run stay unrolled. Inside a group the windows' parameters are stacked along a new leading axis
for `lax.scan` at each call (a copy of those weights per step: the cost of keeping the official tree,
measured in launch/README.md), and the per-layer PLE inputs ride along as the scanned inputs.
"""

from __future__ import annotations

from typing import NamedTuple

from gemma_qat.model.config import ModelConfig


class Group(NamedTuple):
    """Layers start .. start + period·repeats - 1, run as `repeats` windows of `period` layers (an unrolled
    layer is a group of period 1, repeats 1)."""

    start: int
    period: int
    repeats: int

    @property
    def stop(self) -> int:
        return self.start + self.period * self.repeats

    def layers(self, window: int) -> range:
        s = self.start + window * self.period
        return range(s, s + self.period)


def pattern_period(cfg: ModelConfig) -> int:
    """Layers per sliding/global period: the first global layer's index + 1 (the last layer is global)."""
    return cfg.layer_types.index("global") + 1


def kv_sources(cfg: ModelConfig) -> set[int]:
    """Layers whose K/V another layer reads."""
    return {s for i, s in enumerate(cfg.kv_source) if s != i}


def layer_groups(cfg: ModelConfig, layer_key=None) -> list[Group]:
    """The layers split into scanned groups and unrolled layers, in order. `layer_key(i)`: the
    quantization policy's hashable view of layer i (None: every layer alike)."""
    sources = kv_sources(cfg)
    sig = [(cfg.layer_types[i], cfg.is_kv_shared(i), cfg.layer_ffn_dim(i), i in sources,
            None if layer_key is None else layer_key(i)) for i in range(cfg.num_layers)]
    p, n = pattern_period(cfg), cfg.num_layers
    groups, i = [], 0
    while i < n:
        r = 1
        while i + (r + 1) * p <= n and sig[i + r * p: i + (r + 1) * p] == sig[i: i + p]:
            r += 1
        if r >= 2:
            groups.append(Group(i, p, r))
            i += p * r
        else:
            groups.append(Group(i, 1, 1))
            i += 1
    return groups
