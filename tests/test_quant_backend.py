"""`quant.backend` (auto | formats | aqt) chooses who computes the fake-quant in training, preflight, PTQ
and eval; both give the same bits (quant/AQT.md), so runs, checkpoints and exports do not depend on it,
and `auto` picks by speed alone (quant/policy.py choose_backend)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gemma_qat.model.config import get_config
from gemma_qat.model.params import init_params
from gemma_qat.quant.policy import RecipePolicy, choose_backend
from gemma_qat.quant.ptq import dequantized_params
from gemma_qat.quant.recipe import resolve_recipe
from gemma_qat.train.config import load_run_config
from gemma_qat.train.loop import train
from train_helpers import base_config

pytest.importorskip("aqt.jax.v2")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ValueError, match=r"quant.backend='qwix' must be one of \['auto', 'formats', 'aqt'\]"):
        load_run_config(None, ["quant.backend=qwix"])


@pytest.mark.parametrize("model,recipe,picked", [
    ("tiny-e2b", "q4_0", "formats"), ("tiny-26b-a4b", "q4_0", "formats"), ("tiny-e2b", "mobile", "aqt"),
])
def test_auto_picks_formats_for_q4_0_and_aqt_otherwise(model, recipe, picked):
    """The measured rule (BENCHMARKS.md): Q4_0 keeps formats.py and its one-pass GPU kernel; recipes
    without Q4_0 weights run through AQT. It is the default everywhere a backend is chosen."""
    res = resolve_recipe(recipe, get_config(model))
    assert choose_backend("auto", res) == picked
    assert RecipePolicy(res).backend == picked
    assert load_run_config(None, []).quant.backend == "auto"
    for explicit in ("formats", "aqt"):  # an explicit choice is kept
        assert RecipePolicy(res, backend=explicit).backend == explicit
    with pytest.raises(ValueError, match="unknown quantization backend 'qwix'"):
        choose_backend("qwix", res)


@pytest.mark.parametrize("recipe", ["q4_0", "mobile"])
def test_ptq_is_byte_identical_across_backends(recipe):
    config = get_config("tiny-e2b")
    params = init_params(config, jax.random.PRNGKey(0))
    res = resolve_recipe(recipe, config)
    a, b, c = (dequantized_params(config, params, res, backend) for backend in ("formats", "aqt", "auto"))
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))


@pytest.mark.parametrize("model,recipe,devices,mesh", [  # each with the online teacher (base_config)
    ("tiny-e2b", "mobile", 1, []),
    ("tiny-e2b", "q4_0", 8, ["mesh.data=4", "mesh.fsdp=2"]),  # fsdp 2: D = 64 holds two whole Q4_0 blocks
    ("tiny-26b-a4b", "q4_0", 8, ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2", "mesh.parallelism=fsdp_tp_ep"]),
])
def test_training_is_bit_identical_across_backends(tmp_path, model, recipe, devices, mesh):
    runs = {}
    for backend in ("formats", "aqt"):
        cfg = base_config(tmp_path / backend, f"quant.recipe={recipe}", f"quant.backend={backend}",
                          "quant.q4_0_impl=xla", "optimizer.total_steps=3", "checkpoint.every_steps=3", *mesh,
                          model=model)
        runs[backend] = train(cfg, devices=jax.devices()[:devices], print_fn=lambda s: None)
    assert runs["formats"].losses == runs["aqt"].losses
    for x, y in zip(jax.tree.leaves(runs["formats"].state.params), jax.tree.leaves(runs["aqt"].state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
