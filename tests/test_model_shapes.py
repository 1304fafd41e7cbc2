"""Full-size variants through jax.eval_shape (no memory): official counts and transformers' own."""

import pytest
import torch
import transformers

from gemma_qat.hf.layout import config_to_hf
from gemma_qat.model.config import VARIANTS, get_config
from gemma_qat.model.params import abstract_params, count_params

# Totals of the official text decoders (issue #2; 26B-A4B and 31B from the architecture's release).
OFFICIAL_TOTALS = {"31b": 30_697_345_280, "26b-a4b": 25_233_141_760}
FULL = ["e2b", "e4b", "12b", "26b-a4b", "31b"]


@pytest.mark.parametrize("name", sorted(OFFICIAL_TOTALS))
def test_official_totals(name):
    assert count_params(get_config(name))["total_params"] == OFFICIAL_TOTALS[name]


def test_bench_1b_matches_spec():
    # shared/bench/README.md: bench-1b has 1,685,221,888 parameters.
    assert count_params(get_config("bench-1b"))["total_params"] == 1_685_221_888


@pytest.mark.parametrize("name", FULL)
def test_counts_match_transformers_on_meta_device(name):
    cfg = get_config(name)
    hf_cfg = transformers.Gemma4TextConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.Gemma4ForCausalLM(hf_cfg)
    hf_total = sum(p.numel() for n, p in model.named_parameters() if n != "lm_head.weight")  # tied head
    counts = count_params(cfg)
    assert counts["total_params"] == hf_total
    assert counts["embedding_params"] == model.model.embed_tokens.weight.numel()
    if cfg.ple_dim:
        assert counts["per_layer_embedding_params"] == model.model.embed_tokens_per_layer.weight.numel()


def test_e2b_structure():
    cfg = get_config("e2b")
    assert [i for i, t in enumerate(cfg.layer_types) if t == "global"] == list(range(4, 35, 5))
    assert cfg.first_kv_shared_layer == 15
    assert cfg.kv_source[15:] == tuple(14 if cfg.is_global(i) else 13 for i in range(15, 35))
    shapes = abstract_params(cfg)
    assert shapes["layer_14"]["mlp"]["linear"]["w"].shape == (6144, 1536)
    assert shapes["layer_15"]["mlp"]["linear"]["w"].shape == (12288, 1536)  # double-wide
    assert "kv_einsum" not in shapes["layer_15"]["attn"]  # shared layers own no K/V
    assert shapes["embedder"]["per_layer_embeddings"].shape == (262_144, 35, 256)
    assert shapes["layer_4"]["attn"]["q_einsum"]["w"].shape == (8, 1536, 512)


def test_moe_active_params():
    counts = count_params(get_config("26b-a4b"))
    assert 3.7e9 < counts["active_params"] < 4.0e9  # "A4B": about 3.8B active


@pytest.mark.parametrize("name", [n for n in VARIANTS if n.startswith("tiny-")])
def test_tiny_siblings_keep_structure(name):
    tiny, full = get_config(name), get_config(name[len("tiny-"):])
    assert tiny.is_moe == full.is_moe
    assert bool(tiny.ple_dim) == bool(full.ple_dim)
    assert bool(tiny.num_kv_shared_layers) == bool(full.num_kv_shared_layers)
    assert tiny.double_wide_shared_mlp == full.double_wide_shared_mlp
    assert tiny.k_eq_v_global == full.k_eq_v_global
    assert (tiny.num_global_kv_heads != tiny.num_kv_heads) == (full.num_global_kv_heads != full.num_kv_heads)
    assert tiny.global_head_dim == 2 * tiny.head_dim


def test_config_validation_names_the_problem():
    import dataclasses
    with pytest.raises(ValueError, match="last layer must be 'global'"):
        dataclasses.replace(get_config("tiny-31b"), layer_types=("sliding",) * 6)
    with pytest.raises(ValueError, match="unknown model config keys \\['bogus'\\]"):
        type(get_config("e2b")).from_dict({**get_config("e2b").to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown model"):
        get_config("e3b")
