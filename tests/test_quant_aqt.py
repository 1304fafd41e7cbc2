"""AQT backend (gemma_qat.quant.aqt_backend) vs formats.py: bit-exact values and gradients."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from aqt.jax.v2 import aqt_quantizer
from aqt.jax.v2 import utils as aqt_utils
from aqt.jax.v2.numerics import int_numerics

from gemma_qat.quant import aqt_backend as A
from gemma_qat.quant import formats as F

FMTS = ("int8", "int4", "int2", "q4_0")
BF16 = ml_dtypes.bfloat16


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = _bits(a) != _bits(b)
    assert not diff.any(), f"{int(diff.sum())} of {diff.size} differ"


def _weights(rng, k, n, lo):
    """[k, n] fp32, scale shared along axis 0: random columns, columns whose elements sit on
    or 1 ulp off x/scale = m + 0.5 ties, and special columns (zeros, -0, +-max ties)."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    for j in range(0, n // 2):
        mx = np.float32(rng.choice([-1, 1]) * rng.uniform(0.5, 2))
        s = np.float32(mx / np.float32(lo))
        col = ((rng.integers(lo, -lo - 1, k) + 0.5) * s).astype(np.float32)
        step = rng.integers(-1, 2, k)
        col = np.where(step > 0, np.nextafter(col, np.float32(np.inf)),
                       np.where(step < 0, np.nextafter(col, np.float32(-np.inf)), col))
        col = np.clip(col, -abs(mx), abs(mx)).astype(np.float32)
        col[rng.integers(k)] = mx
        w[:, j] = col
    w[:, -1], w[:, -2], w[:, -3] = 0.0, -0.0, 0.0
    w[::2, -3], w[1::2, -3] = 0.5, -0.5  # +-max tie: the first one sets the sign
    w[:, -4] = 0.0
    w[5, -4] = -3.0  # one non-zero element
    return w


def _fq_ref(w, fmt, in_axes):
    return F.get_format(fmt).fake_quant(w, in_axes)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("fmt", FMTS)
def test_weight_fake_quant_bitexact(fmt, dtype):
    lo = -8 if fmt == "q4_0" else F.int_range(int(fmt[3:]))[0]
    w = jnp.asarray(_weights(np.random.default_rng(1), 128, 40, lo).astype(dtype))
    ref = _fq_ref(w, fmt, 0)
    _assert_bitwise(A.aqt_fake_quant(w, weight_format=fmt, in_axes=0), ref)
    got = jax.jit(lambda v: A.aqt_fake_quant(v, weight_format=fmt, in_axes=0))(w)
    _assert_bitwise(got, ref)
    wt = w.T  # in_axis last (GGUF/Dense-transposed layout)
    _assert_bitwise(A.aqt_fake_quant(wt, weight_format=fmt, in_axes=-1), _fq_ref(wt, fmt, -1))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_multi_axis_int(bits):
    w = jnp.asarray(np.random.default_rng(2).standard_normal((4, 8, 16)).astype(np.float32))
    fmt = f"int{bits}"
    _assert_bitwise(A.aqt_fake_quant(w, weight_format=fmt, in_axes=(0, 2)),
                    _fq_ref(w, fmt, (0, 2)))


CASES = [  # eqn, x shape, w shape, in_axes  (the third one makes einsum call dot(w, x))
    ("btd,df->btf", (2, 3, 64), (64, 24), 0),
    ("btnh,nhd->btd", (2, 3, 2, 32), (2, 32, 16), (0, 1)),
    ("btd,df->fbt", (2, 3, 64), (64, 24), 0),
    ("btd,fd->btf", (2, 3, 64), (24, 64), 1),
]


def _ref_einsum(eqn, x, w, fmt, in_axes, act_scale):
    xq = x if act_scale is None else F.act_fake_quant_int8(x, act_scale)
    return jnp.einsum(eqn, xq, _fq_ref(w, fmt, in_axes))


@pytest.mark.parametrize("act_scale", [None, 0.02])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_einsum_and_grads_bitexact(case, fmt, act_scale):
    _check_einsum(case, fmt, act_scale, eager=case == 0)


def test_zero_act_scale_passes_through():
    _check_einsum(0, "int4", 0.0, eager=True)


U32 = 2.0 ** -24  # unit roundoff of fp32


