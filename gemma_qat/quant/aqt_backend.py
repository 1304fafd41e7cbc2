"""AQT (aqtp, `aqt.jax.v2`) backend for the weight formats of formats.py. Design notes: AQT.md.

AQT's DotGeneral (fwd + dlhs/drhs custom VJP), einsum, QTensor.dequant and TilingState run
the fake-quant; our numerics enter through AQT's extension points:
  * SignedMaxCalibration (Calibration): scale = signed max-|x| / numerics.get_quant_bound().
  * GridNumerics (AqtNumerics): the code grid ([lo, hi] round-half-even, or the Q4_0
    thresholds) and its VJP (plain STE for weights, clipped STE for activations).
  * FormatQuantizer (Quantizer) replaces what AQT hard-codes: QTensor.quant's
    x * lax.reciprocal(s) (not IEEE on XLA:GPU; 1/0 -> 1), one scale for codes and values
    (Q4_0 needs fp32 d for codes, fp16 d for values), and how calibration is fed (in_axes
    with Q4_0 tiles; a static activation scale that the backward pass also sees).
Fake-quantized values are bit-identical to formats.py; einsum outputs and gradients (dW, dx) are
bit-identical when both paths are compiled alike (both jitted or both eager), and within the fp32
dot bound otherwise (XLA picks dot kernels per program and host): AQT.md, tests/test_quant_aqt.py.
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from aqt.jax.v2 import aqt_dot_general as adg
from aqt.jax.v2 import aqt_quantizer, aqt_tensor, calibration, tiled_dot_general
from aqt.jax.v2 import utils as aqt_utils
from aqt.jax.v2.numerics import no_numerics, numerics

from gemma_qat.quant import formats as F

_F32 = jnp.float32
SUPPORTED_FORMATS = ("q4_0", "int8", "int4", "int2")


@aqt_utils.flax_slots_kw_only_dataclass
class SignedMaxCalibration(calibration.Calibration):
    """scale = (signed value of max |x| over shared_axes, first on ties) / quant_bound.

    With GridNumerics.get_quant_bound() == lo (= -2^(b-1), or -8 for Q4_0) this is
    formats' mx * (1/lo) / Q4_0's max / -8 (division by a power of two is exact).
    """

    def get_scale_and_bias_and_sparsity(self, x, shared_axes, numerics_, context=None):
        del context
        x = x.astype(_F32)
        axes = tuple(sorted(a % x.ndim for a in shared_axes))
        k = len(axes)
        xt = jnp.moveaxis(x, axes, tuple(range(x.ndim - k, x.ndim)))
        xt = xt.reshape(*xt.shape[: x.ndim - k], -1)
        imax = jnp.argmax(jnp.abs(xt), axis=-1, keepdims=True)
        mx = jnp.take_along_axis(xt, imax, axis=-1)[..., 0]
        scale = jnp.expand_dims(mx / np.float32(numerics_.get_quant_bound()), axes)
        return [scale], [], None


@aqt_utils.flax_slots_kw_only_dataclass
class GridNumerics(numerics.AqtNumerics):
    """Codes on [lo, hi]: clip(round_half_even(v)) or, with thresholds, Q4_0's
    count(v >= T_m) + lo (ggml's trunc(v + 8.5) without the FMA hazard)."""

    lo: int = aqt_utils.static_field()
    hi: int = aqt_utils.static_field()
    thresholds: tuple[float, ...] | None = aqt_utils.static_field(default=None)
    clip_gradient: bool = aqt_utils.static_field(default=False)
    dtype: object = aqt_utils.static_field(default=None)

    def get_dtype(self):
        return self.dtype

    def get_quant_bound(self):
        return float(self.lo)  # signed: the max-|x| element maps onto code lo

    def vjp_fwd(self, x, context):
        del context
        if self.thresholds is None:
            q = jnp.clip(jnp.round(x), self.lo, self.hi)
        else:
            q = jnp.zeros_like(x)
            for t in self.thresholds:
                q = q + (x >= np.float32(t)).astype(x.dtype)
            q = q + np.float32(self.lo)
        return (q if self.dtype is None else q.astype(self.dtype)), (x,)

    def vjp_bwd(self, res, grad):
        if self.clip_gradient:  # act_fake_quant_int8: zero outside [lo, hi]
            (v,) = res
            grad = jnp.where((v >= self.lo) & (v <= self.hi), grad, jnp.zeros_like(grad))
        return (grad, None)


@aqt_utils.flax_slots_kw_only_dataclass
class FormatQuantizer(aqt_quantizer.Quantizer):
    """aqt Quantizer whose calibrate/calculate_qvalue follow formats.py exactly."""

    in_axes: tuple[int, ...] = aqt_utils.static_field(default=())
    block: int | None = aqt_utils.static_field(default=None)  # Q4_0 tile along in_axes[0]
    dequant_scale_dtype: object = aqt_utils.static_field(default=None)  # Q4_0: float16
    fixed_scale: jax.Array | None = aqt_utils.dynamic_field(default=None)  # static act scale

    def calibrate(self, x, *, calibration_axes, tiling_state=None):
        if self.fixed_scale is not None:
            s = jnp.asarray(self.fixed_scale)
            s = s if jnp.issubdtype(s.dtype, jnp.floating) else s.astype(_F32)
            s = s.reshape((1,) * (x.ndim - s.ndim) + s.shape)
            return aqt_tensor.QTensor(qvalue=None, scale=[s], scale_t=None, bias=[],
                                      dequant_dtype=x.dtype)
        axes = self.in_axes or tuple(calibration_axes)
        if self.block is not None and tiling_state is None:
            if x.shape[axes[0]] % self.block:
                raise ValueError(f"Q4_0 needs in_axis size {x.shape[axes[0]]} to be a "
                                 f"multiple of {self.block}; shape={tuple(x.shape)}")
            tiling_state = tiled_dot_general.generate_tiling_state(
                x, [tiled_dot_general.AxisTiling(axis=axes[0], tile_size=self.block)])
        return aqt_quantizer.Quantizer.calibrate(
            self, x, calibration_axes=axes, tiling_state=tiling_state)

    def calculate_qvalue(self, x, qt):
        if isinstance(self.numerics, no_numerics.NoNumerics):
            return qt, None
        if qt.tiling_state is not None:
            x = qt.tiling_state.apply(x)
        x32, s = x.astype(_F32), qt.scale[0].astype(_F32)
        # formats: v = x * _recip(s) (correctly rounded 1/s, 0 for s == 0). Stock AQT
        # QTensor.quant uses lax.reciprocal (not IEEE on XLA:GPU) and maps 1/0 to 1.
        v = x32 * F._recip(s)  # pylint: disable=protected-access
        q, res = self.numerics.vjp_fwd(v, self.context)
        if self.fixed_scale is not None:  # act scale 0 = uncalibrated: x passes through
            live = s != 0
            q, s = jnp.where(live, q, x32), jnp.where(live, s, np.float32(1.0))
        if self.dequant_scale_dtype is not None:  # Q4_0: codes from fp32 d, values from fp16 d
            s = s.astype(self.dequant_scale_dtype).astype(_F32)
        qt = qt.replace(qvalue=q, scale=[s])
        return qt, jax.tree_util.Partial(self.numerics.vjp_bwd, res)


def _quantizer(**kw) -> aqt_quantizer.Quantizer:
    return FormatQuantizer(calib_shared_axes=None, scale_stop_grad=True,
                           context=aqt_utils.Context(key=None, train_step=None), **kw)


def weight_quantizer(weight_format: str, in_axes) -> aqt_quantizer.Quantizer:
    """AQT Quantizer reproducing formats.get_format(weight_format).fake_quant(w, in_axes)."""
    F.get_format(weight_format)  # KeyError for unknown names
    if weight_format not in SUPPORTED_FORMATS:
        raise NotImplementedError(f"{weight_format!r} has no AQT mapping (see AQT.md)")
    axes = (in_axes,) if isinstance(in_axes, (int, np.integer)) else tuple(int(a) for a in in_axes)
    if weight_format == "q4_0":
        if len(axes) != 1:
            raise ValueError(f"Q4_0 needs exactly one in_axis, got {in_axes}")
        num = GridNumerics(lo=-8, hi=7, thresholds=tuple(float(t) for t in F._Q4_0_T))
        return _quantizer(numerics=num, calibration=SignedMaxCalibration, in_axes=axes,
                          block=F.Q4_0_BLOCK_SIZE,
                          dequant_scale_dtype=jnp.float16)
    lo, hi = F.int_range(int(weight_format[3:]))
    return _quantizer(numerics=GridNumerics(lo=lo, hi=hi),  # f32 codes keep -0 like formats
                      calibration=SignedMaxCalibration, in_axes=axes)


def _noop() -> aqt_quantizer.Quantizer:
    return aqt_quantizer.quantizer_make(None, initialize_calibration=False)


def act_quantizer(act_scale) -> aqt_quantizer.Quantizer:
    """Static per-tensor int8 (formats.act_fake_quant_int8); None = not quantized."""
    if act_scale is None:
        return _noop()
    return _quantizer(numerics=GridNumerics(lo=-128, hi=127, clip_gradient=True),
                      calibration=None, fixed_scale=act_scale)  # calibrate() uses the scale


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    # jnp.einsum's own call: precision=None (the config default), not AQT's Precision.DEFAULT
    del precision
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=None,
                               preferred_element_type=preferred_element_type)


