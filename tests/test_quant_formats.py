"""Numerics of gemma_qat.quant.formats; Q4_0 is checked against gguf.quants (independent numpy)."""
import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gemma_qat.quant import formats as F
from gemma_qat.quant import pack as P

Q40 = gguf.GGMLQuantizationType.Q4_0
BF16 = ml_dtypes.bfloat16


def _rng(seed=0):
    return np.random.default_rng(seed)


def _boundary_blocks(rng, nblocks, pow2):
    """Blocks whose x*id + 8.5 lands on or 1-3 ulp off integers and .5 values."""
    e = rng.integers(-12, 4, nblocks).astype(np.float32)
    d = np.exp2(e) if pow2 else (np.exp2(e) * rng.uniform(1, 2, nblocks)).astype(np.float32)
    sign = rng.choice([-1.0, 1.0], nblocks).astype(np.float32)
    mx = (-8 * sign * d).astype(np.float32)  # the block max; d = mx / -8 exactly
    k = rng.integers(1, 16, (nblocks, 31)) + rng.choice([0.0, 0.5], (nblocks, 31))  # (x*id+8.5) target
    x = ((k - 8.5) * (sign * d)[:, None]).astype(np.float32)
    steps = rng.integers(-3, 4, x.shape)
    for s in (-3, -2, -1, 1, 2, 3):
        m = steps == s
        for _ in range(abs(s)):
            x[m] = np.nextafter(x[m], np.float32(np.sign(s) * np.inf))
    x = np.clip(x, -np.abs(mx)[:, None], np.abs(mx)[:, None])  # keep the max unique in |.|
    blk = np.concatenate([mx[:, None], x], axis=1)
    return np.take_along_axis(blk, rng.permuted(np.tile(np.arange(32), (nblocks, 1)), axis=1), 1)


def _special_blocks():
    b = np.zeros((10, 32), np.float32)
    b[1] = -0.0                                  # all -0.0: d bytes must be +0 like gguf
    b[2, 17] = 3.0                               # single nonzero (positive)
    b[3, 0] = -1e-3                              # single nonzero (negative, first)
    b[4] = np.linspace(-1, 0.5, 32)              # negative max
    b[5] = np.linspace(-0.5, 2, 32)              # positive max
    b[6, 3], b[6, 9] = 1.5, -1.5                 # equal |max|, + first
    b[7, 3], b[7, 9] = -1.5, 1.5                 # equal |max|, - first
    b[8] = np.float32(1e-6) * np.arange(32)      # d underflows to fp16 subnormal
    b[9] = np.float32(1e-9) * np.arange(32)      # d rounds to 0 in fp16
    return b


def _cases():
    r = _rng(1)
    heavy = r.standard_normal((32, 256)).astype(np.float32)
    heavy[r.random(heavy.shape) < 0.01] *= 300.0
    return {
        "normal": (r.standard_normal((48, 512)) * 0.02).astype(np.float32),
        "heavy_outliers": heavy,
        "student_t": r.standard_t(2, (32, 256)).astype(np.float32),
        "ties_pow2": _boundary_blocks(r, 512, True).reshape(64, 256),
        "ties_random_d": _boundary_blocks(r, 512, False).reshape(64, 256),
        "special": _special_blocks().reshape(2, 160),
        "real_shape": (r.standard_normal((256, 1536)) * 0.03).astype(np.float32),
    }


CASES = _cases()
_fq_jit = jax.jit(F.q4_0_fake_quant, static_argnames="in_axis")
_quant_jit = jax.jit(F.q4_0_quantize, static_argnames="in_axis")


def _gguf(w32):
    raw = gguf.quants.quantize(w32, Q40)
    return raw, gguf.quants.dequantize(raw, Q40).reshape(w32.shape)


