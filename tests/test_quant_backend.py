"""`quant.backend` (formats | aqt) chooses who computes the fake-quant in training, preflight, PTQ and
eval; both give the same bits (quant/AQT.md), so runs, checkpoints and exports do not depend on it."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gemma_qat.model.config import get_config
from gemma_qat.model.params import init_params
from gemma_qat.quant.ptq import dequantized_params
from gemma_qat.quant.recipe import resolve_recipe
from gemma_qat.train.config import load_run_config
from gemma_qat.train.loop import train
from train_helpers import base_config

pytest.importorskip("aqt.jax.v2")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ValueError, match=r"quant.backend='qwix' must be one of \['formats', 'aqt'\]"):
        load_run_config(None, ["quant.backend=qwix"])


@pytest.mark.parametrize("recipe", ["q4_0", "mobile"])
def test_ptq_is_byte_identical_across_backends(recipe):
    config = get_config("tiny-e2b")
    params = init_params(config, jax.random.PRNGKey(0))
    res = resolve_recipe(recipe, config)
    a, b = (dequantized_params(config, params, res, backend) for backend in ("formats", "aqt"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("model,recipe,devices,mesh", [
    ("tiny-e2b", "mobile", 1, []),
    ("tiny-26b-a4b", "q4_0", 4, ["mesh.fsdp=2", "mesh.expert=2", "mesh.parallelism=fsdp_tp_ep"]),
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
