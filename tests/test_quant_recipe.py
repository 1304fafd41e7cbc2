"""Recipes and the fake-quant policy: coverage of every variant, exact equality of the fake-quant
forward pass with the dequantised-weights forward pass, sharding checks, PTQ and calibration."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_qat import sharding
from gemma_qat.model.config import get_config
from gemma_qat.model.params import abstract_params, flat_shapes, init_params, logical_axes
from gemma_qat.model.transformer import Transformer
from gemma_qat.quant.policy import RecipePolicy, calibrate, calibration_step, check_q4_0_blocks, weight_in_axes
from gemma_qat.quant.ptq import dequantized_params
from gemma_qat.quant.recipe import Recipe, Rule, get_recipe, resolve, resolve_recipe

FULL = ["e2b", "e4b", "12b", "26b-a4b", "31b"]


@pytest.mark.parametrize("name", FULL + ["tiny-e2b", "tiny-26b-a4b", "tiny-12b"])
def test_q4_0_preset_covers_every_projection(name):
    cfg = get_config(name)
    res = resolve_recipe("q4_0", cfg)
    axes = weight_in_axes(cfg)
    for path, shape in flat_shapes(abstract_params(cfg)).items():
        fmt = res.formats[path]
        projection = path.endswith("/w") and "router" not in path
        assert (fmt == "q4_0") == projection, path
        if fmt == "q4_0":  # every block axis is a multiple of 32 at full size
            assert shape[axes[path][-1]] % 32 == 0, path


@pytest.mark.parametrize("name,boundary", [("e2b", 15), ("e4b", 24), ("tiny-e2b", 4)])
def test_mobile_preset(name, boundary):
    cfg = get_config(name)
    f = resolve_recipe("mobile", cfg).formats
    assert f["embedder/input_embedding"] == "int2"
    assert f["embedder/per_layer_model_projection/w"] == "float"
    assert f[f"layer_{boundary - 1}/mlp/linear/w"] == "int4"
    assert f[f"layer_{boundary}/mlp/gating_einsum/w"] == "int2"
    assert f["layer_0/attn/q_einsum/w"] == "int4"
    assert f["layer_0/per_layer_input_gate/w"] == "int8"
    assert f["layer_0/pre_attention_norm/scale"] == "float"


def test_recipe_errors_are_reported():
    cfg = get_config("tiny-31b")
    with pytest.raises(ValueError, match="decides no format for"):
        resolve(Recipe("partial", (Rule(r".*/scale", "float"),)), cfg)
    typo = Recipe("typo", get_recipe("q4_0", cfg).rules + (Rule(r"layer_\d+/atn/q/w", "q4_0"),))
    with pytest.raises(ValueError, match="rules match no parameter"):
        resolve(typo, cfg)
    assert "atn" in resolve(typo, cfg, strict=False).report()
    with pytest.raises(ValueError, match="unknown format"):
        Rule(".*", "int3")
    with pytest.raises(ValueError, match="E-type"):
        get_recipe("mobile", cfg)


@pytest.mark.parametrize("name,recipe", [("tiny-e2b", "q4_0"), ("tiny-31b", "q4_0"),
                                         ("tiny-26b-a4b", "q4_0"), ("tiny-e2b", "mobile")])
def test_fake_quant_forward_equals_dequantised_weights(name, recipe):
    cfg = get_config(name)
    params = init_params(cfg, jax.random.PRNGKey(0))
    res = resolve_recipe(recipe, cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 20), 0, cfg.vocab_size)
    fq = Transformer(cfg, quant=RecipePolicy(res)).apply({"params": params}, tokens)
    deq = Transformer(cfg).apply({"params": dequantized_params(cfg, params, res)}, tokens)
    float_ = Transformer(cfg).apply({"params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(fq), np.asarray(deq))
    assert float(jnp.abs(fq - float_).max()) > 1e-3  # quantization really happened


def test_student_tree_equals_float_tree_and_grads_are_straight_through():
    cfg = get_config("tiny-e2b")
    res = resolve_recipe("q4_0", cfg)
    model = Transformer(cfg, quant=RecipePolicy(res))
    tokens = jnp.arange(16)[None] % cfg.vocab_size
    student = model.init(jax.random.PRNGKey(0), tokens)
    assert set(student) == {"params"}
    assert jax.tree.structure(student["params"]) == jax.tree.structure(
        Transformer(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    params = init_params(cfg, jax.random.PRNGKey(0))
    g = jax.grad(lambda p: model.apply({"params": p}, tokens).sum())(params)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))
    assert float(jnp.abs(g["layer_0"]["attn"]["q_einsum"]["w"]).sum()) > 0


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_q4_0_block_straddle_is_refused():
    cfg = get_config("tiny-31b")  # d_model 64: 2 shards keep blocks whole, 4 would split them
    res = resolve_recipe("q4_0", cfg)
    ok = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
    check_q4_0_blocks(res, cfg, sharding.tree_shardings(abstract_params(cfg), logical_axes(cfg), ok, "fsdp"))
    bad = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    with pytest.raises(ValueError, match="split Q4_0 blocks"):
        check_q4_0_blocks(res, cfg, sharding.tree_shardings(abstract_params(cfg), logical_axes(cfg), bad, "fsdp"))


def test_calibrated_activation_scales_change_the_output():
    cfg = get_config("tiny-e2b")
    params = init_params(cfg, jax.random.PRNGKey(0))
    res = resolve_recipe("mobile", cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    scales = calibrate(cfg, params, res, [{"tokens": tokens}])
    leaves = jax.tree.leaves(scales)
    assert leaves and all(float(s) > 0 for s in leaves)
    model = Transformer(cfg, quant=RecipePolicy(res))
    weights_only = model.apply({"params": params}, tokens)  # uncalibrated scales are pass-through
    with_acts = model.apply({"params": params, "quant_scales": scales}, tokens)
    assert float(jnp.abs(with_acts - weights_only).max()) > 0
    np.testing.assert_array_equal(np.asarray(weights_only), np.asarray(
        Transformer(cfg).apply({"params": dequantized_params(cfg, params, res)}, tokens)))


@pytest.mark.parametrize("name,recipe", [("tiny-31b", "q4_0")])  # int formats: tests/test_quant_aqt.py
def test_aqt_backend_gives_the_same_student(name, recipe):
    """The policy through AQT (aqt_backend) and through formats.py: same logits, same gradients."""
    cfg = get_config(name)
    params = init_params(cfg, jax.random.PRNGKey(0))
    res = resolve_recipe(recipe, cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)

    def run(backend):
        model = Transformer(cfg, quant=RecipePolicy(res, backend=backend))
        f = lambda p: model.apply({"params": p}, tokens)
        return jax.jit(f)(params), jax.jit(jax.grad(lambda p: f(p).sum()))(params)

    (out_f, g_f), (out_a, g_a) = run("formats"), run("aqt")
    np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_f))
    for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_f)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_calibration_takes_the_weights_as_arguments():
    # Closed-over weights become constants of the program, and XLA constant-folds their fake-quant:
    # minutes of compile at 155M parameters. The lowered program must carry no weight-sized constant.
    cfg = get_config("tiny-e2b")
    params = init_params(cfg, jax.random.PRNGKey(0))
    step = calibration_step(cfg, resolve_recipe("mobile", cfg))
    text = step.lower(params, None, {"tokens": jnp.zeros((1, 8), jnp.int32)}).as_text()
    smallest_weight = min(int(np.prod(w.shape)) for w in jax.tree.leaves(params) if w.ndim >= 2)
    sizes = [int(np.prod([int(d) for d in m.split("x")[:-1]] or [1]))
             for m in re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<([0-9x]+[a-z0-9]+)>", text)]
    assert sizes and max(sizes) < smallest_weight, (max(sizes), smallest_weight)
