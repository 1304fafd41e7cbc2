"""Packed Q4_0 export (Orbax): every q4_0 weight as GGUF block_q4_0 bytes, the rest as stored.

Layout (EXPORT.md): tensors are named and oriented as the HF checkpoint (hf/layout.py `to_hf`), so every
matrix is row-major [out, in] with the contraction axis last. That is GGUF's orientation (ne0 = in)
and, for every projection of the model, the axis the Q4_0 fake-quant blocks run along (for the
attention output [N, H, D] the innermost contraction axis H, which is contiguous inside N·H). So the
stored uint8 [..., in/32·18] is byte for byte what a GGUF Q4_0 tensor holds, and dequantising it gives
exactly the values the student's forward pass saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import traverse_util

from gemma_qat.export import common
from gemma_qat.hf.layout import tensor_maps
from gemma_qat.model.config import ModelConfig
from gemma_qat.quant import pack
from gemma_qat.quant.recipe import FLOAT, Resolution

FORMAT = "gemma-qat/q4_0"


def export_q4_0(checkpoint, out, *, recipe: str | None = None, tokenizer=None, force: bool = False) -> Path:
    """Student checkpoint folder -> packed Q4_0 Orbax export at `out` (a folder)."""
    common.check_out(out, force)
    config, params, resolution, _ = common.load_student(checkpoint, recipe)
    return write_q4_0(out, config, params, resolution, source=common.source_info(checkpoint),
                      tokenizer=tokenizer, force=force)


def write_q4_0(out, config: ModelConfig, params, resolution: Resolution | None, *, source: dict | None = None,
               tokenizer=None, force: bool = False) -> Path:
    common.require_recipe(resolution, "q4_0", {"q4_0"}, activations={"none"})
    common.check_out(out, force)
    tensors, manifest = {}, {}
    for m, name, a in common.hf_arrays(config, params):
        fmt = resolution.formats[m.ours]
        if fmt == FLOAT:
            stored = a
        else:
            stored = pack.quantize_q4_0_rows(a)  # our quantizer (CPU backend), GGUF bytes
        (want_shape, want_dtype), = common.packed_layout(fmt, a.shape, a.dtype, None).values()
        assert stored.shape == want_shape and str(stored.dtype) == want_dtype, (name, stored.shape, want_shape)
        tensors[name] = stored
        manifest[name] = {"param": m.ours, "format": fmt, "shape": list(a.shape), "dtype": str(a.dtype),
                          "stored": {name: common.stored_entry("weight", stored)}}
    return common.write_export(out, fmt=FORMAT, config=config, tensors=tensors, manifest=manifest,
                               resolution=resolution, source=source or {}, tokenizer=tokenizer, force=force)


def load_q4_0(path, *, dtype=None) -> tuple[ModelConfig, dict]:
    """-> (config, params): our parameter tree (numpy) with every Q4_0 weight dequantised, in the
    student's parameter dtype (or `dtype`), i.e. exactly the weights the fake-quant student used."""
    config, info, tensors = common.read_export(path, FORMAT)
    return config, unflatten(config, info, lambda name, t: _dequant(tensors[name], t), dtype)


def _dequant(stored: np.ndarray, t: dict) -> np.ndarray:
    if t["format"] == FLOAT:
        return stored
    if t["format"] != "q4_0":
        raise ValueError(f"unexpected format {t['format']!r} in a Q4_0 export")
    out = pack.dequantize_q4_0_rows(stored)  # (q - 8)·f32(d): exact in fp32
    if list(out.shape) != t["shape"]:
        raise ValueError(f"Q4_0 tensor unpacks to {out.shape}, the manifest says {t['shape']}")
    return out


def unflatten(config: ModelConfig, info: dict, read, dtype=None) -> dict:
    """Our tree from per-HF-tensor float arrays: `read(hf_name, manifest entry)` -> HF-oriented array;
    each parameter is cast to the student's dtype (a bf16 student's fake-quant also ended in bf16)."""
    flat = {}
    for m in tensor_maps(config):
        entries = [info["tensors"][h] for h in m.hf]
        w = m.to_ours(*(read(h, t) for h, t in zip(m.hf, entries)))
        flat[tuple(m.ours.split("/"))] = np.ascontiguousarray(w).astype(dtype or entries[0]["dtype"])
    return traverse_util.unflatten_dict(flat)