def _assert_dot_bound(got, a, b, spec, mask=None):
    """got = fp32 einsum(spec, a, b) of exactly representable fp32 operands, evaluated by any kernel in any
    summation order, with or without FMA: |got - exact| <= gamma_K * sum|a||b| per output element, with
    gamma_K = K u / (1 - K u), K = the number of products summed, u = 2^-24 (Higham, Accuracy and Stability
    of Numerical Algorithms, 3.1; an FMA only removes roundings). exact and sum|a||b| in fp64 (error
    ~2^-53 relative, negligible here). Holds on every CPU and GPU that sums fp32 in fp32. mask (0/1, the
    clipped STE): the result is mask * the contraction, so masked elements must be exactly 0."""
    ins, out = spec.split("->")
    ia, ib = ins.split(",")
    dims = dict(zip(ia, np.shape(a))) | dict(zip(ib, np.shape(b)))
    k = int(np.prod([dims[c] for c in set(ia + ib) - set(out)]))
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    exact = np.einsum(spec, a64, b64)
    mag = np.einsum(spec, np.abs(a64), np.abs(b64))
    if mask is not None:
        exact, mag = exact * mask, mag * mask
    err = np.abs(np.asarray(got, np.float64) - exact)
    bound = k * U32 / (1 - k * U32) * mag
    assert (err <= bound).all(), f"{spec} K={k}: max error/bound {float((err / np.maximum(bound, 1e-300)).max()):.3g}"


def _check_einsum(case, fmt, act_scale, eager):
    """AQT's DotGeneral vs formats + jnp.einsum (+ autodiff), compared like with like.

    Bit-exact: both paths feed XLA the same dots (same shapes, dimension numbers and operand layouts) on
    bit-identical fake-quantized operands, so when both are compiled the same way (both jitted, or both
    eager) XLA:CPU picks the same kernel and sums in the same order, whatever the host's ISA. The cotangent
    is an argument, not a closure constant, so no dot sees a constant operand on one side only.

    Not bit-exact, only bounded: a jitted program against an eager one. Eagerly each dot is its own XLA
    module on materialized operands; under jit XLA fuses the producers, folds transposes into the dot and
    may pick another kernel (YNNPACK vs its own dot emitter, NN vs NT GEMM), so the last bits differ (on an
    AVX2 EPYC, jax 0.10.2: 259 of 1,536 dW values). Both then lie within the fp32 dot bound of the exact
    contraction of the same fake-quantized operands, which is asserted instead (AQT.md)."""
    eqn, xs, ws, in_axes = CASES[case]
    if fmt == "q4_0" and not isinstance(in_axes, int):
        pytest.skip("Q4_0 blocks run along one axis")
    rng = np.random.default_rng(case)
    x = jnp.asarray(rng.standard_normal(xs).astype(np.float32) * 2)
    w = jnp.asarray(rng.standard_normal(ws).astype(np.float32))

    def aqt(x, w):
        return A.aqt_einsum(eqn, x, w, weight_format=fmt, in_axes=in_axes, act_scale=act_scale)

    def ref(x, w):
        return _ref_einsum(eqn, x, w, fmt, in_axes, act_scale)

    def grads(f):  # (dx, dW) of sum(f(x, w) * ct)
        return jax.grad(lambda x, w, ct: jnp.sum(f(x, w) * ct), argnums=(0, 1))

    out = jax.jit(ref)(x, w)
    ct = jnp.asarray(rng.standard_normal(out.shape).astype(np.float32))
    _assert_bitwise(jax.jit(aqt)(x, w), out)
    gref = jax.jit(grads(ref))(x, w, ct)
    gaqt = jax.jit(grads(aqt))(x, w, ct)
    _assert_bitwise(gaqt[1], gref[1])  # dW: STE through the weight fake-quant
    _assert_bitwise(gaqt[0], gref[0])  # dx: clipped STE of act_fake_quant_int8
    if eager:  # op by op: each dot its own XLA module, on both paths
        out_e = ref(x, w)
        _assert_bitwise(aqt(x, w), out_e)
        gref_e, gaqt_e = grads(ref)(x, w, ct), grads(aqt)(x, w, ct)
        _assert_bitwise(gaqt_e[1], gref_e[1])
        _assert_bitwise(gaqt_e[0], gref_e[0])
    # Every result, jitted or eager, against the exact contraction of the same fake-quantized operands.
    xq = x if act_scale is None else F.act_fake_quant_int8(x, act_scale)
    wq = _fq_ref(w, fmt, in_axes)
    mask = None if act_scale is None else np.asarray(  # the clipped STE's 0/1 (all 1 for scale 0)
        jax.grad(lambda x: jnp.sum(F.act_fake_quant_int8(x, act_scale)))(x))
    ia, iw, io = eqn.replace("->", ",").split(",")
    for o, (dx, dw) in [(out, gaqt)] + ([(out_e, gaqt_e)] if eager else []):
        _assert_dot_bound(o, xq, wq, eqn)
        _assert_dot_bound(dw, xq, ct, f"{ia},{io}->{iw}")
        _assert_dot_bound(dx, ct, wq, f"{io},{iw}->{ia}", mask=mask)
    if act_scale:  # some activations are clipped, so the clipped STE was exercised
        assert bool((jnp.abs(x / act_scale) > 127.5).any())