def _raw(lhs_q, rhs_q, name) -> adg.DotGeneralRaw:
    fq = adg.Tensor(use_fwd_quant=False, dequant_mode=adg.DequantMode.THIS_INPUT)
    dgq = adg.DefaultDotGeneralQuantizer(lhs=lhs_q, rhs=rhs_q, lhs_mid=_noop(), rhs_mid=_noop())
    return adg.DotGeneralRaw(lhs=fq, rhs=fq, dg_quantizer=dgq, dg_accumulator_dtype=None,
                             local_aqt=None, jax_scope_name=name, dot_general=_dot_general)


def make_dot_general(weight_format: str, in_axes, act_scale=None, *,
                     weight_is_lhs: bool = False) -> adg.DotGeneral:
    """An aqt DotGeneral (lax.dot_general signature) fake-quantizing the weight operand.

    Backward: the transposed dot_generals re-quantize the *other* operand with the same
    quantizer (DequantMode.THIS_INPUT), so dW = g . act_fq(x) and dx = g . fq(w) exactly as
    autodiff of the formats.py path; the weight gets a plain STE, x the clipped STE.
    act_scale receives no gradient (AQT's custom VJP returns none for its config).
    """
    def quants():  # fresh Quantizer objects: AQT calls init_calibration once per object
        w, x = weight_quantizer(weight_format, in_axes), act_quantizer(act_scale)
        return (w, x) if weight_is_lhs else (x, w)

    fl, fr = quants()
    dlhs_r = quants()[1]  # dlhs = g . rhs_fq
    drhs_r = quants()[0]  # drhs = g . lhs_fq
    return adg.DotGeneral(fwd=_raw(fl, fr, "aqt_fwd"), dlhs=_raw(_noop(), dlhs_r, "aqt_dlhs"),
                          drhs=_raw(_noop(), drhs_r, "aqt_drhs"))


