"""Evaluation candidates: one model, however it reaches us, behind one of two interfaces.

* JAX models (float teacher, PTQ baseline, QAT student, Q4_0 / mobile Orbax exports) expose
  `hidden(batch) -> (h [B, T, D], table [V, D])`: the final hidden states and the (fake-quantized)
  tied head, so metrics form fp32 logits chunk by chunk and never hold [B, T, V].
* GGUF files run in llama.cpp (optional `llama_cpp`) expose `logits_row(batch, b) -> [T, V]` fp32 for
  one row. llama.cpp attends causally over whatever it was fed, with no notion of our packed segments,
  so each segment (document chunk) of the row is evaluated on its own from position 0 — exactly what
  our segment-masked forward computes for it; padding rows/positions get zero logits (mask 0). One
  row's [T, V] is the size of llama.cpp's own logits buffer for that sequence, so nothing larger is
  held. llama.cpp runs with its own defaults (e.g. an F16 KV cache) unless `llama_kwargs` say
  otherwise: the artifact is measured as it would be deployed.

`load_candidate(name, path)` picks the loader from what PATH holds: a `.gguf` file, a folder with
export.json (format gemma-qat/q4_0 or gemma-qat/mobile), or a model checkpoint whose meta.json `kind`
is `ptq` (already-dequantized weights, run as float), has a recipe (QAT student: fake-quant through
RecipePolicy, plus its quant_scales), or neither (float model).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gemma_qat.model.checkpoint import CONFIG_FILE, load_model, read_meta
from gemma_qat.model.config import ModelConfig
from gemma_qat.model.layers import NoQuant
from gemma_qat.model.transformer import Transformer
from gemma_qat.quant.policy import SCALES, RecipePolicy
from gemma_qat.quant.ptq import dequantized_params
from gemma_qat.quant.recipe import Resolution, resolve_recipe

_NOQUANT = NoQuant()
_FORWARDS: dict = {}  # (config, policy key, dtype) -> jitted forward; candidates of one model share compiles


@dataclasses.dataclass
class Candidate:
    name: str
    kind: str  # float | ptq | qat | q4_0 | mobile | gguf
    source: str
    config: ModelConfig | None  # None only for GGUF (llama.cpp owns the architecture)
    recipe: str | None = None
    model: Transformer | None = None  # JAX kinds: the module and its variables (also used by generate)
    variables: dict | None = None
    logits_row: Callable[[dict, int], np.ndarray] | None = None  # GGUF kind
    close: Callable[[], None] | None = None

    @property
    def is_jax(self) -> bool:
        return self.model is not None

    @property
    def softcap(self) -> float | None:
        return self.config.final_softcap if self.config is not None else None

    def hidden(self, batch: dict):
        """(h [B, T, D], table [V, D]) for a batch dict with tokens/positions/segment_ids [B, T]."""
        if not self.is_jax:
            raise ValueError(f"candidate {self.name!r} ({self.kind}) has no JAX forward; use logits_row")
        fn = _forward(self.model)
        return fn(self.variables, *(jnp.asarray(batch[k], jnp.int32) for k in ("tokens", "positions", "segment_ids")))

    def info(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source, "recipe": self.recipe,
                "model": self.config.name if self.config is not None else None}


def _policy_key(quant) -> Any:
    if isinstance(quant, NoQuant):
        return None
    if isinstance(quant, RecipePolicy):
        return json.dumps(quant.resolution.recipe.to_dict(), sort_keys=True)
    return id(quant)  # an unknown policy: never shared


def _forward(model: Transformer):
    key = (model.config, _policy_key(model.quant), jnp.dtype(model.dtype).name)
    if key not in _FORWARDS:
        _FORWARDS[key] = jax.jit(lambda v, tok, pos, seg: model.apply(v, tok, pos, seg, return_hidden=True))
    return _FORWARDS[key]


def jax_candidate(name: str, kind: str, source: str, config: ModelConfig, params, *, quant=None,
                  quant_scales: dict | None = None, recipe: str | None = None, dtype=jnp.float32) -> Candidate:
    """A candidate from an in-memory parameter tree. `dtype` is the compute dtype (fp32 by default, so
    a bf16 checkpoint is scored on its own weights without adding bf16 activation rounding)."""
    quant = _NOQUANT if quant is None else quant
    variables = {"params": params}
    if quant_scales and jax.tree.leaves(quant_scales):  # absent scales = uncalibrated pass-through
        variables[SCALES] = quant_scales
    variables = jax.device_put(variables)  # once, not per batch
    return Candidate(name, kind, source, config, recipe, Transformer(config, quant=quant, dtype=dtype), variables)


def ptq_candidate(name: str, config: ModelConfig, params, recipe: str | Resolution, *, source: str = "",
                  dtype=jnp.float32) -> Candidate:
    """The PTQ baseline: the teacher's weights replaced by their dequantized recipe values, run as a
    float model (the same numbers the fake-quant policy computes with)."""
    res = recipe if isinstance(recipe, Resolution) else resolve_recipe(recipe, config)
    return jax_candidate(name, "ptq", source or f"PTQ {res.recipe.name}", config,
                         dequantized_params(config, params, res), recipe=res.recipe.name, dtype=dtype)


def from_checkpoint(name: str, path, *, recipe: str | None = None, dtype=jnp.float32) -> Candidate:
    """A gemma-qat model checkpoint: float teacher, PTQ (kind 'ptq') or QAT student (has a recipe)."""
    meta = read_meta(path)
    if meta.kind == "ptq":  # `gemma-qat quantize` output: weights already dequantized
        config, params = load_model(path)
        rec = (meta.recipe or {}).get("name")
        return jax_candidate(name, "ptq", str(path), config, params, recipe=rec, dtype=dtype)
    if meta.recipe is None and recipe is None:
        config, params = load_model(path)
        return jax_candidate(name, "float", str(path), config, params, dtype=dtype)
    from gemma_qat.export.common import load_student  # the exporters' reading of a student, shared

    config, params, res, scales = load_student(path, recipe)
    # The backend the student trained under (its run config): the same numbers, the same code path.
    backend = ((meta.run_config or {}).get("quant") or {}).get("backend", "formats")
    return jax_candidate(name, "qat", str(path), config, params, quant=RecipePolicy(res, backend=backend),
                         quant_scales=scales, recipe=res.recipe.name, dtype=dtype)


def from_export(name: str, path, *, dtype=jnp.float32) -> Candidate:
    """A gemma-qat Orbax export (Q4_0 or mobile), dequantized by its own loader. An export made from a
    PTQ checkpoint is that format's PTQ baseline: its kind is "ptq", so QAT rows of the same recipe
    get their recovery against it."""
    info = json.loads((Path(path) / "export.json").read_text())
    fmt = info.get("format")
    ptq = (info.get("source") or {}).get("kind") == "ptq"
    if fmt == "gemma-qat/q4_0":
        from gemma_qat.export.orbax_q4_0 import load_q4_0

        config, params = load_q4_0(path)
        # Q4_0 has no activation quantization: the dequantized weights are the whole student
        return jax_candidate(name, "ptq" if ptq else "q4_0", str(path), config, params,
                             recipe=info["recipe"]["name"], dtype=dtype)
    if fmt == "gemma-qat/mobile":
        from gemma_qat.export.mobile import load_mobile

        config, params, scales, res = load_mobile(path)
        # the policy re-applies the int8 activation fake-quant; its weight fake-quant is idempotent
        return jax_candidate(name, "ptq" if ptq else "mobile", str(path), config, params, quant=RecipePolicy(res),
                             quant_scales=scales, recipe=res.recipe.name, dtype=dtype)
    raise ValueError(f"candidate {name!r}: {path} holds export format {fmt!r}; evaluation reads "
                     "gemma-qat/q4_0 and gemma-qat/mobile exports (and GGUF files)")


def from_gguf(name: str, path, **llama_kwargs) -> Candidate:
    """A GGUF file through llama.cpp (llama-cpp-python). Segment-wise evaluation, see the module doc."""
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"candidate {name!r}: evaluating {path} needs llama-cpp-python "
                         "(CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install llama-cpp-python==0.3.36)") from None
    state: dict = {"llm": None, "n_ctx": 0}

    def llm_for(n: int):
        if state["llm"] is None or state["n_ctx"] < n:  # grow the context once, not per segment
            if state["llm"] is not None:
                state["llm"].close()
            n_ctx = max(64, n)
            kw = dict(n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)
            state["llm"], state["n_ctx"] = llama_cpp.Llama(model_path=str(path), **{**kw, **llama_kwargs}), n_ctx
        return state["llm"]

    def logits_row(batch: dict, b: int) -> np.ndarray:
        tokens, seg = np.asarray(batch["tokens"][b]), np.asarray(batch["segment_ids"][b])
        llm = llm_for(len(tokens))
        out = np.zeros((len(tokens), llm.n_vocab()), np.float32)  # [T, V]; padding stays 0 (mask 0)
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            llm.reset()
            llm.eval(tokens[idx].tolist())
            out[idx] = np.asarray(llm.scores[: len(idx)], np.float32)
        return out

    def close():
        if state["llm"] is not None:
            state["llm"].close()
            state["llm"] = None

    return Candidate(name, "gguf", str(path), None, logits_row=logits_row, close=close)


def parse_candidate_spec(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (name, path); the first '=' separates them (paths may contain '=')."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"candidate {spec!r} must be NAME=PATH, e.g. qat=runs/q4/model")
    return name.strip(), path.strip()


def load_candidate(name: str, path, *, recipe: str | None = None, dtype=jnp.float32, **llama_kwargs) -> Candidate:
    """Chooses the loader by what PATH contains (module doc). `recipe` only for a student checkpoint
    whose meta.json names none."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"candidate {name!r}: {p} does not exist")
    if p.is_file():
        if p.suffix == ".gguf":
            return from_gguf(name, p, **llama_kwargs)
        raise ValueError(f"candidate {name!r}: {p} is a file but not a .gguf; give a GGUF file, a gemma-qat "
                         "checkpoint folder (model_config.json) or an export folder (export.json)")
    if (p / "export.json").is_file():
        return from_export(name, p, dtype=dtype)
    if (p / CONFIG_FILE).is_file():
        return from_checkpoint(name, p, recipe=recipe, dtype=dtype)
    raise ValueError(f"candidate {name!r}: {p} is neither a gemma-qat checkpoint ({CONFIG_FILE}), an export "
                     "(export.json) nor a .gguf file")
