"""The one-pass Q4_0 kernel (quant/q4_0_kernel.py), run through Pallas' interpreter on CPU, gives the XLA
path's bits exactly (formats.py, itself byte-exact against gguf.quants in test_formats), keeps the
straight-through gradient, and the policy can swap it in without changing a model's numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_qat import sharding
from gemma_qat.model.config import get_config
from gemma_qat.model.params import init_params
from gemma_qat.model.transformer import Transformer
from gemma_qat.quant import formats, q4_0_kernel
from gemma_qat.quant.policy import RecipePolicy
from gemma_qat.quant.recipe import resolve_recipe


def _bits(x):
    x = jnp.asarray(x)
    return np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16 if x.dtype.itemsize == 2 else jnp.uint32))


def _hard(shape, axis, seed=0):
    """Random values with blocks of ties in both signs, zeros, -0.0, subnormals, huge values and a NaN."""
    rng = np.random.default_rng(seed)
    x = np.moveaxis(rng.standard_normal(shape).astype(np.float32), axis, -1).copy()  # blocks along the last axis
    flat = x.reshape(-1, x.shape[-1])
    flat[0, :32] = 0.0
    flat[1, :32] = -0.0
    flat[2, :32] = np.float32(1e-40) * rng.standard_normal(32)
    flat[3, :32] = np.float32(3e38) * np.sign(rng.standard_normal(32))
    flat[4, :32] = rng.integers(-8, 9, 32).astype(np.float32)  # ties of +8 and -8 likely
    flat[5, 3], flat[5, 7] = -5.0, 5.0
    flat[6, 3], flat[6, 7] = 5.0, -5.0
    flat[7, 10] = np.nan
    return np.moveaxis(flat.reshape(x.shape), -1, axis)


@pytest.mark.parametrize("shape,axis", [((64, 48), 0),        # blocks down the rows: [K, N]
                                        ((3, 64, 32), 1),     # a middle axis: [E, K, N]
                                        ((16, 96), 1),        # the last axis: [M, K]
                                        ((2, 8, 2, 64), 3)])  # the last axis behind several dims
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_the_xla_path_bit_for_bit(shape, axis, dtype):
    w = jnp.asarray(_hard(shape, axis))
    ref = formats.q4_0_fake_quant(w, in_axis=axis).astype(dtype)
    out = q4_0_kernel.q4_0_fake_quant_fused(w, in_axis=axis, dtype=dtype)
    assert out.dtype == dtype and out.shape == w.shape
    np.testing.assert_array_equal(_bits(out), _bits(ref))


def test_kernel_takes_bf16_weights_and_defaults_to_their_dtype():
    w = jnp.asarray(_hard((64, 32), 0)).astype(jnp.bfloat16)
    out = q4_0_kernel.q4_0_fake_quant_fused(w, in_axis=0)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(out), _bits(formats.q4_0_fake_quant(w, in_axis=0)))


def test_kernel_gradient_is_the_identity_in_the_weight_dtype():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 32)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(2).standard_normal((64, 32)), jnp.float32)
    dw = jax.grad(lambda w: jnp.sum(q4_0_kernel.q4_0_fake_quant_fused(w, in_axis=0, dtype=jnp.bfloat16)
                                    .astype(jnp.float32) * g))(w)
    assert dw.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dw), np.asarray(g.astype(jnp.bfloat16).astype(jnp.float32)))


def test_which_shapes_and_backends_take_the_kernel():
    assert q4_0_kernel.supported((2048, 8192), 0) and q4_0_kernel.supported((128, 2, 704, 2816), 3)
    assert not q4_0_kernel.supported((40, 64), 0)      # 40 is not a multiple of 32
    assert not q4_0_kernel.supported((2, 4, 64), 2)    # 8 rows: no power-of-two tile >= 16
    assert not q4_0_kernel.use_kernel("xla", (64, 64), 0)
    assert q4_0_kernel.use_kernel("pallas", (64, 64), 0)
    assert not q4_0_kernel.use_kernel("auto", (64, 64), 0)  # CPU: auto keeps XLA
    with pytest.raises(ValueError, match="cannot take shape"):
        q4_0_kernel.use_kernel("pallas", (2, 4, 64), 2)
    with pytest.raises(ValueError, match="unknown Q4_0 implementation 'triton'"):
        q4_0_kernel.use_kernel("triton", (64, 64), 0)
    with pytest.raises(ValueError, match="unknown Q4_0 implementation"):
        RecipePolicy(resolve_recipe("q4_0", get_config("tiny-e2b")), q4_0_impl="x")


def test_auto_takes_the_kernel_only_on_one_nvidia_gpu(fake_devices):
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=8, parallelism="fsdp")) if jax.device_count() >= 8 else None
    world = fake_devices
    world("gpu")
    assert q4_0_kernel.use_kernel("auto", (2048, 8192), 0)
    assert not q4_0_kernel.use_kernel("auto", (40, 64), 0)  # the shape cannot take it: XLA
    world("gpu", cc="8.0")
    assert q4_0_kernel.use_kernel("auto", (2048, 8192), 0)
    world("gpu", cc="7.5")
    assert not q4_0_kernel.use_kernel("auto", (2048, 8192), 0)
    world("gpu", cc=None)  # no CUDA compute capability (e.g. ROCm)
    assert not q4_0_kernel.use_kernel("auto", (2048, 8192), 0)
    world("gpu", count=8)  # a Pallas call is opaque to the SPMD partitioner
    assert not q4_0_kernel.use_kernel("auto", (2048, 8192), 0)
    # One GPU tracing a step for a mesh of several (preflight compiling for 8xH100 on a one-GPU host):
    # XLA, as on the cluster itself. The kernel there made the partitioner gather whole fp32 weights.
    world("gpu")
    if mesh is not None:
        with sharding.activate(mesh, "fsdp"):
            assert not q4_0_kernel.use_kernel("auto", (2048, 8192), 0)
        assert q4_0_kernel.use_kernel("auto", (2048, 8192), 0)
    world("tpu")
    assert not q4_0_kernel.use_kernel("auto", (2048, 8192), 0)


def test_policy_with_the_kernel_gives_the_same_logits_and_gradients():
    cfg = get_config("tiny-26b-a4b")  # dense and MoE layers, attention einsums of 3 and 4 dims
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    res = resolve_recipe("q4_0", cfg)

    def loss_and_grad(impl):
        model = Transformer(cfg, quant=RecipePolicy(res, q4_0_impl=impl), dtype=jnp.bfloat16)

        def loss(p):
            logits = model.apply({"params": p}, tokens).astype(jnp.float32)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
        kernels = str(jax.make_jaxpr(loss)(params)).count("pallas_call")
        assert kernels == (len(res.quantized()) if impl == "pallas" else 0), (impl, kernels)
        return jax.jit(jax.value_and_grad(loss))(params)

    (l_x, g_x), (l_p, g_p) = loss_and_grad("xla"), loss_and_grad("pallas")
    np.testing.assert_array_equal(np.asarray(l_p), np.asarray(l_x))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_p), jax.tree.leaves(g_x)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("launch", [q4_0_kernel.Launch(16), q4_0_kernel.Launch(64, 2), q4_0_kernel.Launch(1024, 8)])
def test_launch_shape_does_not_change_the_bits(launch):
    w = jnp.asarray(_hard((128, 64), 0))
    ref = formats.q4_0_fake_quant(w, in_axis=0).astype(jnp.bfloat16)
    for axis, x, r in ((0, w, ref), (1, w.T, ref.T)):  # blocks down the rows, then along the last axis
        out = q4_0_kernel.q4_0_fake_quant_fused(x, in_axis=axis, dtype=jnp.bfloat16, launch=launch)
        np.testing.assert_array_equal(_bits(out), _bits(r))
