"""`scan_layers` runs the repeating layer pattern under lax.scan and changes no number: logits and the QAT
student's gradients equal the unrolled model's, for PLE + KV sharing + double-wide MLPs (E2B-shaped), MoE,
and sharded over 8 fake devices; the parameter tree stays per layer."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_qat import sharding
from gemma_qat.model import scan
from gemma_qat.model.config import get_config, interleave
from gemma_qat.model.params import abstract_params, init_params, logical_axes
from gemma_qat.model.transformer import Transformer
from gemma_qat.quant.policy import SCALES, RecipePolicy, placeholder_scales
from gemma_qat.quant.recipe import resolve_recipe

# 12 layers of period 2, the last 4 KV-shared: three scanned windows, the source window unrolled, two
# scanned shared (double-wide) windows.
DEEP_E2B = dataclasses.replace(get_config("tiny-e2b"), name="tiny-e2b-12l", layer_types=interleave(12, 2),
                               num_kv_shared_layers=4)


def test_groups_cover_every_layer_once_and_keep_kv_sources_unrolled():
    for cfg in (DEEP_E2B, get_config("e2b"), get_config("e4b"), get_config("31b"), get_config("26b-a4b")):
        groups = scan.layer_groups(cfg)
        covered = [i for g in groups for w in range(g.repeats) for i in g.layers(w)]
        assert covered == list(range(cfg.num_layers)), cfg.name
        for g in groups:
            if g.repeats > 1:
                assert not scan.kv_sources(cfg) & set(range(g.start, g.stop))
                for w in range(1, g.repeats):  # every window has the first window's structure
                    for a, b in zip(g.layers(0), g.layers(w)):
                        assert (cfg.layer_types[a], cfg.is_kv_shared(a), cfg.layer_ffn_dim(a)) == \
                               (cfg.layer_types[b], cfg.is_kv_shared(b), cfg.layer_ffn_dim(b))
    assert scan.layer_groups(DEEP_E2B) == [scan.Group(0, 2, 3), scan.Group(6, 1, 1), scan.Group(7, 1, 1),
                                           scan.Group(8, 2, 2)]
    assert scan.layer_groups(get_config("31b")) == [scan.Group(0, 6, 10)]


def _distinct_scales(cfg, resolution):
    """Frozen activation scales, a different value for every activation of every layer."""
    flat = flax.traverse_util.flatten_dict(placeholder_scales(cfg, resolution))
    return flax.traverse_util.unflatten_dict({k: 0.01 + 0.001 * n for n, k in enumerate(sorted(flat))})


def test_recipes_split_groups_by_format_and_frozen_scales_ride_along():
    cfg = DEEP_E2B
    q4 = RecipePolicy(resolve_recipe("q4_0", cfg))
    assert scan.layer_groups(cfg, q4.layer_key) == scan.layer_groups(cfg)
    # mobile: int2 back-layer MLPs split windows by format; the per-layer scale values do not.
    mobile = resolve_recipe("mobile", cfg)
    policy = RecipePolicy(mobile, static_scales=_distinct_scales(cfg, mobile))
    groups = scan.layer_groups(cfg, policy.layer_key)
    assert any(g.repeats > 1 for g in groups)
    for g in groups:
        for w in range(1, g.repeats):
            for a, b in zip(g.layers(0), g.layers(w)):
                assert policy.layer_key(a) == policy.layer_key(b)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, cfg.vocab_size)
    ref, out = (jax.jit(lambda p: Transformer(cfg, quant=policy, scan_layers=s).apply({"params": p}, tokens))(params)
                for s in (False, True))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def _loss_and_grad(cfg, params, tokens, **kw):
    model = Transformer(cfg, quant=RecipePolicy(resolve_recipe("q4_0", cfg)), **kw)

    def loss(p):
        logits = model.apply({"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("name,remat", [("tiny-e2b-12l", "full"), ("tiny-26b-a4b", "none"),
                                        ("tiny-31b", "weights")])
def test_scanned_student_gives_the_unrolled_loss_and_gradients(name, remat):
    cfg = DEEP_E2B if name == DEEP_E2B.name else get_config(name)
    assert any(g.repeats > 1 for g in scan.layer_groups(cfg))
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, cfg.vocab_size)
    ref_loss, ref_grad = _loss_and_grad(cfg, params, tokens, remat=remat)
    loss, grad = _loss_and_grad(cfg, params, tokens, remat=remat, scan_layers=True)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert jax.tree.structure(grad) == jax.tree.structure(ref_grad)  # the per-layer tree, unchanged
    # Equal up to fp32 reassociation (the loop body fuses differently): a few elements of a sum over
    # many paths (the tied embedding, a skip scale summed over every position) move by ~1e-4 of the tensor's scale.
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree.leaves(ref_grad)):
        r = np.asarray(r)
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-4, atol=1e-3 * np.abs(r).max() + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_scan_is_traced_once_per_group():
    """The point of the scan: the compiler sees one window per group, not every layer."""
    cfg = get_config("tiny-31b")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    text = lambda **kw: jax.jit(lambda p: Transformer(cfg, **kw).apply({"params": p}, tokens)).lower(params).as_text()
    unrolled, scanned = text(), text(scan_layers=True)
    assert "while" in scanned and "while" not in unrolled
    # Six layers unrolled, one window of three in the loop body: half the attention softmaxes.
    assert scanned.count("exponential") < unrolled.count("exponential")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_scanned_sharded_logits_equal_unsharded():
    cfg, mesh_config = DEEP_E2B, sharding.MeshConfig(data=2, fsdp=2, tensor=2, parallelism="fsdp_tp")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 20), 0, cfg.vocab_size)
    ref = Transformer(cfg).apply({"params": params}, tokens)
    mesh = sharding.make_mesh(mesh_config)
    shardings = sharding.tree_shardings(abstract_params(cfg), logical_axes(cfg), mesh, mesh_config.parallelism)
    params_s = jax.device_put(params, shardings)
    tokens_s = jax.device_put(tokens, sharding.batch_sharding(mesh, mesh_config.parallelism))
    model = Transformer(cfg, scan_layers=True, remat="full")
    with sharding.activate(mesh, mesh_config.parallelism):
        out = jax.jit(lambda p, t: model.apply({"params": p}, t))(params_s, tokens_s)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=5e-5)


def test_calibration_of_activation_scales_runs_unrolled_and_records_every_layer():
    """A call that writes a collection (calibrating static scales) never takes the scan: its scales equal the
    unrolled model's, layer by layer."""
    cfg = DEEP_E2B
    policy = RecipePolicy(resolve_recipe("mobile", cfg), calibrating=True)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    scales = [Transformer(cfg, quant=policy, scan_layers=s).apply({"params": params}, tokens, mutable=[SCALES])[1]
              for s in (False, True)]
    assert len(jax.tree.leaves(scales[0])) > cfg.num_layers
    for a, b in zip(jax.tree.leaves(scales[0]), jax.tree.leaves(scales[1])):
        assert float(a) == float(b) > 0