@pytest.mark.parametrize("name", sorted(CASES))
def test_q4_0_bit_exact_vs_gguf(name):
    w = CASES[name]
    raw_ref, deq_ref = _gguf(w)
    for quant, fq in ((F.q4_0_quantize, F.q4_0_fake_quant), (_quant_jit, _fq_jit)):
        q, d = quant(jnp.asarray(w), in_axis=-1)
        assert q.dtype == jnp.uint8 and d.dtype == jnp.float16 and q.shape == (*w.shape[:-1], w.shape[-1] // 32, 32)
        raw = P.pack_q4_0(np.asarray(q), np.asarray(d))
        np.testing.assert_array_equal(raw, raw_ref)  # byte for byte, incl. d sign bits
        out = np.asarray(fq(jnp.asarray(w), in_axis=-1))
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, deq_ref)
        np.testing.assert_array_equal(np.asarray(F.q4_0_dequantize(q, d)), deq_ref)


def test_ties_case_discriminates_fma():
    """The tie data must contain elements where an FMA-contracted x*id+8.5 gives another
    code than ggml's two roundings (XLA:CPU contracts inside jit), else the test is toothless."""
    b = CASES["ties_random_d"].reshape(-1, 32).astype(np.float64)
    mx = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1)
    idv = (np.float32(1) / (mx / -8).astype(np.float32)).astype(np.float32)
    two = np.trunc((b * idv).astype(np.float32) + np.float32(8.5))
    fma = np.trunc((b * idv + 8.5).astype(np.float32))  # product exact in f64
    assert (two != fma).sum() > 20


def test_first_absmax_is_the_argmax_rule():
    """The uint64-key block max equals argmax(|x|) + take (first on ties) bit for bit: small-integer
    blocks tie often, in both signs; -0.0 blocks keep their sign bit; a NaN reaches the result."""
    r = _rng(5)
    x = r.integers(-6, 7, (3000, 32)).astype(np.float32)
    x[::7] = 0.0
    x[::7, 3] = -0.0
    x[5] = -0.0
    x = np.concatenate([x, r.standard_normal((1000, 32)).astype(np.float32)])
    x[11, 4] = np.nan
    ref = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]
    got = np.asarray(jax.jit(F._first_absmax)(jnp.asarray(x)))
    assert np.isnan(got[11]) and np.isnan(ref[11])
    keep = ~np.isnan(ref)
    np.testing.assert_array_equal(got[keep].view(np.uint32), ref[keep].view(np.uint32))
    got0 = np.asarray(jax.jit(F._first_absmax, static_argnums=1)(jnp.asarray(x.T), 0))  # blocks down axis 0
    np.testing.assert_array_equal(got0[keep].view(np.uint32), ref[keep].view(np.uint32))


def test_q4_0_bf16_input():
    w = (_rng(2).standard_normal((64, 512)) * 0.02).astype(BF16)
    raw_ref, deq_ref = _gguf(w.astype(np.float32))  # gguf/llama.cpp convert bf16 -> f32 first
    for fq, quant in ((F.q4_0_fake_quant, F.q4_0_quantize), (_fq_jit, _quant_jit)):
        q, d = quant(jnp.asarray(w), in_axis=-1)
        np.testing.assert_array_equal(P.pack_q4_0(np.asarray(q), np.asarray(d)), raw_ref)
        out = fq(jnp.asarray(w), in_axis=-1)
        assert out.dtype == jnp.bfloat16
        # one rounding of the exact grid value to bf16 (k*d needs up to 11 bits)
        np.testing.assert_array_equal(np.asarray(out), deq_ref.astype(BF16))
    # bf16 block max / -8 has an 8-bit mantissa, so the fp16 d is lossless (in fp16 range)
    b = w.astype(np.float32).reshape(64, 16, 32)
    mx = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]
    np.testing.assert_array_equal(np.asarray(d).astype(np.float32), mx / np.float32(-8))


def test_recip_is_correctly_rounded():
    r = _rng(11)
    d = (r.standard_normal(1 << 16) * np.exp2(r.integers(-60, 60, 1 << 16))).astype(np.float32)
    edge = np.array([1, -1, 2, 0.5, 3, 1.5, np.nextafter(np.float32(2), 0), 7.0, 1e-30, 8.5e37,
                     np.finfo(np.float32).tiny, 65504, 1 / 3], np.float32)
    d = np.concatenate([d, edge, -edge, [0.0]]).astype(np.float32)
    with np.errstate(divide="ignore"):
        ref = np.where(d == 0, np.float32(0), np.float32(1) / d)
    for f in (F._recip, jax.jit(F._recip)):
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(d))).view(np.uint32), ref.view(np.uint32))


