"""What every exporter shares: reading a trained student, the HF-oriented view of its tensors, the
packed layout of each weight format (one definition for writers, loaders and byte reports), and the
on-disk frame of our Orbax exports (export.json + model_config.json + tensors/ + tokenizer).

Student checkpoint convention (a gemma-qat model checkpoint, see model/checkpoint.py):
  DIR/params/, DIR/model_config.json, DIR/meta.json  -- meta["recipe"] = Recipe.to_dict() (optional:
      a `recipe` override names a preset when meta has none), meta["step"] = training step (optional);
  DIR/quant_scales.json  -- optional, the static activation scales (`quant_scales` collection) as
      nested JSON numbers, e.g. {"layer_0": {"attn": {"q_einsum": {"w_in": 0.01, "w_out": 0.2}}}};
  DIR/quant_scales/      -- the same collection as an Orbax tree (used when there is no JSON file);
      both read and written by model/checkpoint.py (training writes them too).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from gemma_qat.hf.layout import tensor_maps
from gemma_qat.model.checkpoint import CONFIG_FILE, atomic_dir, load_model, load_quant_scales, read_meta
from gemma_qat.model.config import ModelConfig
from gemma_qat.model.params import abstract_params, flat_shapes
from gemma_qat.model.transformer import Transformer
from gemma_qat.quant import formats, pack
from gemma_qat.quant.policy import SCALES, RecipePolicy, weight_in_axes
from gemma_qat.quant.recipe import FLOAT, Recipe, Resolution, resolve, resolve_recipe

FORMAT_VERSION = 1
EXPORT_FILE = "export.json"
TENSORS_DIR = "tensors"


# ----------------------------------------------------------------------------- the student
def load_student(ckpt_dir, recipe: str | None = None):
    """-> (config, params, resolution, quant_scales). The recipe comes from meta["recipe"]; `recipe`
    (a preset name) is used only when meta has none, and must agree with it when both exist, since a
    student trained against one recipe exported under another would not be that student."""
    config, params = load_model(ckpt_dir)
    stored = read_meta(ckpt_dir).recipe
    resolution = None
    if stored is not None:
        rec = Recipe.from_dict(stored)
        if recipe is not None and recipe.lower() != rec.name.lower():
            raise ValueError(f"{ckpt_dir} was trained with recipe {rec.name!r}; --recipe {recipe!r} disagrees "
                             "(omit --recipe to use the checkpoint's own)")
        resolution = resolve(rec, config)
    elif recipe is not None:
        resolution = resolve_recipe(recipe, config)
    return config, params, resolution, load_quant_scales(ckpt_dir)


def require_recipe(resolution: Resolution | None, fmt: str, allowed: set[str], *, activations: set[str]):
    if resolution is None:
        raise ValueError(f"the checkpoint's meta.json has no recipe; pass --recipe (e.g. {fmt}) to export as {fmt}")
    bad = sorted({f for f in resolution.formats.values() if f != FLOAT and f not in allowed})
    if bad or resolution.recipe.activations not in activations:
        raise ValueError(f"format {fmt} cannot hold recipe {resolution.recipe.name!r} (weight formats {bad}, "
                         f"activations {resolution.recipe.activations!r}); choose the export format of that recipe")


def check_out(out, force: bool) -> Path:
    """Refuse early (before any work) to replace an existing output without force."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    return out


# ------------------------------------------------------------------ HF-oriented tensors and layout
def flat_params(params) -> dict[str, object]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def hf_arrays(config: ModelConfig, params):
    """Yields (TensorMap, hf_name, numpy array in HF [out, in] orientation), one HF tensor at a time,
    so a large model is moved to the host tensor by tensor."""
    flat = flat_params(params)
    for m in tensor_maps(config):
        w = np.asarray(flat[m.ours])
        for name, a in zip(m.hf, m.to_hf(w)):
            yield m, name, np.ascontiguousarray(a)


def channel_sizes(config: ModelConfig) -> dict[str, int]:
    """param path -> number of weights sharing one per-channel scale (product of its contraction
    axes). In the HF orientation every channel is a run of that many weights along the last axis
    (the PLE table [V, L·P] holds L channels of P per row), which is why one layout serves all."""
    shapes = flat_shapes(abstract_params(config))
    return {p: math.prod(shapes[p][a] for a in axes) for p, axes in weight_in_axes(config).items()}


