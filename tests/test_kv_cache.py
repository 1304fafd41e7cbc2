"""KV-cache decoding against the full forward: prefill, token-by-token decoding past the sliding
window (with left padding and explicit positions), greedy generation against full recomputation, and
a quantized policy. Configs cover PLE + KV sharing (tiny-e2b), K=V with global kv heads (tiny-31b)
and MoE (tiny-26b-a4b)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_qat.eval import candidates as C
from gemma_qat.eval.generate import generate
from gemma_qat.model.config import get_config
from gemma_qat.model.transformer import KVCache, Transformer, init_cache
from gemma_qat.quant.policy import RecipePolicy
from gemma_qat.quant.recipe import resolve_recipe
from model_fixtures import calm_weights, to_params

MODELS = ["tiny-e2b", "tiny-31b", "tiny-26b-a4b"]
T, PAD = 13, 3  # T > sliding window (8); row 1 is left-padded by PAD tokens (segment 0)
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _params(name: str):
    """Calm random weights (tests/model_fixtures.py) with embedding tables N(0, 0.05²): scales at
    which greedy decoding of these tiny models does not just repeat one token (which would make
    the generation test weak)."""
    cfg, flat = calm_weights(name, embed_std=0.05, embed_tables=("input_embedding", "per_layer_embeddings"))
    return cfg, to_params(flat)


@functools.lru_cache(maxsize=None)
def _fns(model: Transformer):
    """Jitted full forward and cached forward of one module (shared by the tests: fewer compiles)."""
    full = jax.jit(lambda v, tok, pos, seg: model.apply(v, tok, pos, seg))
    cached = jax.jit(lambda v, tok, pos, seg, cache: model.apply(v, tok, pos, seg, cache=cache))
    return full, cached


def _batch(cfg):
    """[2, T] tokens, positions, segment ids: row 0 a plain sequence, row 1 left-padded."""
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, T)).astype(np.int32)
    idx = np.arange(T)
    positions = np.stack([idx, np.maximum(idx - PAD, 0)]).astype(np.int32)
    segments = np.stack([np.ones(T), idx >= PAD]).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)


def _check_decoding(model, variables, cfg, *, prefill=True):
    """(1) prefill of the whole batch and (2) token-by-token decoding both equal the full forward."""
    full, cached = _fns(model)
    tokens, positions, segments = _batch(cfg)
    want = np.asarray(full(variables, tokens, positions, segments))  # [2, T, V]
    cache = init_cache(cfg, 2, T + 3)  # spare slots stay empty and masked

    if prefill:
        got, filled = cached(variables, tokens, positions, segments, cache)
        np.testing.assert_allclose(np.asarray(got), want, **TOL)
        assert int(filled.length) == T

    steps = []
    for i in range(T):  # the window slides past its first 8 tokens from step 8 on
        z, cache = cached(variables, tokens[:, i:i + 1], positions[:, i:i + 1], segments[:, i:i + 1], cache)
        steps.append(np.asarray(z))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), want, **TOL)
    assert int(cache.length) == T
    # the token-by-token cache holds the same K/V as the one-shot prefill
    for name, (k, v) in (filled.layers.items() if prefill else ()):
        np.testing.assert_allclose(np.asarray(cache.layers[name][0]), np.asarray(k), **TOL)
        np.testing.assert_allclose(np.asarray(cache.layers[name][1]), np.asarray(v), **TOL)
    return want


@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_equals_full_forward(name):
    cfg, p = _params(name)
    _check_decoding(Transformer(cfg), {"params": p}, cfg)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_equals_full_recomputation(name):
    cfg, p = _params(name)
    prompt = [2, 100, 200, 300, 400, 500, 50, 150, 250]  # longer than the sliding window (8)
    got = generate(C.jax_candidate("t", "float", "mem", cfg, p), prompt, max_new_tokens=T - len(prompt))
    # Reference: the full forward over a fixed [2, T] buffer (the shape the decoding test compiled),
    # reading the logits at the last filled position (causality makes the zero tail irrelevant).
    full, _ = _fns(Transformer(cfg))
    buf = np.zeros((2, T), np.int32)
    buf[:, :len(prompt)] = prompt
    pos, seg = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T)), jnp.ones((2, T), jnp.int32)
    for cur in range(len(prompt), T):
        buf[:, cur] = int(np.argmax(np.asarray(full({"params": p}, jnp.asarray(buf), pos, seg))[0, cur - 1]))
    assert got == buf[0, len(prompt):].tolist()
    assert len(set(got)) > 1, got  # a model that repeats one token would make this test weak


def test_quantized_policy_with_cache():
    # One config: the policy only changes what the projections see, not the cache logic; tiny-e2b
    # has the most quantized parts (PLE projections, KV-shared double-wide MLPs).
    cfg, p = _params("tiny-e2b")
    model = Transformer(cfg, quant=RecipePolicy(resolve_recipe("q4_0", cfg)))
    want = _check_decoding(model, {"params": p}, cfg, prefill=False)  # (prefill: one compile less)
    float_logits = np.asarray(_fns(Transformer(cfg))[0]({"params": p}, *_batch(cfg)))
    assert np.abs(want - float_logits).max() > 1e-2  # the Q4_0 fake-quant really changed the model


def test_cache_layout():
    cfg = get_config("tiny-e2b")
    cache = init_cache(cfg, 3, 20, jnp.bfloat16)
    assert isinstance(cache, KVCache) and cache.max_len == 20 and int(cache.length) == 0
    # KV-shared layers own no buffers; global layers use their own head dim / kv heads
    assert sorted(cache.layers) == [f"layer_{i}" for i in range(cfg.first_kv_shared_layer)]
    assert cache.layers["layer_3"][0].shape == (3, 20, cfg.num_global_kv_heads, cfg.global_head_dim)
    assert cache.layers["layer_0"][1].shape == (3, 20, cfg.num_kv_heads, cfg.head_dim)
    assert cache.layers["layer_0"][0].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="max_len"):
        init_cache(cfg, 1, cfg.max_position + 1)
