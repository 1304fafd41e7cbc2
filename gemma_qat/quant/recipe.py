"""Quantization recipes: ordered regex rules from parameter path to weight format.

A recipe is resolved against a model's (abstract) parameter tree before use: every parameter must be
decided by some rule (a format name, or `float` to keep it), and a rule that matches nothing is
reported. Presets: `q4_0` (every projection, experts included, in llama.cpp Q4_0; embeddings, norms,
router and scalars float) and `mobile` (`mobile-e2b` / `mobile-e4b`): per-channel int2/int4/int8 by
layer group with int8 static activations; see FORMATS.md for which parts are known and which are ours.
"""

from __future__ import annotations

import dataclasses
import re

from gemma_qat.model.config import ModelConfig
from gemma_qat.model.params import abstract_params, flat_shapes
from gemma_qat.quant.formats import FORMATS, Q4_0_BLOCK_SIZE

FLOAT = "float"


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str  # full-match regex over paths like 'layer_3/attn/q_einsum/w'
    format: str  # a key of formats.FORMATS, or 'float'
    optional: bool = False  # may match nothing on some variants (e.g. PLE rules on dense models)

    def __post_init__(self):
        if self.format != FLOAT and self.format not in FORMATS:
            raise ValueError(f"rule {self.pattern!r}: unknown format {self.format!r}; "
                             f"choose from {sorted(FORMATS) + [FLOAT]}")
        re.compile(self.pattern)


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    activations: str = "none"  # 'none' or 'int8_static' (per-tensor static scales around quantized linears)

    def to_dict(self) -> dict:
        return {"name": self.name, "activations": self.activations,
                "rules": [dataclasses.asdict(r) for r in self.rules]}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls(d["name"], tuple(Rule(**r) for r in d["rules"]), d.get("activations", "none"))


@dataclasses.dataclass(frozen=True)
class Resolution:
    """A recipe applied to one model: the format of every parameter path."""

    recipe: Recipe
    formats: dict[str, str]  # path → format name or 'float'
    unmatched_rules: tuple[str, ...]

    def quantized(self) -> dict[str, str]:
        return {k: v for k, v in self.formats.items() if v != FLOAT}

    def report(self) -> str:
        counts: dict[str, int] = {}
        for f in self.formats.values():
            counts[f] = counts.get(f, 0) + 1
        lines = [f"recipe {self.recipe.name}: " + ", ".join(f"{n} params {f}" for f, n in sorted(counts.items()))]
        lines += [f"  rule matched nothing: {p}" for p in self.unmatched_rules]
        return "\n".join(lines)


# Parameters no recipe should quantize by accident: norms, scalars and the MoE router.
_KEEP_FLOAT = (
    Rule(r".*/scale", FLOAT),
    Rule(r"layer_\d+/skip_scale", FLOAT),
    Rule(r"layer_\d+/mlp/(router_logits/w|router_scale|per_expert_scale)", FLOAT, optional=True),
)
_ATTN = r"layer_\d+/attn/(q_einsum|kv_einsum|k_einsum|attn_vec_einsum)/w"
_PLE_LAYER = r"layer_\d+/per_layer_(input_gate|projection)/w"


def q4_0_recipe() -> Recipe:
    return Recipe("q4_0", (
        *_KEEP_FLOAT,
        Rule(_ATTN, "q4_0"),
        Rule(r"layer_\d+/mlp2?/(gating_einsum|linear)/w", "q4_0"),
        Rule(_PLE_LAYER, "q4_0", optional=True),
        Rule(r"embedder/per_layer_model_projection/w", "q4_0", optional=True),
        Rule(r"embedder/(input_embedding|per_layer_embeddings)", FLOAT),
    ))


def _layers(lo: int, hi: int) -> str:
    return "layer_(" + "|".join(str(i) for i in range(lo, hi)) + ")"


def mobile_recipe(config: ModelConfig, name: str = "mobile") -> Recipe:
    """E2B's published mobile bit widths (reference §3.1): attention 4-bit, MLPs of the non-shared
    layers 4-bit and of the KV-shared (back) layers 2-bit, PLE gate/projection 8-bit, embeddings
    2-bit (PLE table 4-bit), PLE model projection float. The boundary = first KV-shared layer is a
    fact for E2B and our choice for E4B (unverified there)."""
    if not (config.ple_dim and config.num_kv_shared_layers):
        raise ValueError(f"the mobile recipe is defined for E-type models (PLE + KV sharing), not {config.name!r}")
    first = config.first_kv_shared_layer
    return Recipe(name, (
        *_KEEP_FLOAT,
        Rule(_ATTN, "int4"),
        Rule(_layers(0, first) + r"/mlp/(gating_einsum|linear)/w", "int4"),
        Rule(_layers(first, config.num_layers) + r"/mlp/(gating_einsum|linear)/w", "int2"),
        Rule(_PLE_LAYER, "int8"),
        Rule(r"embedder/per_layer_model_projection/w", FLOAT),
        Rule(r"embedder/input_embedding", "int2"),
        Rule(r"embedder/per_layer_embeddings", "int4"),
    ), activations="int8_static")


PRESETS = ("q4_0", "mobile", "mobile-e2b", "mobile-e4b")  # names get_recipe knows, any case


def get_recipe(name: str, config: ModelConfig) -> Recipe:
    name = name.lower()
    if name == "q4_0":
        return q4_0_recipe()
    if name in ("mobile", "mobile-e2b", "mobile-e4b"):
        if name != "mobile" and not config.name.endswith(name.split("-")[1]):
            raise ValueError(f"recipe {name!r} is for {name.split('-')[1].upper()}, the model is {config.name!r}; "
                             "use --recipe mobile for other E-type models")
        return mobile_recipe(config, name)
    raise ValueError(f"unknown recipe {name!r}; presets: {', '.join(PRESETS)}")


def resolve_recipe(name: str, config: ModelConfig, *, strict: bool = True) -> Resolution:
    """The preset `name` resolved against `config`: what every caller of a named recipe wants."""
    return resolve(get_recipe(name, config), config, strict=strict)


def resolve(recipe: Recipe, config: ModelConfig, *, strict: bool = True) -> Resolution:
    """First matching rule decides each parameter. Undecided parameters are an error; so is a
    non-optional rule that matches nothing when `strict` (the usual sign of a typo)."""
    shapes = flat_shapes(abstract_params(config))
    compiled = [(r, re.compile(r.pattern)) for r in recipe.rules]
    formats, used = {}, set()
    for path, shape in shapes.items():
        for i, (rule, rx) in enumerate(compiled):
            if rx.fullmatch(path):
                formats[path] = rule.format
                used.add(i)
                break
    undecided = sorted(set(shapes) - set(formats))
    if undecided:
        raise ValueError(f"recipe {recipe.name!r} decides no format for {len(undecided)} parameters of "
                         f"{config.name!r}, e.g. {undecided[:5]}; add a rule (format 'float' keeps one as is)")
    unmatched = tuple(r.pattern for i, (r, _) in enumerate(compiled) if i not in used)
    if strict and (bad := [p for i, (r, _) in enumerate(compiled) if i not in used and not r.optional
                           for p in [r.pattern]]):
        raise ValueError(f"recipe {recipe.name!r}: rules match no parameter of {config.name!r}: {bad}")
    return Resolution(recipe, formats, unmatched)
