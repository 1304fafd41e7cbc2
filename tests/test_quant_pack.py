"""Byte layouts of gemma_qat.quant.pack; Q4_0 is checked against gguf.quants."""
import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gemma_qat.quant import formats as F
from gemma_qat.quant import pack as P

Q40 = gguf.GGMLQuantizationType.Q4_0


def _w(shape, seed=0, scale=0.02):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------- Q4_0
@pytest.mark.parametrize("shape", [(256, 1536), (3, 5, 64), (1, 32)])
def test_quantize_q4_0_rows_matches_gguf_bytes(shape):
    w = _w(shape, seed=len(shape))
    w[0, ..., :32] = 0.0  # an all-zero block
    raw = P.quantize_q4_0_rows(w, chunk_rows=7)  # ragged chunks must not matter
    ref = gguf.quants.quantize(w, Q40)
    assert raw.dtype == np.uint8 and raw.shape == ref.shape == (*shape[:-1], shape[-1] // 32 * 18)
    np.testing.assert_array_equal(raw, ref)
    np.testing.assert_array_equal(P.dequantize_q4_0_rows(raw), gguf.quants.dequantize(ref, Q40))


def test_quantize_q4_0_rows_bf16():
    w = _w((64, 256), seed=5).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(P.quantize_q4_0_rows(w), gguf.quants.quantize(w.astype(np.float32), Q40))


def test_q4_0_nibble_order_and_d_endianness():
    q = np.arange(32, dtype=np.uint8) % 16
    d = np.array([1.5], np.float16)
    raw = P.pack_q4_0(q[None], d)
    assert raw.shape == (18,)
    assert bytes(raw[:2]) == np.float16(1.5).tobytes() == b"\x00\x3e"  # little-endian fp16
    assert raw[2] == (q[0] | q[16] << 4) and raw[2 + 15] == (q[15] | q[31] << 4)
    q2, d2 = P.unpack_q4_0(raw)
    np.testing.assert_array_equal(q2[0], q)
    assert d2.dtype == np.float16 and d2[0] == d[0]


def test_unpack_q4_0_of_gguf_bytes_roundtrip():
    w = _w((16, 128), seed=6)
    ref = gguf.quants.quantize(w, Q40)
    q, d = P.unpack_q4_0(ref)
    assert q.shape == (16, 4, 32) and d.shape == (16, 4)
    np.testing.assert_array_equal(P.pack_q4_0(q, d), ref)
    qj, dj = F.q4_0_quantize(jnp.asarray(w), in_axis=-1)
    np.testing.assert_array_equal(q, np.asarray(qj))
    np.testing.assert_array_equal(d.view(np.uint16), np.asarray(dj).view(np.uint16))


def test_pack_q4_0_rejects_bad_input():
    with pytest.raises(ValueError):
        P.pack_q4_0(np.full((1, 32), 16, np.uint8), np.ones(1, np.float16))
    with pytest.raises(ValueError):
        P.quantize_q4_0_rows(np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError):
        P.unpack_q4_0(np.zeros((2, 20), np.uint8))


# ----------------------------------------------------------------- int2/int4/int8
def test_int_nibble_and_crumb_layout():
    q4 = np.array([[-8, 7, 0, -1]], np.int8)  # stored 0, 15, 8, 7
    np.testing.assert_array_equal(P.pack_int(q4, 4), [[0x00 | 15 << 4, 8 | 7 << 4]])
    q2 = np.array([[-2, -1, 0, 1, 1]], np.int8)  # stored 0,1,2,3 | 3 + pad code 0 (2)
    packed = P.pack_int(q2, 2)
    np.testing.assert_array_equal(packed, [[0 | 1 << 2 | 2 << 4 | 3 << 6, 3 | 2 << 2 | 2 << 4 | 2 << 6]])
    np.testing.assert_array_equal(P.unpack_int(packed, 2, 5), q2)
    q8 = np.array([[-128, 127, 0]], np.int8)
    p8 = P.pack_int(q8, 8)
    assert p8.dtype == np.int8
    np.testing.assert_array_equal(P.unpack_int(p8.view(np.uint8), 8, 3), q8)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n_in", [1536, 7])
def test_int_roundtrip_equals_fake_quant(bits, n_in):
    w = _w((48, n_in), seed=bits)
    w[5] = 0.0
    q, s = F.int_quantize(jnp.asarray(w), bits=bits, in_axis=-1)  # [out, in], [out, 1]
    raw = P.pack_int(np.asarray(q), bits)
    assert raw.shape == (48, -(-n_in * bits // 8)) == (48, P.int_packed_nbytes(n_in, bits))
    assert raw.dtype == (np.int8 if bits == 8 else np.uint8)
    q2 = P.unpack_int(raw, bits, n_in)
    np.testing.assert_array_equal(q2, np.asarray(q))
    back = np.asarray(F.int_dequantize(jnp.asarray(q2), jnp.asarray(np.asarray(s))))
    fq = np.asarray(F.int_fake_quant(jnp.asarray(w), bits=bits, in_axis=-1))
    np.testing.assert_array_equal(back, fq)
    if n_in == 1536:  # bytes on disk match bits_per_weight
        total_bits = (raw.nbytes + np.asarray(s).nbytes) * 8
        assert total_bits / w.size == F.FORMATS[f"int{bits}"].bits_per_weight(w.shape, -1)


def test_pack_int_rejects_out_of_range():
    with pytest.raises(ValueError):
        P.pack_int(np.array([2], np.int8), 2)
    with pytest.raises(ValueError):
        P.pack_int(np.array([-9], np.int8), 4)
    with pytest.raises(ValueError):
        P.unpack_int(np.zeros((3,), np.uint8), 4, 7)
