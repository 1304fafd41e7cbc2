"""Mobile export (Orbax): int2/int4/int8 per-channel weights packed at their bit width with fp32
scales, static int8 activation scales and quantized embeddings, per the recipe (FORMATS.md "Mobile").

Layout (EXPORT.md): HF names and [out, in] orientation (hf/layout.py `to_hf`), as the HF "gemma"
quantizer's checkpoints: `X.weight` packed codes along the last axis (int8: int8; int4: uint8, two
per byte, low nibble first, nibble = code+8; int2: uint8, four per byte, bits 1:0 first, crumb =
code+2), `X.weight_scale` fp32 [..., in/C] where C weights share a scale (C = the whole input axis,
so [out, 1]; for the PLE table [V, L·P] C = P, so [V, L]), and `X.input_activation_scale` /
`X.output_activation_scale` fp32 scalars. Float tensors stay in the student's dtype.

The byte report (`export_byte_report`, and `mobile_byte_report` from shapes alone) shares
`common.planned_arrays` with the writer, so the size we state for a full-size model without its
weights is the size the writer would produce.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gemma_qat.export import common
from gemma_qat.export.orbax_q4_0 import unflatten
from gemma_qat.hf.layout import tensor_maps
from gemma_qat.model.config import ModelConfig
from gemma_qat.quant import formats, pack
from gemma_qat.quant.recipe import FLOAT, Recipe, Resolution, resolve, resolve_recipe

FORMAT = "gemma-qat/mobile"
INT_FORMATS = {"int2", "int4", "int8"}
_CHUNK_ELEMS = 1 << 25  # rows quantised per call: bounds host/device memory on the PLE table


def export_mobile(checkpoint, out, *, recipe: str | None = None, tokenizer=None, force: bool = False) -> Path:
    """Student checkpoint folder (with its quant_scales) -> mobile Orbax export at `out`."""
    common.check_out(out, force)
    config, params, resolution, scales = common.load_student(checkpoint, recipe)
    return write_mobile(out, config, params, resolution, scales, source=common.source_info(checkpoint),
                        tokenizer=tokenizer, force=force)


def write_mobile(out, config: ModelConfig, params, resolution: Resolution | None, quant_scales: dict, *,
                 source: dict | None = None, tokenizer=None, force: bool = False) -> Path:
    common.require_recipe(resolution, "mobile", INT_FORMATS, activations={"none", "int8_static"})
    common.check_out(out, force)
    common.warn_uncalibrated(resolution, quant_scales)
    channels = common.channel_sizes(config)
    # scales of a recipe without static activations would be ignored by its policy: not exported
    acts = _act_scales_by_param(quant_scales) if resolution.recipe.activations == "int8_static" else {}
    tensors, manifest = {}, {}
    for m, name, a in common.hf_arrays(config, params):
        fmt = resolution.formats[m.ours]
        layout = common.packed_layout(fmt, a.shape, a.dtype, channels.get(m.ours))
        parts = {"": a} if fmt == FLOAT else _quantize(a, formats.get_format(fmt).bits, channels[m.ours])
        stored = {}
        for suffix, arr in parts.items():
            assert (arr.shape, str(arr.dtype)) == layout[suffix], (name, suffix, arr.shape, layout[suffix])
            tensors[name + suffix] = arr
            stored[name + suffix] = common.stored_entry("scale" if suffix else "weight", arr)
        for site, s in acts.get(m.ours, {}).items():
            key = common.act_scale_name(name, site)
            tensors[key] = np.asarray(s, np.float32).reshape(())
            stored[key] = common.stored_entry("act_scale", tensors[key])
        manifest[name] = {"param": m.ours, "format": fmt, "shape": list(a.shape), "dtype": str(a.dtype),
                          "channel": channels.get(m.ours), "stored": stored}
    unused = set(acts) - {m.ours for m in tensor_maps(config)}
    if unused:
        raise ValueError(f"quant_scales name parameters this model does not have: {sorted(unused)[:5]}")
    return common.write_export(out, fmt=FORMAT, config=config, tensors=tensors, manifest=manifest,
                               resolution=resolution, source=source or {}, tokenizer=tokenizer, force=force)


def _act_scales_by_param(quant_scales: dict) -> dict[str, dict[str, np.ndarray]]:
    """{'layer_0/attn/q_einsum/w': {'in': s, 'out': s}} from the `quant_scales` collection, whose
    leaves are named '<param>_<site>' inside the module (policy.RecipePolicy.activation)."""
    out: dict[str, dict] = {}
    for key, v in traverse_util.flatten_dict(quant_scales).items():
        *mod, leaf = key
        name, site = leaf.rsplit("_", 1)
        out.setdefault("/".join((*mod, name)), {})[site] = np.asarray(v)
    return out


def _quantize(a: np.ndarray, bits: int, channel: int) -> dict[str, np.ndarray]:
    """HF-oriented [..., in] -> {'': packed codes, '_scale': fp32 [..., in/channel]}, with the codes
    and scales of formats.int_quantize (the fake-quant's own core) on the CPU backend, in row chunks."""
    lead, last = a.shape[:-1], a.shape[-1]
    rows = a.reshape(-1, last // channel, channel)
    step = max(1, _CHUNK_ELEMS // max(1, last))
    codes, scales = [], []
    cpu = pack._cpu()
    for i in range(0, rows.shape[0], step):
        q, s = formats.int_quantize(jax.device_put(rows[i: i + step], cpu), bits=bits, in_axis=-1)
        codes.append(pack.pack_int(np.asarray(q).reshape(-1, last), bits))
        scales.append(np.asarray(s, np.float32).reshape(-1, last // channel))
    return {"": np.concatenate(codes).reshape(*lead, -1), "_scale": np.concatenate(scales).reshape(*lead, -1)}


def load_mobile(path, *, dtype=None):
    """-> (config, params, quant_scales, resolution). params: our tree (numpy) with every int weight
    dequantised (exactly the values the fake-quant student used, in its dtype); quant_scales: the
    static activation collection. Run it as the student: Transformer(config,
    quant=RecipePolicy(resolution)) with {'params': params, 'quant_scales': quant_scales}; the
    policy's weight fake-quant is the identity on these already-quantised values (idempotent)."""
    config, info, tensors = common.read_export(path, FORMAT)
    resolution = resolve(Recipe.from_dict(info["recipe"]), config)

    def read(name, t):
        if t["format"] == FLOAT:
            return tensors[name]
        bits = formats.get_format(t["format"]).bits
        shape, channel = t["shape"], t["channel"]
        q = pack.unpack_int(tensors[name], bits, shape[-1]).reshape(*shape[:-1], shape[-1] // channel, channel)
        s = tensors[name + "_scale"][..., None]
        cpu = pack._cpu()
        w = formats.int_dequantize(jax.device_put(q, cpu), jax.device_put(s, cpu))  # q·s in fp32, as the fake-quant
        return np.asarray(w).reshape(shape)

    params = unflatten(config, info, read, dtype)
    scales: dict = {}
    for t in info["tensors"].values():
        for key, (role, _, _) in t["stored"].items():
            if role == "act_scale":
                module, name = t["param"].rsplit("/", 1)
                site = "in" if key.endswith(".input_activation_scale") else "out"
                # k/v and gate/up share their layer's scales: every copy holds the same value
                scales[tuple(module.split("/")) + (f"{name}_{site}",)] = jnp.asarray(tensors[key], jnp.float32)
    return config, params, traverse_util.unflatten_dict(scales), resolution


# ------------------------------------------------------------------------------- byte reports
def export_byte_report(path) -> dict:
    """Bytes per component (common.COMPONENTS + total + detail) of a written mobile export."""
    info = json.loads((Path(path) / common.EXPORT_FILE).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mobile export (format {info.get('format')!r})")
    return common.byte_report(common.stored_rows(info))


def mobile_byte_report(config: ModelConfig, recipe: Recipe | str | None = None, *, float_dtype=jnp.bfloat16) -> dict:
    """The same report from shapes alone (abstract parameter tree, no weights): what a mobile export
    of `config` would store, with float tensors in `float_dtype` and activation scales for every
    quantized linear. Works for full-size configs on any machine."""
    resolution = (resolve(recipe, config) if isinstance(recipe, Recipe)
                  else resolve_recipe(recipe or "mobile", config))
    rows = common.planned_arrays(config, resolution, float_dtype=np.dtype(float_dtype))
    return common.byte_report(rows)


def format_byte_report(report: dict) -> str:
    total = report["total"]
    lines = [f"{c:12s} {report[c]:>15,d} B  {100 * report[c] / total:5.1f}%" for c in common.COMPONENTS]
    lines.append(f"{'total':12s} {total:>15,d} B  ({total / 1e9:.3f} GB)")
    d = report["detail"]
    lines.append(f"  of which PLE table {d['ple_table']:,d} B + its scales {d['ple_table_scales']:,d} B; "
                 f"without them {total - d['ple_table'] - d['ple_table_scales']:,d} B; by weight format: " +
                 ", ".join(f"{k} {v:,d}" for k, v in sorted(d["by_format"].items())))
    return "\n".join(lines)
