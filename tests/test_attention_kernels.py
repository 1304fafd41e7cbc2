"""Attention kernel selection: the fused-attention call (cuDNN on GPU) must implement exactly the
model's mask rule. CPU has no cuDNN, so the translation (causal, window as W−1 keys to the left,
segments as a mask) is checked through the same jax.nn.dot_product_attention call on XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_qat.model.attention import attend, attention_mask, fused_sdpa
from gemma_qat.model.config import get_config
from gemma_qat.model.params import init_params
from gemma_qat.model.transformer import Transformer
from gemma_qat.train.config import RunConfig


def _qkv(b, t, n, k, h, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, t, n, h)), jax.random.normal(ks[1], (b, t, k, h)) / 2,
            jax.random.normal(ks[2], (b, t, k, h)))


@pytest.mark.parametrize("window", [None, 1, 5, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_sdpa_call_implements_the_mask_rule(window, packed):
    b, t = 2, 24
    q, k, v = _qkv(b, t, 4, 2, 16, seed=window or 0)
    seg = jnp.array([[1] * 10 + [2] * 9 + [0] * 5, [3] * 24], jnp.int32) if packed else None
    mask = attention_mask(jnp.ones((b, t), jnp.int32) if seg is None else seg, window)
    ref = attend(q, k, v, mask, seg, window, impl="xla")
    got = fused_sdpa(q, k, v, seg, window, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_auto_falls_back_to_xla_off_gpu_and_bad_impl_is_named():
    q, k, v = _qkv(1, 8, 2, 1, 8)
    mask = attention_mask(jnp.ones((1, 8), jnp.int32), None)
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(attend(q, k, v, mask, None, None, impl="auto"),
                                  attend(q, k, v, mask, None, None, impl="xla"))
    with pytest.raises(ValueError, match="flash.*'xla', 'cudnn', 'splash', 'auto'"):
        attend(q, k, v, mask, None, None, impl="flash")


def test_model_attention_option_keeps_logits():
    cfg = get_config("tiny-e2b")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 20), 0, cfg.vocab_size)
    seg = jnp.array([[1] * 12 + [2] * 8, [1] * 20], jnp.int32)
    out = {a: Transformer(cfg, attention=a).apply({"params": params}, tokens, segment_ids=seg)
           for a in ("xla", "auto")}
    np.testing.assert_array_equal(np.asarray(out["xla"]), np.asarray(out["auto"]))


def test_run_config_validates_attention():
    assert RunConfig().attention == "auto"
    with pytest.raises(ValueError, match="attention='flash' must be one of"):
        RunConfig(attention="flash")


def test_auto_falls_back_when_cudnn_refuses(monkeypatch):
    """On a GPU where cuDNN is missing or refuses the shape (head dim 256 before Hopper), "auto" takes
    the XLA path instead of failing; asking for "cudnn" explicitly still raises."""
    q, k, v = _qkv(1, 8, 2, 1, 16)
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    mask = attention_mask(jnp.ones((1, 8), jnp.int32), 4)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # CPU has no cuDNN: jax refuses at trace time
    np.testing.assert_array_equal(attend(q, k, v, mask, None, 4, impl="auto"), attend(q, k, v, mask, None, 4))
    with pytest.raises((RuntimeError, NotImplementedError, ValueError)):
        attend(q, k, v, mask, None, 4, impl="cudnn")


@pytest.mark.parametrize("kv_heads,expect_fused", [(1, False), (2, True)])
def test_auto_takes_cudnn_only_where_tensor_parallelism_splits_kv_heads_like_query_heads(monkeypatch, kv_heads,
                                                                                        expect_fused):
    """cuDNN's partitioner needs q, k and v sharded alike: with tensor=2 and a single KV head (E2B), k and
    v stay replicated while q splits, so `auto` must take the XLA path there (the GPU compiler otherwise
    fails with "Query, key and value should have same sharding"). The logical shards come from the
    active mesh and rules, as in the training step."""
    from gemma_qat import sharding
    from gemma_qat.model import attention
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "fused_sdpa", lambda *a, **k: calls.append(1) or a[0])
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(2, 16, 4, kv_heads, 32))
    mask = attention_mask(jnp.ones((2, 16), jnp.int32), None)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2, parallelism="fsdp_tp"))
    with sharding.activate(mesh, "fsdp_tp"):
        shards = sharding.logical_shards("act_heads")
        attention.attend(q, k, v, mask, None, None, impl="auto", head_shards=shards)
    assert shards == 2 and bool(calls) == expect_fused
    assert sharding.logical_shards("act_heads") == 1  # outside a mesh: nothing is split
