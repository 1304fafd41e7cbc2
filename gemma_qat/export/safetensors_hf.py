"""The "unquantized QAT checkpoint": the student's float (master) weights in the Hugging Face Gemma 4
layout, loadable by transformers.Gemma4ForCausalLM and by our own `import-hf`.

Names, shapes and the conversion are hf/layout.py tensor_maps `to_hf` (the same table the importer
reads with), so import-hf -> export is byte-identical in float32. Files are written by hand (8-byte
header length, JSON header, raw little-endian data; the safetensors format) because numpy has no
native bfloat16 and torch must not be a runtime dependency; shards are planned from shapes alone
and each tensor is moved to the host only while it is written.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from gemma_qat.export import common
from gemma_qat.hf.layout import config_to_hf, tensor_maps
from gemma_qat.model.checkpoint import atomic_dir
from gemma_qat.model.config import ModelConfig

FORMAT = "hf-safetensors"
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "uint8": "U8",
             "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL"}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB")
INDEX_FILE = "model.safetensors.index.json"


def export_safetensors(checkpoint, out, *, dtype: str = "bfloat16", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       recipe: str | None = None, tokenizer=None, force: bool = False) -> Path:
    """Student checkpoint folder -> HF folder (config.json, model*.safetensors [+ index])."""
    common.check_out(out, force)
    config, params, resolution, _ = common.load_student(checkpoint, recipe)
    info = {"recipe": resolution.recipe.to_dict() if resolution else None, "source": common.source_info(checkpoint)}
    return write_safetensors(out, config, params, dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer,
                             info=info, force=force)


def write_safetensors(out, config: ModelConfig, params, *, dtype: str = "bfloat16",
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer=None, info: dict | None = None,
                      force: bool = False) -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    common.check_out(out, force)
    tok = Path(tokenizer) if tokenizer else None
    if tok is not None and not tok.is_file():
        raise FileNotFoundError(f"tokenizer file {tok} not found")
    target = DTYPES[dtype]
    plan = [(name, tuple(shape)) for m in tensor_maps(config) for name, shape in zip(m.hf, m.hf_shapes)]
    shards = plan_shards([math.prod(s) * target.itemsize for _, s in plan], max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    arrays = common.hf_arrays(config, params)  # same order as `plan`
    weight_map = {}
    with atomic_dir(out, force=force) as tmp:
        for fname, idx in zip(names, shards):
            items = [(plan[i][0], plan[i][1], target) for i in idx]
            write_file(tmp / fname, items, (_next(arrays, plan[i][0]).astype(target) for i in idx))
            weight_map.update({plan[i][0]: fname for i in idx})
        if len(shards) > 1:
            total = sum(math.prod(s) * target.itemsize for _, s in plan)
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        (tmp / "config.json").write_text(json.dumps({**config_to_hf(config), "dtype": dtype}, indent=2))
        (tmp / common.EXPORT_FILE).write_text(json.dumps(
            {"format": FORMAT, "format_version": common.FORMAT_VERSION, "dtype": dtype,
             "tokenizer": tok.name if tok else None, **(info or {})}, indent=1))
        if tok is not None:
            (tmp / tok.name).write_bytes(tok.read_bytes())
    return Path(out)


def _next(arrays, name: str) -> np.ndarray:
    _, got, a = next(arrays)
    if got != name:  # plan and arrays both follow tensor_maps; a mismatch is a bug, not user error
        raise RuntimeError(f"tensor order drifted: planned {name}, got {got}")
    return a


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive tensors into shards of at most max_bytes (a larger tensor gets a shard alone)."""
    shards, cur, used = [], [], 0
    for i, n in enumerate(sizes):
        if cur and used + n > max_bytes:
            shards.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return shards + [cur] if cur else shards or [[]]


def write_file(path: Path, items, arrays) -> None:
    """items: [(name, shape, dtype)] fixing the header; arrays: the data in the same order."""
    header, offset = {}, 0
    for name, shape, dt in items:
        n = math.prod(shape) * np.dtype(dt).itemsize
        header[name] = {"dtype": ST_DTYPES[np.dtype(dt).name], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, shape, dt), a in zip(items, arrays):
            a = np.ascontiguousarray(a)
            if a.shape != tuple(shape) or a.dtype != np.dtype(dt):
                raise RuntimeError(f"{name}: got {a.shape} {a.dtype}, header says {shape} {dt}")
            f.write(a.tobytes())  # native order is little-endian on every platform JAX runs on


# Bytes per element of the safetensors dtype names, for the header's bounds checks.
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own bound on the JSON header


def read_header(path) -> tuple[dict, int]:
    """-> (header without __metadata__, file offset where the data starts). Every length is checked
    against the file before it is trusted: a truncated, cut or garbage file is one ValueError naming it."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file, or truncated: its header length {n} exceeds "
                             f"{'the file' if n <= _MAX_HEADER else 'the 100 MiB limit'} ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes, end = size - 8 - n, 0
    for name, h in header.items():
        try:
            a, b = (int(x) for x in h["data_offsets"])
            want = math.prod(int(x) for x in h["shape"]) * _ST_ITEMSIZE[h["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry {name!r}: {h!r}") from None
        if not 0 <= a <= b or b - a != want:
            raise ValueError(f"{path}: corrupt safetensors header: tensor {name!r} has offsets [{a}, {b}] for "
                             f"{want} bytes of {h['dtype']}{list(h['shape'])}")
        end = max(end, b)
    if end > data_bytes:
        raise ValueError(f"{path}: truncated: the header describes {end} bytes of tensor data, the file holds "
                         f"{data_bytes}")
    return header, 8 + n