def scale_name(hf_name: str) -> str:
    return hf_name + "_scale"  # model.x.weight -> model.x.weight_scale (HF "gemma" quantizer names)


def act_scale_name(hf_name: str, site: str) -> str:
    base = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else hf_name
    return f"{base}.{'input' if site == 'in' else 'output'}_activation_scale"


def packed_layout(fmt: str, hf_shape, dtype, channel: int | None) -> dict[str, tuple[tuple[int, ...], str]]:
    """{stored suffix ('' = the weight itself, '_scale'): (shape, dtype)} of one HF tensor in `fmt`.
    q4_0: uint8 [..., in/32·18] in GGUF block_q4_0 bytes. intB: codes packed along the last axis
    (int8 as int8, int4/int2 as uint8) + fp32 scales [..., in/channel]. float: as given."""
    lead, last = tuple(hf_shape[:-1]), int(hf_shape[-1])
    if fmt == FLOAT:
        return {"": (tuple(hf_shape), str(np.dtype(dtype)))}
    if fmt == "q4_0":
        if last % formats.Q4_0_BLOCK_SIZE:
            raise ValueError(f"Q4_0 needs an input axis that is a multiple of 32, got shape {tuple(hf_shape)}")
        return {"": (lead + (last // formats.Q4_0_BLOCK_SIZE * formats.Q4_0_BYTES_PER_BLOCK,), "uint8")}
    bits = formats.get_format(fmt).bits
    if not channel or last % channel:
        raise ValueError(f"{fmt}: last axis {last} is not a whole number of channels of {channel}")
    return {"": (lead + (pack.int_packed_nbytes(last, bits),), "int8" if bits == 8 else "uint8"),
            "_scale": (lead + (last // channel,), "float32")}


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def activation_scale_sites(config: ModelConfig, resolution: Resolution) -> dict[str, tuple[str, str]]:
    """collection key 'layer_0/attn/q_einsum/w_in' -> (param path, site) for every static activation
    scale the recipe's policy would create (found by an abstract init, no memory)."""
    if resolution.recipe.activations != "int8_static":
        return {}
    model = Transformer(config, quant=RecipePolicy(resolution, calibrating=True))
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    tree = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens).get(SCALES, {})
    out = {}
    for key in traverse_util.flatten_dict(tree):
        *mod, leaf = key
        name, site = leaf.rsplit("_", 1)
        out["/".join(key)] = ("/".join((*mod, name)), site)
    return out


# --------------------------------------------------------------------- our Orbax export frame
def stored_entry(role: str, a: np.ndarray) -> list:
    return [role, list(a.shape), str(a.dtype)]


def write_export(out, *, fmt: str, config: ModelConfig, tensors: dict[str, np.ndarray], manifest: dict,
                 resolution: Resolution, source: dict, tokenizer=None, force: bool = False) -> Path:
    """OUT/export.json, OUT/model_config.json, OUT/tensors/ (Orbax, flat {stored name: array}),
    OUT/<tokenizer file name>; atomic (checkpoint.atomic_dir)."""
    tok = Path(tokenizer) if tokenizer else None
    if tok is not None and not tok.is_file():
        raise FileNotFoundError(f"tokenizer file {tok} not found")
    with atomic_dir(out, force=force) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / TENSORS_DIR, tensors)
        ckptr.wait_until_finished()
        if tok is not None:
            shutil.copyfile(tok, tmp / tok.name)
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
        info = {"format": fmt, "format_version": FORMAT_VERSION, "recipe": resolution.recipe.to_dict(),
                "source": source, "tokenizer": tok.name if tok else None, "tensors": manifest}
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=1))
    return Path(out)


def read_export(path, fmt: str):
    """-> (config, export.json dict, {stored name: numpy array}); checks format and version."""
    path = Path(path)
    info_path = path / EXPORT_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{path} is not a gemma-qat export: {EXPORT_FILE} is missing")
    info = json.loads(info_path.read_text())
    if info.get("format") != fmt:
        raise ValueError(f"{path} holds format {info.get('format')!r}, not {fmt!r}")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {info.get('format_version')} is not {FORMAT_VERSION}; "
                         "re-export it with this gemma-qat version")
    config = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    tensors = {k: np.asarray(v) for k, v in ocp.StandardCheckpointer().restore((path / TENSORS_DIR).absolute()).items()}
    want = {n: (tuple(shape), dtype) for t in info["tensors"].values() for n, (_, shape, dtype) in t["stored"].items()}
    have = {n: (a.shape, str(a.dtype)) for n, a in tensors.items()}
    if want != have:
        bad = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
        raise ValueError(f"{path}: stored tensors do not match {EXPORT_FILE}: {bad[:5]}; the export is damaged")
    return config, info, tensors


def source_info(ckpt_dir) -> dict:
    meta = read_meta(ckpt_dir)
    return {"checkpoint": str(Path(ckpt_dir).absolute()), "step": meta.step, "kind": meta.kind}


def warn_uncalibrated(resolution: Resolution, scales: dict) -> None:
    if resolution.recipe.activations == "int8_static" and not jax.tree.leaves(scales):
        warnings.warn("the recipe asks for static int8 activations but the checkpoint has no quant_scales: "
                      "the export runs them uncalibrated (pass-through), as the student did", stacklevel=3)


# ----------------------------------------------------------------------------- byte reports
COMPONENTS = ("embeddings", "ple", "attention", "mlp", "other_float", "scales")
_MLP = re.compile(r"layer_\d+/mlp2?/(gating_einsum|linear)/w")


def component(param_path: str, role: str) -> str:
    """Which line of the byte report a stored array counts towards. Scales (weight and activation)
    are one line; weights go by what they are, whatever their format."""
    if role != "weight":
        return "scales"
    if param_path == "embedder/input_embedding":
        return "embeddings"
    if "per_layer" in param_path and not param_path.endswith("/scale"):
        return "ple"  # PLE table, its model projection, per-layer gate/projection
    if "/attn/" in param_path and param_path.endswith("/w"):
        return "attention"
    if _MLP.fullmatch(param_path):
        return "mlp"
    return "other_float"  # norms, layer scalars, router


def planned_arrays(config: ModelConfig, resolution: Resolution, *, float_dtype=np.float32) -> list[dict]:
    """Every array an export of `config` under `resolution` stores, from shapes alone: dicts with
    name, param, format, role ('weight' | 'scale' | 'act_scale'), shape, dtype."""
    channels = channel_sizes(config)
    rows, acts = [], {}
    for key, (param, site) in activation_scale_sites(config, resolution).items():
        acts.setdefault(param, []).append(site)
    for m in tensor_maps(config):
        fmt = resolution.formats[m.ours]
        for name, shape in zip(m.hf, m.hf_shapes):
            for suffix, (shp, dt) in packed_layout(fmt, shape, float_dtype, channels.get(m.ours)).items():
                rows.append(dict(name=name + suffix, param=m.ours, format=fmt, shape=shp, dtype=dt,
                                 role="scale" if suffix else "weight"))
            for site in acts.get(m.ours, ()):
                rows.append(dict(name=act_scale_name(name, site), param=m.ours, format="act_int8", shape=(),
                                 dtype="float32", role="act_scale"))
    return rows


def byte_report(rows) -> dict:
    """{component: bytes} over COMPONENTS, plus total and a detail split (the PLE table's codes and
    its scales, which a runtime may leave on flash; bytes by weight format)."""
    out = {c: 0 for c in COMPONENTS}
    detail = {"ple_table": 0, "ple_table_scales": 0, "by_format": {}}
    for r in rows:
        n = nbytes(r["shape"], r["dtype"])
        out[component(r["param"], r["role"])] += n
        if r["role"] == "weight":
            detail["by_format"][r["format"]] = detail["by_format"].get(r["format"], 0) + n
        if r["param"] == "embedder/per_layer_embeddings":
            detail["ple_table" if r["role"] == "weight" else "ple_table_scales"] += n
    out["total"] = sum(out[c] for c in COMPONENTS)
    out["detail"] = detail
    return out


def stored_rows(info: dict) -> list[dict]:
    """The rows of planned_arrays, read back from an export's manifest."""
    rows = []
    for t in info["tensors"].values():
        for name, (role, shape, dtype) in t["stored"].items():
            rows.append(dict(name=name, param=t["param"], format=t["format"] if role != "act_scale" else "act_int8",
                             role=role, shape=tuple(shape), dtype=dtype))
    return rows