def aqt_einsum(eqn: str, x: jax.Array, w: jax.Array, *, weight_format: str, in_axes,
               act_scale=None) -> jax.Array:
    """jnp.einsum(eqn, act_fq(x), fake_quant(w)) with AQT doing both fake-quants.

    in_axes: w's contraction axes (the scale is shared along them, as in formats.py).
    act_scale: static per-tensor int8 activation scale (0 = pass-through) or None.
    x and w must have the same dtype (AQT's requirement). jit/grad work; act_scale gets
    no gradient (freeze it, or use formats.py for LSQ); no second-order gradients (AQT).
    """
    if x.dtype != w.dtype:
        raise ValueError(f"aqt_einsum needs x.dtype == w.dtype, got {x.dtype} vs {w.dtype}")
    x, w = jnp.asarray(x), jnp.asarray(w)

    def dg(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        del precision, preferred_element_type, kw
        if lhs is x and rhs is w:
            swapped = False
        elif lhs is w and rhs is x:
            swapped = True
        else:
            raise NotImplementedError(
                f"einsum {eqn!r} rewrites an operand before its dot_general (e.g. sums an "
                "axis only one side has); the weight could not be matched")
        cfg = make_dot_general(weight_format, in_axes, act_scale, weight_is_lhs=swapped)
        return cfg(lhs, rhs, dimension_numbers)

    return adg.einsum(eqn, x, w, dg=dg)


def aqt_fake_quant(w: jax.Array, *, weight_format: str, in_axes) -> jax.Array:
    """The weight as AQT dequantizes it (calibrate -> numerics -> QTensor.dequant)."""
    q = weight_quantizer(weight_format, in_axes)
    q.init_calibration()
    qt, _ = q.quant(w, calibration_axes=None)
    return qt.dequant()
