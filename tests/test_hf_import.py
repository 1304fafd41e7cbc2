"""HF import: logits parity with transformers for each structural kind, and clear errors."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma_qat.hf.importer import load_hf
from gemma_qat.model.checkpoint import CheckpointMeta, load_model, save_model
from gemma_qat.model.inference import forward_logits
from hf_fixtures import hf_logits, save_multimodal_model, save_text_model

T = 24  # longer than the tiny sliding window (8), so sliding masks and KV sharing are exercised


def _rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("kind,shard", [("e", None), ("dense", "150KB"), ("moe", None)])
def test_logits_match_transformers(tmp_path, kind, shard):
    model = save_text_model(kind, tmp_path / "hf", seed=3, max_shard_size=shard)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    tokens = np.random.default_rng(0).integers(0, 512, T).tolist()
    ref = hf_logits(model, [tokens])[0].numpy()
    config, params = load_hf(tmp_path / "hf")
    ours = forward_logits(config, params, tokens)
    assert ours.shape == (T, 512)
    assert _rel_err(ours, ref) <= 1e-4


def test_multimodal_checkpoint_skips_towers(tmp_path):
    model = save_multimodal_model("e", tmp_path / "hf", seed=1)
    names = load_file(tmp_path / "hf" / "model.safetensors").keys()
    assert any(n.startswith("model.vision_tower.") for n in names)
    tokens = list(range(5, 5 + T))
    ref = hf_logits(model, [tokens])[0].numpy()
    config, params = load_hf(tmp_path / "hf")
    assert _rel_err(forward_logits(config, params, tokens), ref) <= 1e-4


def test_orbax_round_trip_is_exact(tmp_path):
    save_text_model("dense", tmp_path / "hf")
    config, params = load_hf(tmp_path / "hf")
    save_model(tmp_path / "ck", params, config, meta=CheckpointMeta(param_dtype="float32"))
    config2, params2 = load_model(tmp_path / "ck")
    assert config2 == config
    for a, b in zip(__import__("jax").tree.leaves(params), __import__("jax").tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _corrupt(tmp_path, edit):
    save_text_model("dense", tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)
    return tmp_path / "hf"


def test_missing_tensor_is_named(tmp_path):
    d = _corrupt(tmp_path, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2.self_attn.k_proj.weight'\]"):
        load_hf(d)


def test_unexpected_tensor_is_named(tmp_path):
    d = _corrupt(tmp_path, lambda t: t.update({"model.layers.0.self_attn.bogus.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected tensors.*bogus"):
        load_hf(d)


def test_wrong_shape_is_named(tmp_path):
    d = _corrupt(tmp_path, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(128, 63)}))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight has shape \(128, 63\)"):
        load_hf(d)


def test_wrong_dtype_is_named(tmp_path):
    d = _corrupt(tmp_path, lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int8)}))
    with pytest.raises(ValueError, match="model.norm.weight has dtype int8"):
        load_hf(d)


def test_missing_config_and_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    save_text_model("dense", tmp_path / "hf", max_shard_size="150KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "hf" / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        load_hf(tmp_path / "hf")
