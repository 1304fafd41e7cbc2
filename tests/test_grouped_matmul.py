"""The blocked grouped matmul (the MoE experts' path off TPU) against jax.lax.ragged_dot: values and
gradients, uneven and empty groups, and memory that does not grow as groups × rows; the Hopper kernel
path's gradient algebra and when `auto` picks it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_qat import sharding
from gemma_qat.model.config import get_config
from gemma_qat.model import grouped_matmul as GM
from gemma_qat.model.grouped_matmul import grouped_matmul
from gemma_qat.model.layers import NoQuant
from gemma_qat.model.moe import MoE


@pytest.mark.parametrize("sizes,block", [([5, 0, 17, 1, 9], 4), ([32, 0, 0, 0], 8), ([0, 3, 0, 4], 16),
                                         ([7, 7, 7], 7)])
def test_blocked_equals_ragged_dot_values_and_grads(sizes, block):
    m, k, n = sum(sizes), 12, 10
    ks = jax.random.split(jax.random.PRNGKey(len(sizes) + block), 3)
    x = jax.random.normal(ks[0], (m, k))
    w = jax.random.normal(ks[1], (len(sizes), k, n))
    gs = jnp.array(sizes, jnp.int32)
    ct = jax.random.normal(ks[2], (m, n))

    def run(impl):
        out, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, gs, impl=impl, block=block), x, w)
        return out, vjp(ct)

    (ref, (dx_r, dw_r)), (got, (dx_b, dw_b)) = run("ragged"), run("blocked")
    for a, b in ((got, ref), (dx_b, dx_r), (dw_b, dw_r)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(dw_b)[np.array(sizes) == 0]).max(initial=0) == 0  # empty groups: no gradient


def test_blocked_memory_is_bounded_by_rows_not_groups_times_rows():
    m, g, k, n = 8192, 128, 256, 256
    x, w = jnp.zeros((m, k), jnp.bfloat16), jnp.zeros((g, k, n), jnp.bfloat16)
    gs = jnp.full((g,), m // g, jnp.int32)

    def temp(impl):
        f = jax.jit(lambda x, w, gs: grouped_matmul(x, w, gs, impl=impl))
        ma = f.lower(x, w, gs).compile().memory_analysis()
        if ma is None:
            pytest.skip("memory_analysis unavailable on this backend")
        return ma.temp_size_in_bytes

    dense_copy = g * m * k * 2  # the [G, M, K] masked input that the dense lowering builds
    assert temp("ragged") >= dense_copy  # positive control: the lowering this path replaces
    blocked = temp("blocked")
    padded_rows = (m // 128 + g) * 128
    assert blocked < dense_copy / 8, blocked
    assert blocked <= 2 * (padded_rows * (k + n) * 4 + (m // 128 + g) * k * n * 2), blocked


def test_moe_layer_same_with_either_grouped_impl():
    cfg = get_config("tiny-26b-a4b")
    kw = dict(d_model=cfg.d_model, num_experts=cfg.num_experts, top_k=cfg.top_k_experts,
              hidden=cfg.expert_ffn_dim, quant=NoQuant())
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 24, cfg.d_model))
    params = MoE(**kw, grouped="ragged").init(jax.random.PRNGKey(1), x, x)
    outs = {}
    for impl in ("ragged", "blocked"):
        f = lambda p, x: MoE(**kw, grouped=impl).apply(p, x, x)
        y, vjp = jax.vjp(f, params, x)
        outs[impl] = (y, vjp(jnp.ones_like(y)))
    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
    np.testing.assert_allclose(flat(outs["blocked"]), flat(outs["ragged"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nk", [False, True], ids=["w_kn", "w_nk"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_vjp_algebra_with_reference_kernels(dtype, nk):
    """The Hopper kernels' custom VJP (dx through the transposed-weight product, dw through the per-group
    transposed product), run with lax.ragged_dot stand-ins: equals autodiff of ragged_dot. With the weight
    stored [G, N, K] (`for_nk_weights`) the same kernels in other roles give the same numbers, and the
    gradient comes back in the stored layout."""
    sizes = [5, 0, 17, 1, 9, 0]
    m, k, n = sum(sizes), 16, 8
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(ks[0], (m, k)).astype(dtype)
    w = jax.random.normal(ks[1], (len(sizes), n, k) if nk else (len(sizes), k, n)).astype(dtype)
    ct = jax.random.normal(ks[2], (m, n)).astype(dtype)
    gs = jnp.array(sizes, jnp.int32)
    kernels = GM.for_nk_weights(GM.reference_kernels()) if nk else GM.reference_kernels()
    as_kn = (lambda w: jnp.swapaxes(w, 1, 2)) if nk else (lambda w: w)
    got, vjp = jax.vjp(lambda x, w: GM.kernel_grouped_matmul(x, w, gs, kernels), x, w)
    ref, vjp_ref = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, as_kn(w), gs, preferred_element_type=jnp.float32)
                           .astype(dtype), x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in ((got, ref), *zip(vjp(ct), vjp_ref(ct))):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    assert vjp(ct)[1].shape == w.shape
    assert np.abs(np.asarray(vjp(ct)[1], np.float32)[np.array(sizes) == 0]).max() == 0


@pytest.mark.parametrize("impl", ["ragged", "blocked"])
def test_transposed_weights_give_the_same_product(impl):
    sizes = [3, 0, 6, 2]
    ks = jax.random.split(jax.random.PRNGKey(4), 2)
    x = jax.random.normal(ks[0], (sum(sizes), 12))
    w_nk = jax.random.normal(ks[1], (len(sizes), 10, 12))  # [G, N, K]
    gs = jnp.array(sizes, jnp.int32)
    got = grouped_matmul(x, w_nk, gs, impl=impl, transpose_w=True, block=4)
    ref = jax.lax.ragged_dot(x, jnp.swapaxes(w_nk, 1, 2), gs, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown grouped matmul impl 'dense'"):
        grouped_matmul(x, w_nk, gs, impl="dense", transpose_w=True)


def test_kernel_vjp_inside_a_shard_map_types_its_results_like_its_operands():
    """Inside a shard_map (the MoE's experts under a mesh) a Pallas call's result has no varying-axes
    type, and the custom VJP's gradients must have their inputs' (26B-A4B on 4x8xH100 stopped there).
    Stand-in kernels that return such results: ragged_dot on operands equal on every device, averaged
    over the mesh (an invariant value). Values and gradients equal ragged_dot's."""
    from jax.sharding import PartitionSpec as P
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    axes = ("data", "expert")
    def invariant(f):
        def g(*a):
            y = f(*a)
            return jax.lax.psum(y.astype(jnp.float32), axes).astype(y.dtype) / 8
        return g

    kernels = GM.GroupedKernels(*map(invariant, GM.reference_kernels()))
    sizes = jnp.array([3, 0, 5, 1], jnp.int32)
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    x, w = jax.random.normal(ks[0], (9, 16)), jax.random.normal(ks[1], (4, 16, 8))

    def local(x, w):  # both typed as varying over the mesh, as the MoE's routed rows and gathered experts are
        x, w = sharding.vary(x, axes), sharding.vary(w, axes)
        return GM.kernel_grouped_matmul(x, w, sizes, kernels)[None]

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P()), out_specs=P(axes))
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    got = jax.jit(jax.value_and_grad(loss(lambda x, w: jnp.mean(f(x, w), axis=0)), argnums=(0, 1)))(x, w)
    ref = jax.value_and_grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, sizes)), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_auto_picks_the_kernels_only_on_one_hopper_gpu(fake_devices):
    world = fake_devices
    world("tpu")
    assert GM.auto_impl(2816, 1408) == "ragged"
    world("cpu")
    assert GM.auto_impl(2816, 1408) == "blocked"
    world("gpu")
    assert GM.auto_impl(2816, 1408) == "kernel" and GM.auto_impl(704, 2816) == "kernel"
    assert GM.auto_impl(2816, 1400) == "blocked"  # N not a multiple of the 64-wide tiles
    world("gpu", count=8)
    assert GM.auto_impl(2816, 1408) == "blocked"  # the SPMD partitioner cannot split a Pallas call
    # Inside a shard_map (the MoE's experts under a mesh) each device runs its own call: the kernels.
    assert GM.auto_impl(2816, 1408, per_device=True) == "kernel"
    assert GM.auto_impl(2816, 1400, per_device=True) == "blocked"
    world("gpu", cc="8.0")
    assert GM.auto_impl(2816, 1408) == "blocked"  # the kernels use Hopper's wgmma
    assert GM.auto_impl(2816, 1408, per_device=True) == "blocked"
    world("cpu", count=8)
    assert GM.auto_impl(2816, 1408, per_device=True) == "blocked"