def test_bf16_einsum_and_traced_act_scale():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((4, 64)).astype(BF16))
    w = jnp.asarray(rng.standard_normal((64, 32)).astype(BF16))
    s = jnp.float32(0.01)
    for fmt in FMTS:
        f = jax.jit(lambda x, w, s: A.aqt_einsum("bd,df->bf", x, w, weight_format=fmt,
                                                 in_axes=0, act_scale=s))
        ref = jax.jit(lambda x, w, s: _ref_einsum("bd,df->bf", x, w, fmt, 0, s))  # jit vs jit: see _check_einsum
        _assert_bitwise(f(x, w, s), ref(x, w, s))
    g = jax.grad(lambda s: jnp.sum(A.aqt_einsum("bd,df->bf", x, w, weight_format="int8",
                                                in_axes=0, act_scale=s)))(s)
    assert float(g) == 0.0  # AQT's custom VJP gives the static act scale no gradient


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="lax.reciprocal is not IEEE on GPU")
def test_stock_aqt_quantizer_matches_int_values():
    """AQT's own Quantizer.calculate_qvalue (QTensor.quant = x * lax.reciprocal(scale)) with
    our Calibration + numerics gives formats' int values on CPU (zero signs may differ). On
    XLA:GPU lax.reciprocal is off by 1 ulp for ~13% of scales, which moves codes at ties (seen
    on H200, jax 0.11.2): why FormatQuantizer uses formats._recip instead."""
    w = jnp.asarray(_weights(np.random.default_rng(3), 64, 16, -8))
    q = aqt_quantizer.Quantizer(
        numerics=A.GridNumerics(lo=-8, hi=7), calib_shared_axes=(0,), scale_stop_grad=True,
        calibration=A.SignedMaxCalibration, context=aqt_utils.Context(key=None, train_step=None))
    q.init_calibration()
    got = jax.jit(aqt_quantizer.make_fake_quant(q, calibration_axes=(0,)))(w)
    np.testing.assert_array_equal(got, F.int_fake_quant(w, bits=4, in_axis=0))


@pytest.mark.parametrize("bits", [4, 2])
def test_stock_int_symmetric_differs(bits):
    """Why custom numerics: AQT IntSymmetric clips to +-(2^(b-1)-1), never reaching lo."""
    num = int_numerics.IntSymmetric(bits=bits, preserve_zero=True, preserve_max_val=False,
                                    clip=True, round=True, noise_fn=None, clip_gradient=False)
    lo, _ = F.int_range(bits)
    q, _ = num.vjp_fwd(jnp.asarray([float(lo), lo + 0.4]), None)
    assert float(q[0]) == lo + 1 and float(q[1]) == lo + 1


def test_unsupported():
    x, w = jnp.ones((2, 8)), jnp.ones((8, 3, 5))
    with pytest.raises(NotImplementedError, match="rewrites an operand"):
        A.aqt_einsum("bd,dfg->bf", x, w, weight_format="int8", in_axes=0)
    with pytest.raises(KeyError):
        A.aqt_einsum("bd,df->bf", x, w[:, :, 0], weight_format="q8_0", in_axes=0)
    with pytest.raises(ValueError, match="dtype"):
        A.aqt_einsum("bd,df->bf", x.astype(jnp.bfloat16), w[:, :, 0], weight_format="int8",
                     in_axes=0)
