"""TPU flash attention (model/splash.py): the Pallas splash kernel, run here in Pallas' interpreter, gives
the XLA path's values and gradients under our mask rule (causal, sliding window, packed documents, GQA),
alone and in its shard_map over a mesh where a single KV head is repeated to the head shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_qat import sharding
from gemma_qat.model.attention import attend, attention_mask

T, H = 256, 128


def _qkv(b, n, k, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, key, v = (jax.random.normal(ks[i], s) for i, s in enumerate([(b, T, n, H), (b, T, k, H), (b, T, k, H)]))
    return q, key / 4, v, jax.random.normal(ks[3], (b, T, n, H))


def _loss(impl, window, seg, head_shards=1):
    mask = attention_mask(jnp.ones((seg.shape if seg is not None else (1, T)), jnp.int32) if seg is None else seg,
                          window)

    def f(q, k, v, w):
        out = attend(q, k, v, mask, seg, window, impl=impl, head_shards=head_shards)
        return jnp.sum(out.astype(jnp.float32) * w), out
    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)


@pytest.mark.parametrize("window,packed", [(None, True), (100, False)])
def test_splash_matches_the_xla_path_values_and_gradients(window, packed):
    q, k, v, w = _qkv(1, 4, 2)  # GQA: 2 query heads per KV head
    seg = jnp.array([[1] * 90 + [2] * 100 + [3] * 66], jnp.int32) if packed else None
    (_, ref), ref_g = _loss("xla", window, seg)(q, k, v, w)
    (_, got), got_g = _loss("splash", window, seg)(q, k, v, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-4, atol=2e-4)
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-3)


def test_splash_under_a_mesh_repeats_a_single_kv_head_to_the_head_shards():
    q, k, v, w = _qkv(4, 4, 1, seed=1)  # one KV head, heads over tensor = 2 (E2B's shape)
    seg = jnp.tile(jnp.array([[1] * 128 + [2] * 128], jnp.int32), (4, 1))
    (_, ref), ref_g = _loss("xla", 64, seg)(q, k, v, w)
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2, parallelism="fsdp_tp"))
    with sharding.activate(mesh, "fsdp_tp"):
        heads = NamedSharding(mesh, P("fsdp", None, "tensor", None))
        rows = NamedSharding(mesh, P("fsdp"))
        args = [jax.device_put(a, s) for a, s in zip((q, k, v, w), (heads, rows, rows, heads))]
        (_, got), got_g = jax.jit(_loss("splash", 64, seg, head_shards=2))(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-4, atol=2e-4)
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-3)


def test_splash_names_shapes_it_cannot_take():
    q, k, v, _ = _qkv(1, 4, 2)
    mask = attention_mask(jnp.ones((1, 100), jnp.int32), None)
    with pytest.raises(ValueError, match="splash.*multiples of 128"):
        attend(q[:, :100], k[:, :100], v[:, :100], mask, None, None, impl="splash")
