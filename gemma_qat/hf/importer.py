"""Import a Hugging Face Gemma 4 checkpoint folder (config.json + safetensors) into our tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import traverse_util
from safetensors import safe_open

from gemma_qat.hf.layout import config_from_hf, ignored_hf_names, tensor_maps
from gemma_qat.model.config import ModelConfig

# Multimodal checkpoints (Gemma4ForConditionalGeneration) keep the text decoder under
# `model.language_model.`; towers and their projections are skipped.
_MM_TEXT_PREFIX = "model.language_model."
_SKIPPED_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
                     "model.multi_modal_projector.")
_FLOAT_DTYPES = {"bfloat16", "float16", "float32"}


def _index(hf_dir: Path) -> dict[str, Path]:
    """Tensor name → safetensors file, from `model.safetensors.index.json` or the single file."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: hf_dir / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"{f} is listed in {index.name} but missing; re-download the checkpoint")
        return files
    single = sorted(hf_dir.glob("*.safetensors"))
    if not single:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir} (and no model.safetensors.index.json)")
    files = {}
    for f in single:
        files.update({k: f for k in _open(f).keys()})
    return files


def _open(path: Path):
    try:
        return safe_open(path, framework="flax")
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-download or re-save it") from None


def _text_name(name: str) -> str | None:
    """Canonical text-decoder name (`model.…`), or None for tensors we skip."""
    if name.startswith(_MM_TEXT_PREFIX):
        return "model." + name[len(_MM_TEXT_PREFIX):]
    if name.startswith(_SKIPPED_PREFIXES) or name == "lm_head.weight":  # the head is tied to embed_tokens
        return None
    return name


def read_hf_config(hf_dir) -> ModelConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: HF_DIR must be a Hugging Face Gemma 4 checkpoint folder")
    return config_from_hf(json.loads(path.read_text()), name=Path(hf_dir).name)


def load_hf(hf_dir, *, dtype=None) -> tuple[ModelConfig, dict]:
    """(config, params) from a HF folder. Checks every tensor name, shape and dtype against the
    config; any problem is reported in one error naming the tensors."""
    hf_dir = Path(hf_dir)
    config = read_hf_config(hf_dir)
    files = _index(hf_dir)
    by_text_name = {t: n for n in files if (t := _text_name(n)) is not None}
    maps = tensor_maps(config)
    wanted = {h for m in maps for h in m.hf}
    unknown = sorted(set(by_text_name) - wanted - ignored_hf_names(config))
    missing = sorted(wanted - set(by_text_name))
    if unknown or missing:
        raise ValueError(f"{hf_dir}: checkpoint does not match its config.json: "
                         f"missing tensors {missing[:10]}{' …' if len(missing) > 10 else ''}; "
                         f"unexpected tensors {unknown[:10]}{' …' if len(unknown) > 10 else ''}")
    handles = {}
    def read(text_name: str, shape) -> np.ndarray:
        name = by_text_name[text_name]
        f = files[name]
        if f not in handles:
            handles[f] = _open(f)
        arr = np.asarray(handles[f].get_tensor(name))
        if str(arr.dtype) not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {name} has dtype {arr.dtype}; expected one of {sorted(_FLOAT_DTYPES)} "
                             "(quantized HF checkpoints cannot be imported; use the BF16 release)")
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"tensor {name} has shape {tuple(arr.shape)}, config.json implies {tuple(shape)}")
        return arr

    flat = {}
    for m in maps:
        arrs = [read(h, s) for h, s in zip(m.hf, m.hf_shapes)]
        w = np.ascontiguousarray(m.to_ours(*arrs))
        flat[tuple(m.ours.split("/"))] = w.astype(dtype) if dtype is not None else w
    return config, traverse_util.unflatten_dict(flat)
