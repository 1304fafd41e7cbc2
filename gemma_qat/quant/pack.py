"""Float <-> packed bytes (numpy) for GGUF Q4_0 and the mobile int2/int4/int8 layout.

Codes and scales come from gemma_qat.quant.formats, so exported bytes are produced
by the same quantizer the model was trained against. See FORMATS.md.
"""
from __future__ import annotations

import jax
import numpy as np

from gemma_qat.quant import formats

_QK = formats.Q4_0_BLOCK_SIZE
_BLOCK_BYTES = formats.Q4_0_BYTES_PER_BLOCK


# --------------------------------------------------------------------------- Q4_0
def pack_q4_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(q uint8 0..15 [..., nb, 32], d f16 [..., nb]) -> uint8 [..., nb*18].

    GGUF block_q4_0: little-endian fp16 d, then qs[j] = q[j] | q[j+16] << 4.
    """
    q = np.asarray(q)
    d = np.asarray(d, dtype=np.float16)
    if q.shape[-1] != _QK or q.shape[:-1] != d.shape:
        raise ValueError(f"expected q [..., nb, 32] and d [..., nb]; got {q.shape}, {d.shape}")
    if q.size and (q.min() < 0 or q.max() > 15):
        raise ValueError("Q4_0 codes must be in 0..15")
    q = q.astype(np.uint8)
    qs = q[..., : _QK // 2] | (q[..., _QK // 2:] << np.uint8(4))  # [..., nb, 16]
    db = np.ascontiguousarray(d.astype("<f2"))[..., None].view(np.uint8)  # [..., nb, 2]
    out = np.concatenate([db, qs], axis=-1)  # [..., nb, 18]
    return out.reshape(*d.shape[:-1], d.shape[-1] * _BLOCK_BYTES)


def unpack_q4_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [..., nb*18] -> (q uint8 [..., nb, 32], d f16 [..., nb])."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.shape[-1] % _BLOCK_BYTES:
        raise ValueError(f"last axis {raw.shape[-1]} is not a multiple of {_BLOCK_BYTES}")
    blocks = raw.reshape(*raw.shape[:-1], raw.shape[-1] // _BLOCK_BYTES, _BLOCK_BYTES)
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0].astype(np.float16)
    qs = blocks[..., 2:]
    q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)  # [..., nb, 32]
    return q, d


def _cpu():
    # the quantizer is backend-independent; CPU only bounds device memory. JAX_PLATFORMS may
    # exclude the CPU backend, then use the default device.
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return jax.devices()[0]


@jax.jit
def _q4_0_rows_jit(w):
    return formats.q4_0_quantize(w, in_axis=-1)


def quantize_q4_0_rows(w: np.ndarray, *, chunk_rows: int = 8192) -> np.ndarray:
    """w [..., in] (GGUF row-major [out, in]) -> uint8 [..., in/32*18], byte-exact GGUF Q4_0.

    Runs our JAX quantizer on the CPU backend (if present) in row chunks, bounding memory for
    embedding-sized tensors; the result does not depend on backend or chunking.
    """
    w = np.asarray(w)
    if w.ndim < 1 or w.shape[-1] % _QK:
        raise ValueError(f"Q4_0 rows need a last axis that is a multiple of 32; got {w.shape}")
    rows = w.reshape(-1, w.shape[-1])
    out = np.empty((rows.shape[0], w.shape[-1] // _QK * _BLOCK_BYTES), np.uint8)
    cpu = _cpu()
    for a in range(0, rows.shape[0], chunk_rows):
        q, d = _q4_0_rows_jit(jax.device_put(rows[a: a + chunk_rows], cpu))
        out[a: a + chunk_rows] = pack_q4_0(np.asarray(q), np.asarray(d))
    return out.reshape(*w.shape[:-1], out.shape[-1])


def dequantize_q4_0_rows(raw: np.ndarray) -> np.ndarray:
    """uint8 [..., nb*18] -> float32 [..., nb*32]."""
    q, d = unpack_q4_0(raw)
    cpu = _cpu()
    q, d = jax.device_put(q, cpu), jax.device_put(d, cpu)  # committed -> computed there
    return np.asarray(formats.q4_0_dequantize(q, d, in_axis=-1))


# ----------------------------------------------------------------- int2/int4/int8
def _per_byte(bits: int) -> int:
    formats.int_range(bits)  # validates bits
    return 8 // bits


def int_packed_nbytes(n: int, bits: int) -> int:
    """Bytes for n codes along the packed axis (rounded up to whole bytes)."""
    per = _per_byte(bits)
    return -(-n // per)


def pack_int(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes [..., n] -> packed [..., ceil(n*bits/8)] along the last axis.

    int8: the codes as int8. int4: uint8, two per byte, low nibble first, nibble =
    code + 8. int2: uint8, four per byte, bits 1:0 first, crumb = code + 2.
    A ragged tail is padded with code 0; unpack_int(.., n) drops it.
    """
    lo, hi = formats.int_range(bits)
    q = np.asarray(q)
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(f"int{bits} codes must lie in [{lo}, {hi}]")
    if bits == 8:
        return q.astype(np.int8)
    per = _per_byte(bits)
    n = q.shape[-1]
    pad = int_packed_nbytes(n, bits) * per - n
    u = (q.astype(np.int16) - lo).astype(np.uint8)  # offset-binary, 0..2^bits-1
    if pad:
        fill = np.full((*q.shape[:-1], pad), -lo, np.uint8)  # code 0
        u = np.concatenate([u, fill], axis=-1)
    u = u.reshape(*q.shape[:-1], -1, per)
    out = np.zeros(u.shape[:-1], np.uint8)
    for i in range(per):
        out |= u[..., i] << np.uint8(bits * i)
    return out


def unpack_int(raw: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_int: packed [..., nbytes] -> int8 codes [..., n]."""
    lo, _ = formats.int_range(bits)
    raw = np.asarray(raw)
    if raw.shape[-1] != int_packed_nbytes(n, bits):
        raise ValueError(f"{raw.shape[-1]} bytes cannot hold exactly n={n} int{bits} codes")
    if bits == 8:
        return raw.view(np.int8) if raw.dtype == np.uint8 else raw.astype(np.int8)
    per = _per_byte(bits)
    raw = raw.astype(np.uint8)
    mask = np.uint8((1 << bits) - 1)
    parts = [(raw >> np.uint8(bits * i)) & mask for i in range(per)]
    u = np.stack(parts, axis=-1).reshape(*raw.shape[:-1], -1)[..., :n]
    return (u.astype(np.int16) + lo).astype(np.int8)
