"""What an exported file or folder holds: format, every tensor (dtype, shape, bytes, bits per weight)
and totals. Reads headers and manifests only, never the tensor data, so it is instant on full-size
exports. Formats: our Orbax exports (q4_0, mobile), an HF safetensors folder or file, a GGUF file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from gemma_qat.export import common, mobile, orbax_q4_0, safetensors_hf


def inspect(path) -> dict:
    """-> {path, format, format_version, meta, tensors: [{name, format, dtype, shape, bytes,
    bits_per_weight}], totals: {tensors, params, bytes, bits_per_weight, by_format, file_bytes}}.
    For our Orbax exports a row is one logical weight: bytes include its per-channel scales, and the
    static activation scales are counted in totals.activation_scales."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        if p.suffix == ".gguf":
            out = _gguf(p)
        elif p.suffix == ".safetensors":
            out = _safetensors([p], {})
        else:
            raise ValueError(f"{p}: unknown file type (expected .gguf or .safetensors)")
    else:
        info_path = p / common.EXPORT_FILE
        try:
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        except ValueError as e:
            raise ValueError(f"{info_path}: not valid JSON ({e}); the export is damaged: export it again") from None
        if not isinstance(info, dict):
            raise ValueError(f"{info_path}: not a gemma-qat export manifest (a JSON object expected)")
        if info.get("format") in (orbax_q4_0.FORMAT, mobile.FORMAT):
            try:
                out = _orbax(info)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{info_path}: incomplete export manifest ({type(e).__name__}: {e}); export it "
                                 "again") from None
        elif sorted(p.glob("*.safetensors")):
            out = _safetensors(sorted(p.glob("*.safetensors")), info)
        else:
            raise ValueError(f"{p} is not an export this tool knows: no {common.EXPORT_FILE} of a gemma-qat "
                             "Orbax export and no *.safetensors")
    out["path"] = str(p)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    out["totals"] = _totals(out["tensors"], out.pop("extra_bytes", 0))
    out["totals"]["file_bytes"] = sum(f.stat().st_size for f in files)
    return out


def _row(name, fmt, dtype, shape, nbytes, params=None):
    params = math.prod(shape) if params is None else params
    return {"name": name, "format": fmt, "dtype": dtype, "shape": list(shape), "bytes": int(nbytes),
            "params": int(params), "bits_per_weight": 8 * nbytes / params if params else 0.0}


def _orbax(info: dict) -> dict:
    rows, acts, act_bytes = [], 0, 0
    for name, t in info["tensors"].items():
        parts = {role: (shape, dtype) for _, (role, shape, dtype) in t["stored"].items() if role != "act_scale"}
        nbytes = sum(common.nbytes(s, d) for s, d in parts.values())
        rows.append(_row(name, t["format"], parts["weight"][1], t["shape"], nbytes))
        for _, (role, shape, dtype) in t["stored"].items():
            if role == "act_scale":
                acts += 1
                act_bytes += common.nbytes(shape, dtype)
    meta = {"recipe": info["recipe"]["name"], "activations": info["recipe"].get("activations"),
            "source": info.get("source"), "tokenizer": info.get("tokenizer"),
            "activation_scales": {"count": acts, "bytes": act_bytes}}
    return {"format": info["format"], "format_version": info.get("format_version"), "meta": meta,
            "tensors": rows, "extra_bytes": act_bytes}


def _safetensors(files: list[Path], info: dict) -> dict:
    rows = []
    for f in files:
        header, _ = safetensors_hf.read_header(f)
        for name, h in header.items():
            a, b = h["data_offsets"]
            rows.append(_row(name, h["dtype"].lower(), h["dtype"], h["shape"], b - a))
    meta = {k: info[k] for k in ("dtype", "recipe", "source", "tokenizer") if k in info}
    meta["files"] = [f.name for f in files]
    return {"format": safetensors_hf.FORMAT, "format_version": info.get("format_version"), "meta": meta,
            "tensors": rows}


def _gguf(path: Path) -> dict:
    try:
        import gguf
    except ModuleNotFoundError:
        raise ValueError("reading GGUF files needs the `gguf` package (pip install gguf)") from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:  # the reader indexes its fields and shapes its tensors as it parses: a cut file fails there
        reader = gguf.GGUFReader(path)
    except (IndexError, ValueError, KeyError, OverflowError, struct.error) as e:
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:  # the reader maps tensor data lazily: a cut file shows in the offsets
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise ValueError(f"{path}: truncated: tensor {t.name!r} ends at byte {int(t.data_offset) + int(t.n_bytes)}, "
                             f"the file has {size}")
    rows = [_row(t.name, t.tensor_type.name.lower(), t.tensor_type.name, [int(x) for x in reversed(t.shape)],
                 int(t.n_bytes), int(t.n_elements)) for t in reader.tensors]  # GGUF lists ne0 (= in) first
    meta = {}
    for key in ("general.architecture", "general.name", "general.file_type"):
        field = reader.fields.get(key)
        if field is not None:
            meta[key] = field.contents() if hasattr(field, "contents") else str(field.parts[field.data[0]])
    return {"format": "gguf", "format_version": reader.fields["GGUF.version"].parts[-1].tolist()[0]
            if "GGUF.version" in reader.fields else None, "meta": meta, "tensors": rows}


def _totals(rows: list[dict], extra_bytes: int) -> dict:
    by: dict[str, dict] = {}
    for r in rows:
        b = by.setdefault(r["format"], {"tensors": 0, "params": 0, "bytes": 0})
        b["tensors"] += 1
        b["params"] += r["params"]
        b["bytes"] += r["bytes"]
    for b in by.values():
        b["bits_per_weight"] = 8 * b["bytes"] / b["params"] if b["params"] else 0.0
    params = sum(r["params"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows) + extra_bytes
    return {"tensors": len(rows), "params": params, "bytes": nbytes,
            "bits_per_weight": 8 * nbytes / params if params else 0.0, "by_format": by}


def format_inspect(info: dict, *, max_rows: int | None = None) -> str:
    """Human-readable table of `inspect`'s dict."""
    lines = [f"{info['path']}: {info['format']} (format version {info.get('format_version')})"]
    lines += [f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in info["meta"].items()]
    rows = info["tensors"] if max_rows is None else info["tensors"][:max_rows]
    width = max([len(r["name"]) for r in rows] + [4])
    lines.append(f"{'name':{width}s}  {'format':8s} {'stored':8s} {'shape':>20s} {'bytes':>14s} {'bpw':>7s}")
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"]) or "scalar"
        lines.append(f"{r['name']:{width}s}  {r['format']:8s} {r['dtype']:8s} {shape:>20s} {r['bytes']:>14,d} "
                     f"{r['bits_per_weight']:7.3f}")
    if len(rows) < len(info["tensors"]):
        lines.append(f"... {len(info['tensors']) - len(rows)} more tensors")
    t = info["totals"]
    for fmt, b in sorted(t["by_format"].items()):
        lines.append(f"{fmt:>10s}: {b['tensors']:5d} tensors {b['params']:>16,d} params {b['bytes']:>16,d} B "
                     f"{b['bits_per_weight']:7.3f} bpw")
    lines.append(f"{'total':>10s}: {t['tensors']:5d} tensors {t['params']:>16,d} params {t['bytes']:>16,d} B "
                 f"{t['bits_per_weight']:7.3f} bpw; on disk {t['file_bytes']:,d} B")
    return "\n".join(lines)