def test_q4_0_bad_axis_size():
    with pytest.raises(ValueError, match="multiple of 32"):
        F.q4_0_fake_quant(jnp.zeros((4, 48)), in_axis=-1)


# ------------------------------------------------------------------- in_axis
@pytest.mark.parametrize("fmt", sorted(F.FORMATS))
def test_in_axis_transpose(fmt):
    f = F.FORMATS[fmt].fake_quant
    k = jnp.asarray(_rng(3).standard_normal((256, 96)).astype(np.float32))  # [in, out]
    np.testing.assert_array_equal(np.asarray(f(k, 0)), np.asarray(f(k.T, -1)).T)
    np.testing.assert_array_equal(np.asarray(f(k, -2)), np.asarray(f(k, 0)))


def test_q4_0_quantize_axis0_layout():
    k = jnp.asarray(_rng(4).standard_normal((128, 24)).astype(np.float32))  # [in, out]
    q0, d0 = F.q4_0_quantize(k, in_axis=0)
    q1, d1 = F.q4_0_quantize(k.T, in_axis=1)
    assert q0.shape == (24, 4, 32) and d0.shape == (24, 4)
    np.testing.assert_array_equal(np.asarray(q0), np.asarray(q1))
    np.testing.assert_array_equal(np.asarray(F.q4_0_dequantize(q0, d0, in_axis=0)),
                                  np.asarray(F.q4_0_fake_quant(k, in_axis=0)))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_multi_axis(bits):
    w = jnp.asarray(_rng(5).standard_normal((4, 8, 16)).astype(np.float32))  # [N, H, D]
    out = F.int_fake_quant(w, bits=bits, in_axis=(0, 1))
    ref = F.int_fake_quant(w.reshape(32, 16), bits=bits, in_axis=0).reshape(4, 8, 16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    q, s = F.int_quantize(w, bits=bits, in_axis=(1, 0))
    assert s.shape == (1, 1, 16) and q.dtype == jnp.int8


# ----------------------------------------------------------- int numerics (numpy ref)
def _int_ref(w, bits):
    """Independent numpy statement of the documented rule, rows = output channels."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    mx = np.take_along_axis(w, np.abs(w).argmax(-1)[:, None], -1)
    s = (mx / np.float32(lo)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(s == 0, np.float32(0), np.float32(1) / s)
    q = np.clip(np.round(w * inv), lo, hi)
    return q.astype(np.int8), s, (q * s).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_matches_numpy_rule(bits):
    w = CASES["heavy_outliers"].copy()
    w[3] = 0.0
    w[4] = np.clip(w[4], -1, 1)
    w[4, :2] = (-5.0, 5.0)  # opposite-sign max saturates at hi
    q_ref, s_ref, deq_ref = _int_ref(w, bits)
    q, s = F.int_quantize(jnp.asarray(w), bits=bits, in_axis=-1)
    np.testing.assert_array_equal(np.asarray(q), q_ref)
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    np.testing.assert_array_equal(np.asarray(F.int_fake_quant(jnp.asarray(w), bits=bits, in_axis=1)), deq_ref)
    assert q_ref[4, 0] == -(2 ** (bits - 1)) and q_ref[4, 1] == 2 ** (bits - 1) - 1
    assert set(np.unique(q_ref)) <= set(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))


def test_int_round_half_even():
    w = jnp.asarray([[-4.0, 0.25, 0.75, 1.25, -0.25]])  # s = -4 / -8 = 0.5
    q, s = F.int_quantize(w, bits=4, in_axis=-1)
    assert float(s[0, 0]) == 0.5
    np.testing.assert_array_equal(np.asarray(q), [[-8, 0, 2, 2, 0]])  # 0.5, 1.5, 2.5, -0.5 -> even
    q2, _ = F.int_quantize(jnp.asarray([[-2.0, 0.5, -0.5, 1.5]]), bits=2, in_axis=-1)  # s=1
    np.testing.assert_array_equal(np.asarray(q2), [[-2, 0, 0, 1]])  # ties to even, 1.5 -> 2 -> clip


# ----------------------------------------------------------------------- STE
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("fmt", sorted(F.FORMATS))
def test_ste_identity_gradient(fmt, dtype):
    r = _rng(6)
    w = jnp.asarray(r.standard_normal((64, 96)), dtype)
    g = jnp.asarray(r.standard_normal((64, 96)), dtype)
    f = F.FORMATS[fmt].fake_quant
    grad = jax.grad(lambda w: jnp.sum(f(w, 0) * g))(w)
    assert grad.dtype == dtype
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(g))
    gj = jax.jit(jax.grad(lambda w: jnp.sum(f(w, 0) * g)))(w)
    np.testing.assert_array_equal(np.asarray(gj), np.asarray(g))


def _lsq_ref(x, s, lo, hi, g):
    v = x * (np.float32(1) / np.float32(s))
    inside = (v >= lo) & (v <= hi)
    q = np.clip(np.round(v), lo, hi)
    return np.where(inside, g, 0.0), np.sum(g * np.where(inside, q - v, q))


def test_act_fake_quant_forward_and_lsq_grads():
    r = _rng(7)
    x = jnp.asarray(r.standard_normal(4096).astype(np.float32) * 3)
    g = jnp.asarray(r.standard_normal(4096).astype(np.float32))
    s = jnp.float32(0.02)  # range [-2.56, 2.54]: many clip on both sides
    y = F.act_fake_quant_int8(x, s)
    inv = np.float32(1) / np.float32(0.02)
    np.testing.assert_array_equal(np.asarray(y), np.clip(np.round(np.asarray(x) * inv), -128, 127) * np.float32(0.02))
    gx, gs = jax.grad(lambda x, s: jnp.sum(F.act_fake_quant_int8(x, s) * g), argnums=(0, 1))(x, s)
    gx_ref, gs_ref = _lsq_ref(np.asarray(x), np.float32(0.02), -128, 127, np.asarray(g))
    np.testing.assert_array_equal(np.asarray(gx), gx_ref)
    assert (np.asarray(gx) == 0).sum() > 100
    np.testing.assert_allclose(float(gs), gs_ref, rtol=1e-4)
    # frozen scale: stop_gradient leaves x's rule unchanged
    gx2 = jax.grad(lambda x: jnp.sum(F.act_fake_quant_int8(x, jax.lax.stop_gradient(s)) * g))(x)
    np.testing.assert_array_equal(np.asarray(gx2), gx_ref)


def test_act_fake_quant_uncalibrated_passthrough():
    x = jnp.asarray(_rng(8).standard_normal((8, 16)), jnp.bfloat16)
    y = F.act_fake_quant_int8(x, 0.0)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    gx, gs = jax.grad(lambda x, s: jnp.sum(F.act_fake_quant_int8(x, s).astype(jnp.float32)),
                      argnums=(0, 1))(x, jnp.float32(0))
    np.testing.assert_array_equal(np.asarray(gx), np.ones((8, 16)))
    assert float(gs) == 0.0


def test_int_fake_quant_learned_scale_grad_shape():
    w = jnp.asarray(_rng(9).standard_normal((32, 8)).astype(np.float32))  # [in, out]
    s = jnp.full((1, 8), 0.3, jnp.float32)
    y = F.int_fake_quant(w, bits=2, in_axis=0, scale=s)
    inv = np.float32(1) / np.float32(0.3)
    np.testing.assert_array_equal(np.asarray(y), np.clip(np.round(np.asarray(w) * inv), -2, 1) * np.float32(0.3))
    gs = jax.grad(lambda s: jnp.sum(F.int_fake_quant(w, bits=2, in_axis=0, scale=s)))(s)
    assert gs.shape == (1, 8)
    _, gs0 = _lsq_ref(np.asarray(w)[:, 0], np.float32(0.3), -2, 1, np.ones(32, np.float32))
    np.testing.assert_allclose(float(gs[0, 0]), gs0, rtol=1e-5)


# ---------------------------------------------------------------- idempotence
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("fmt", sorted(F.FORMATS))
def test_idempotent_same_dtype(fmt, dtype):
    f = F.FORMATS[fmt].fake_quant
    for scale in (0.02, 1e-5):  # 1e-5: Q4_0 d is an fp16 subnormal
        w = jnp.asarray(CASES["heavy_outliers"] * scale, dtype)
        a = f(w, -1)
        np.testing.assert_array_equal(np.asarray(f(a, -1)), np.asarray(a))


def test_q4_0_not_idempotent_across_dtype_cast():
    """fq in fp32, cast to bf16, fq again is NOT a fixed point: bf16(k*d16) != k*bf16(d16)."""
    d16 = np.float32(1.5810547)  # an fp16 value that bf16 cannot hold
    blk = np.zeros((1, 32), np.float32)
    blk[0, :16] = np.arange(-8, 8) * d16
    a = F.q4_0_fake_quant(jnp.asarray(blk), in_axis=-1)
    np.testing.assert_array_equal(np.asarray(a), blk)  # on grid in fp32
    a16 = a.astype(jnp.bfloat16)
    b = F.q4_0_fake_quant(a16, in_axis=-1)
    assert (np.asarray(b) != np.asarray(a16)).sum() == 2  # k = -5 and +5 move


# ------------------------------------------------------------- jit / registry
@pytest.mark.parametrize("fmt", sorted(F.FORMATS))
def test_jit_matches_eager(fmt):
    f = F.FORMATS[fmt].fake_quant
    jf = jax.jit(f, static_argnums=1)
    for name in ("ties_random_d", "heavy_outliers", "special"):
        w = jnp.asarray(CASES[name])
        np.testing.assert_array_equal(np.asarray(jf(w, -1)), np.asarray(f(w, -1)))
    x = jnp.asarray(CASES["ties_random_d"])
    s = jnp.float32(0.01)
    np.testing.assert_array_equal(np.asarray(jax.jit(F.act_fake_quant_int8)(x, s)),
                                  np.asarray(F.act_fake_quant_int8(x, s)))


def test_registry_and_bits_per_weight():
    assert set(F.FORMATS) == {"q4_0", "int8", "int4", "int2"}
    assert F.FORMATS["q4_0"].bits_per_weight((1536, 256), 0) == 4.5
    assert F.FORMATS["q4_0"].block_size == 32 and F.FORMATS["int4"].block_size is None
    assert F.FORMATS["int4"].bits_per_weight((1536, 256), 0) == 4 + 32 / 1536
    assert F.FORMATS["int2"].bits_per_weight((8, 4, 64), (0, 1)) == 2 + 1.0
    with pytest.raises(KeyError):
        F.get_format("q8_0")
    with pytest.raises(ValueError):
        F.int_fake_quant(jnp.zeros((4, 4)), bits=3, in_axis=0)
    with pytest.raises(Exception):
        F.FORMATS["int8"].bits = 7  # frozen


@pytest.mark.parametrize("name", sorted(CASES))
def test_q4_0_kernel_matches_gguf(name):
    """The one-pass Pallas kernel (q4_0_kernel.py, interpreter on CPU) against gguf.quants directly, not only
    against formats.py: blocks laid out [rows, 32], zero blocks padding the rows to the kernel's tile of 16."""
    from gemma_qat.quant.q4_0_kernel import q4_0_fake_quant_fused

    blocks = CASES[name].reshape(-1, 32)
    w = np.concatenate([blocks, np.zeros((-len(blocks) % 16, 32), np.float32)])
    _, deq_ref = _gguf(w)
    got = np.asarray(q4_0_fake_quant_fused(jnp.asarray(w), in_axis=1, dtype=jnp.float32))
    np.testing.assert_array_equal(got.view(np.uint32), deq_ref.astype(np.float32).view(np.uint32))
