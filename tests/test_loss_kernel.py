"""The fused loss's two-pass Pallas kernels (loss/kernel.py, interpret mode on CPU) against the XLA path of
the same fused loss: loss values, metrics and both gradients, for KL (+ CE) and CE, with and without the
softcap, uneven token weights, a temperature, and rows and vocabularies that split into several tiles and
segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_qat.loss import kernel as loss_kernel
from gemma_qat.loss.fused import fused_ce_loss, fused_distill_loss

B, T, D = 2, 24, 32


def _inputs(v, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    sh = jax.random.normal(ks[0], (B, T, D), jnp.float32).astype(jnp.bfloat16)
    th = jax.random.normal(ks[1], (B, T, D), jnp.float32).astype(jnp.bfloat16)
    table = jax.random.normal(ks[2], (v, D)) * 0.5
    t_table = jax.random.normal(ks[3], (v, D)) * 0.5
    labels = jax.random.randint(ks[4], (B, T), 0, v)
    w = (jax.random.uniform(ks[5], (B, T)) > 0.2).astype(jnp.float32)  # some tokens weigh nothing
    return sh, th, table, t_table, labels, w


def _close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("cap", [30.0, None])
@pytest.mark.parametrize("v,chunk", [(4096, 8), (272, 24)])  # several segments and sub-tiles; odd sizes
def test_kl_kernel_matches_xla(cap, v, chunk):
    sh, th, table, t_table, labels, w = _inputs(v)

    def run(impl):
        f = lambda sh, table: fused_distill_loss(sh, th, table, t_table, softcap=cap, temperature=1.7, alpha=0.3,
                                                 labels=labels, weights=w, with_ce=True, chunk_size=chunk, impl=impl)
        (loss, aux), vjp = jax.vjp(f, sh, table)
        return loss, aux, vjp((jnp.ones_like(loss), jax.tree.map(jnp.zeros_like, aux)))

    (l_x, aux_x, g_x), (l_k, aux_k, g_k) = run("xla"), run("pallas")
    _close((l_k, aux_k), (l_x, aux_x), rtol=2e-5, atol=2e-6)
    dh_x, dt_x = g_x
    dh_k, dt_k = g_k
    # dz is rounded to bf16 in both paths; a value on a rounding edge may round the other way.
    assert float(jnp.linalg.norm((dh_k - dh_x).astype(jnp.float32)) / jnp.linalg.norm(dh_x.astype(jnp.float32))) < 2e-3
    assert float(jnp.linalg.norm(dt_k - dt_x) / jnp.linalg.norm(dt_x)) < 2e-3


def test_ce_kernel_matches_xla():
    sh, _, table, _, labels, w = _inputs(4096, seed=1)

    def run(impl):
        f = lambda sh, table: fused_ce_loss(sh, table, labels, softcap=30.0, weights=w, chunk_size=8, impl=impl)
        (loss, aux), vjp = jax.vjp(f, sh, table)
        return loss, aux, vjp((jnp.ones_like(loss), jax.tree.map(jnp.zeros_like, aux)))

    (l_x, aux_x, g_x), (l_k, aux_k, g_k) = run("xla"), run("pallas")
    _close((l_k, aux_k), (l_x, aux_x), rtol=2e-5, atol=2e-6)
    for a, b in zip(g_k, g_x):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-3


def test_row_stats_first_argmax_and_label_across_segments():
    """Ties: the first maximum wins, also when it sits in a later tile than an equal one would; the label's
    logit is picked from whichever segment holds it."""
    r, v = 8, 8192
    z = jax.random.normal(jax.random.PRNGKey(2), (r, v)) * 0.1
    z = z.at[0, [700, 5000]].set(9.0).at[1, [5000, 7000]].set(9.0).at[2, 8191].set(9.0)
    labels = jnp.array([0, 5000, 8191, 3, 4, 4096, 6, 7000])
    st = loss_kernel.row_stats(z, z, labels, 1.0, cap=None, interpret=True)
    np.testing.assert_array_equal(np.asarray(st["arg_s"]), np.asarray(jnp.argmax(z, -1)))
    np.testing.assert_allclose(np.asarray(st["s_label"]), np.asarray(z[jnp.arange(r), labels]), rtol=0, atol=0)
    ce, kl, agree = loss_kernel.losses(st, 1.0)
    ref = jax.nn.logsumexp(z, -1) - z[jnp.arange(r), labels]
    np.testing.assert_allclose(np.asarray(ce), np.asarray(ref), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(kl), 0.0, atol=1e-5)  # KL of a distribution with itself
    assert bool(jnp.all(agree))


def test_use_kernel_rules(fake_devices):
    with pytest.raises(ValueError, match="unknown loss implementation 'triton'"):
        loss_kernel.use_kernel("triton", 512)
    with pytest.raises(ValueError, match="multiple of 16"):
        loss_kernel.use_kernel("pallas", 500)
    assert not loss_kernel.use_kernel("xla", 512)
    fake_devices("cpu")
    assert not loss_kernel.use_kernel("auto", 512)
    fake_devices("gpu")
    assert loss_kernel.use_kernel("auto", 512) and not loss_kernel.use_kernel("auto", 500)