def test_auto_follows_the_platform_the_step_is_compiled_for(fake_devices):
    # preflight on a CPU host compiling for a TPU slice: the TPU's choice, not the host's (the blocked
    # form made 26B-A4B's v5p-128 step gather an expert weight per row block). A one-GPU host compiling
    # for a TPU takes neither its kernels nor cuDNN's attention.
    from gemma_qat import devices
    fake_devices("cpu")
    with devices.compiling_for("tpu"):
        assert devices.platform() == "tpu" and GM.auto_impl(2816, 1408) == "ragged"
    assert devices.platform() == "cpu" and GM.auto_impl(2816, 1408) == "blocked"
    fake_devices("gpu")
    with devices.compiling_for("tpu"):
        assert GM.auto_impl(2816, 1408) == "ragged" and devices.single_gpu_cc_major() is None
    assert devices.single_gpu_cc_major() == 9


@pytest.mark.parametrize("fold", [1, 3])
def test_gather_rows_backward_is_a_gather_with_autodiffs_numbers(fold):
    """gather_rows (the MoE's dispatch, fold = k, and its return to token order, fold = 1) gives autodiff's
    gradient of x[idx], without the scatter-add that autodiff would emit."""
    from gemma_qat.model.moe import gather_rows
    n, d = 7, 5
    perm = jax.random.permutation(jax.random.PRNGKey(fold), n * fold)
    idx, back = perm // fold, jnp.argsort(perm)
    x = jax.random.normal(jax.random.PRNGKey(9), (n, d))
    ct = jax.random.normal(jax.random.PRNGKey(10), (n * fold, d))
    got, vjp = jax.vjp(lambda x: gather_rows(x, idx, back, fold), x)
    ref, vjp_ref = jax.vjp(lambda x: x[idx], x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    np.testing.assert_allclose(np.asarray(vjp(ct)[0]), np.asarray(vjp_ref(ct)[0]), rtol=1e-6, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda x: vjp(ct))(x))
    assert "scatter" not in jaxpr and "gather" in jaxpr
    assert "scatter-add" in str(jax.make_jaxpr(lambda x: jax.vjp(lambda x: x[idx], x)[1](ct))(x))  # control


def test_moe_moves_token_rows_without_scatter():
    """Neither direction of the MoE layer scatters rows of width D (what is left are [E]- and [B, T, E]-sized:
    the group count and the router's gradients)."""
    cfg = get_config("tiny-26b-a4b")
    kw = dict(d_model=cfg.d_model, num_experts=cfg.num_experts, top_k=cfg.top_k_experts,
              hidden=cfg.expert_ffn_dim, quant=NoQuant(), grouped="ragged")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, cfg.d_model))
    params = MoE(**kw).init(jax.random.PRNGKey(1), x, x)
    grad = jax.grad(lambda p, x: jnp.sum(MoE(**kw).apply(p, x, x) ** 2), argnums=(0, 1))
    lines = [l for l in str(jax.make_jaxpr(grad)(params, x)).splitlines() if "= scatter" in l]
    assert lines and not [l for l in lines if f",{cfg.d_model}]" in l], lines
