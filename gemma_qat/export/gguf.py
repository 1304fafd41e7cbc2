"""GGUF v3 export (arch `gemma4`) of a student that llama.cpp runs, with Q4_0 bytes from our quantizer.

Facts follow llama.cpp as vendored in llama-cpp-python 0.3.36 (`src/models/gemma4.cpp` for hparams
and tensor shapes, `conversion/gemma.py` Gemma4Model for what the converter writes, `llama-vocab.cpp`
for the `gemma4` tokenizer); tensor names come from gguf-py's gemma4 table. Tensors are laid out as
the HF checkpoint (hf/layout.py `to_hf`: [out, in], so ne0 = in), which is also GGUF's orientation;
Q4_0 tensors are packed by gemma_qat.quant.pack from the same codes the fake-quant trained against,
never re-quantised by gguf/llama.cpp.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gguf
import jax
import numpy as np
from flax import traverse_util

from gemma_qat.hf.layout import tensor_maps
from gemma_qat.model.config import ModelConfig
from gemma_qat.quant.pack import quantize_q4_0_rows
from gemma_qat.quant.recipe import FLOAT, Resolution

ARCH = "gemma4"
_T, _TT, _Q = gguf.MODEL_TENSOR, gguf.TokenType, gguf.GGMLQuantizationType
FLOAT_TYPES = {"f32": _Q.F32, "f16": _Q.F16, "bf16": _Q.BF16}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16}

# HF tensor (hf/layout.py names) → gguf tensor kind and suffix; `{}` in a key is the layer index.
_NAMES = {
    "model.embed_tokens.weight": (_T.TOKEN_EMBD, "weight"),
    "model.norm.weight": (_T.OUTPUT_NORM, "weight"),
    "model.embed_tokens_per_layer.weight": (_T.PER_LAYER_TOKEN_EMBD, "weight"),
    "model.per_layer_model_projection.weight": (_T.PER_LAYER_MODEL_PROJ, "weight"),
    "model.per_layer_projection_norm.weight": (_T.PER_LAYER_PROJ_NORM, "weight"),
    "input_layernorm.weight": (_T.ATTN_NORM, "weight"),
    "post_attention_layernorm.weight": (_T.ATTN_POST_NORM, "weight"),
    "layer_scalar": (_T.LAYER_OUT_SCALE, "weight"),
    "self_attn.q_proj.weight": (_T.ATTN_Q, "weight"),
    "self_attn.k_proj.weight": (_T.ATTN_K, "weight"),
    "self_attn.v_proj.weight": (_T.ATTN_V, "weight"),
    "self_attn.o_proj.weight": (_T.ATTN_OUT, "weight"),
    "self_attn.q_norm.weight": (_T.ATTN_Q_NORM, "weight"),
    "self_attn.k_norm.weight": (_T.ATTN_K_NORM, "weight"),
    "mlp.gate_proj.weight": (_T.FFN_GATE, "weight"),
    "mlp.up_proj.weight": (_T.FFN_UP, "weight"),
    "mlp.down_proj.weight": (_T.FFN_DOWN, "weight"),
    # dense layers: ffn_norm / post_ffw_norm around the MLP. MoE layers: ffn_norm and post_ffw_norm_1
    # around the parallel dense MLP, pre_ffw_norm_2 / post_ffw_norm_2 around the experts, post_ffw_norm
    # on their sum (gemma4.cpp).
    "pre_feedforward_layernorm.weight": (_T.FFN_PRE_NORM, "weight"),
    "post_feedforward_layernorm.weight": (_T.FFN_POST_NORM, "weight"),
    "post_feedforward_layernorm_1.weight": (_T.FFN_POST_NORM_1, "weight"),
    "pre_feedforward_layernorm_2.weight": (_T.FFN_PRE_NORM_2, "weight"),
    "post_feedforward_layernorm_2.weight": (_T.FFN_POST_NORM_2, "weight"),
    "router.proj.weight": (_T.FFN_GATE_INP, "weight"),
    "router.scale": (_T.FFN_GATE_INP, "scale"),
    "router.per_expert_scale": (_T.FFN_DOWN_EXP, "scale"),  # applied to each expert's output
    "experts.gate_up_proj": (_T.FFN_GATE_UP_EXP, "weight"),  # [E, 2F, D], gate rows first
    "experts.down_proj": (_T.FFN_DOWN_EXP, "weight"),
    "per_layer_input_gate.weight": (_T.PER_LAYER_INP_GATE, "weight"),
    "per_layer_projection.weight": (_T.PER_LAYER_PROJ, "weight"),
    "post_per_layer_input_norm.weight": (_T.PER_LAYER_POST_NORM, "weight"),
}
_ALWAYS_F32 = (_T.FFN_GATE_INP,)  # the router stays F32, as llama.cpp's converter keeps it


def gguf_name(hf_name: str) -> tuple[str, "gguf.MODEL_TENSOR"]:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    bid, key = (int(m.group(1)), m.group(2)) if m else (None, hf_name)
    if key not in _NAMES:
        raise ValueError(f"no gemma4 GGUF tensor for {hf_name!r}")
    kind, suffix = _NAMES[key]
    return f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.{suffix}", kind


def check_llama_cpp_compatible(c: ModelConfig) -> None:
    """llama.cpp reuses, for KV-shared layer i, the cache of layer first-1 (global) or first-2 (sliding)
    (`llama-model.cpp` reuse callback); our kv_source must agree or llama.cpp computes another model."""
    if c.num_kv_shared_layers:
        f = c.first_kv_shared_layer
        if f < 2 or c.layer_types[f - 2: f] != ("sliding", "global"):
            raise ValueError(f"{c.name}: llama.cpp needs the last two non-shared layers to be [sliding, global] "
                             f"in a KV-sharing model; got {c.layer_types[max(f - 2, 0): f]}")


def _numpy_params(params) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(params) if isinstance(params, dict) else params
    return {"/".join(k) if isinstance(k, tuple) else k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def gguf_tensors(config: ModelConfig, params, resolution: Resolution, float_type: str = "f32"):
    """[(gguf name, array, raw dtype)] in GGUF orientation; Q4_0 arrays are packed uint8 rows."""
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {sorted(FLOAT_TYPES)}, got {float_type!r}")
    if resolution.recipe.activations != "none":
        raise ValueError(f"recipe {resolution.recipe.name!r} quantizes activations ({resolution.recipe.activations}); "
                         "GGUF has no place for static activation scales")
    flat = _numpy_params(params)
    maps = tensor_maps(config)
    missing = sorted({m.ours for m in maps} - set(flat))
    extra = sorted(set(flat) - {m.ours for m in maps})
    if missing or extra:
        raise ValueError(f"params do not match {config.name!r}: missing {missing[:5]}, unexpected {extra[:5]}")
    out = []
    for m in maps:
        fmt = resolution.formats.get(m.ours)
        if fmt is None:
            raise ValueError(f"resolution of recipe {resolution.recipe.name!r} has no format for {m.ours}")
        if fmt not in (FLOAT, "q4_0"):
            raise ValueError(f"GGUF export writes q4_0 and float tensors; {m.ours} is {fmt!r}")
        for hf_name, shape, arr in zip(m.hf, m.hf_shapes, m.to_hf(flat[m.ours])):
            name, kind = gguf_name(hf_name)
            arr = np.ascontiguousarray(arr)
            if arr.shape != shape:
                raise ValueError(f"{m.ours}: {hf_name} has shape {arr.shape}, expected {shape}")
            if fmt == "q4_0":  # blocks of 32 along the last (input) axis = GGUF ne0
                out.append((name, quantize_q4_0_rows(arr), _Q.Q4_0))
            elif arr.ndim == 1 or kind in _ALWAYS_F32 or float_type == "f32":
                out.append((name, arr.astype(np.float32), _Q.F32))
            else:
                q = FLOAT_TYPES[float_type]
                out.append((name, gguf.quants.quantize(arr.astype(np.float32), q), q))
    # Proportional RoPE of global layers: ggml NEOX rotates n_rot = H pairs of θ^(-2i/H); factors of
    # 1e30 freeze the unrotated pairs (convert_hf_to_gguf Gemma4Model.generate_extra_tensors).
    n_rot = int(config.global_head_dim * config.global_rope_proportion / 2)
    freqs = np.array([1.0] * n_rot + [1e30] * (config.global_head_dim // 2 - n_rot), np.float32)
    out.append((f"{gguf.TENSOR_NAMES[_T.ROPE_FREQS]}.weight", freqs, _Q.F32))
    return out


def _write_hparams(w: gguf.GGUFWriter, c: ModelConfig) -> None:
    w.add_context_length(c.max_position)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.num_layers)
    ffn = [c.layer_ffn_dim(i) for i in range(c.num_layers)]
    w.add_feed_forward_length(ffn[0] if len(set(ffn)) == 1 else ffn)
    w.add_head_count(c.num_heads)
    kv = [c.layer_kv_heads(i) for i in range(c.num_layers)]
    w.add_head_count_kv(kv[0] if len(set(kv)) == 1 else kv)
    w.add_key_length(c.global_head_dim)  # llama.cpp: key/value_length = global layers, *_swa = sliding
    w.add_value_length(c.global_head_dim)
    w.add_key_length_swa(c.head_dim)
    w.add_value_length_swa(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern([t == "sliding" for t in c.layer_types])
    w.add_shared_kv_layers(c.num_kv_shared_layers)
    w.add_embedding_length_per_layer_input(c.ple_dim)  # read unconditionally by llama.cpp
    w.add_rope_freq_base(c.global_rope_theta)
    w.add_rope_freq_base_swa(c.local_rope_theta)
    w.add_rope_dimension_count(c.global_head_dim)  # partial rotation via the rope_freqs tensor
    w.add_rope_dimension_count_swa(c.head_dim)
    if c.final_softcap:
        w.add_final_logit_softcapping(c.final_softcap)
    if c.is_moe:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.top_k_experts)
        w.add_expert_feed_forward_length(c.expert_ffn_dim)


# ------------------------------------------------------------------------------------- vocabulary
def _minimal_vocab(n: int) -> dict:
    """Gemma-shaped BPE vocabulary of exactly n tokens: <pad> <eos> <bos> <unk>, 256 byte tokens,
    `▁` and printable ASCII, then pair merges of common letters, then <unusedK> padding."""
    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    toks = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + chars
    types = [_TT.CONTROL] * 3 + [_TT.UNKNOWN] + [_TT.BYTE] * 256 + [_TT.NORMAL] * len(chars)
    if n < len(toks) + 1:
        raise ValueError(f"the built-in vocabulary needs vocab_size >= {len(toks) + 1}, got {n}; pass a tokenizer")
    merges, letters = [], "▁etaoinshrdlucmfwypvbgkjqxz"
    for a in letters:
        for b in letters:
            if len(toks) < n:
                toks.append(a + b), types.append(_TT.NORMAL), merges.append(f"{a} {b}")
    return dict(tokens=toks, types=types, merges=merges, bos=2, eos=1, unk=3, pad=0)


def _sp_vocab(proto: bytes) -> dict:
    from sentencepiece import sentencepiece_model_pb2 as spb

    m = spb.ModelProto()
    m.ParseFromString(proto)
    toks = [p.piece for p in m.pieces]
    types = [int(p.type) for p in m.pieces]  # SentencePiece and GGUF share the 1..6 type numbering
    ids = {t: i for i, t in enumerate(toks) if types[i] == _TT.NORMAL}
    merges = []  # a piece's merges: every split into two normal pieces, ranked by the piece's id
    for t, i in ids.items():
        merges += [(i, ids[t[:k]], ids[t[k:]]) for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
    ts = m.trainer_spec
    return dict(tokens=toks, types=types, merges=[f"{toks[a]} {toks[b]}" for _, a, b in sorted(merges)],
                bos=ts.bos_id, eos=ts.eos_id, unk=ts.unk_id, pad=ts.pad_id)


def _hf_vocab(text: str) -> dict:
    j = json.loads(text)
    model = j["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json: gemma4 GGUF needs a BPE model, got {model.get('type')!r}")
    by_id = {i: (t, _TT.NORMAL) for t, i in model["vocab"].items()}
    for a in j.get("added_tokens", []):
        by_id[a["id"]] = (a["content"], _TT.CONTROL if a.get("special") else _TT.USER_DEFINED)
    n = max(by_id) + 1
    toks = [by_id.get(i, (f"<unused_gap{i}>", _TT.UNUSED))[0] for i in range(n)]
    types = [by_id.get(i, ("", _TT.UNUSED))[1] for i in range(n)]
    for i, t in enumerate(toks):
        if t == model.get("unk_token"):
            types[i] = _TT.UNKNOWN
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", t):  # byte-fallback pieces, wherever the json lists them
            types[i] = _TT.BYTE
    ids = {t: i for i, t in enumerate(toks)}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return dict(tokens=toks, types=types, merges=merges, bos=ids.get("<bos>", -1), eos=ids.get("<eos>", -1),
                unk=ids.get("<unk>", -1), pad=ids.get("<pad>", -1))


def load_vocab(tokenizer, vocab_size: int) -> dict:
    """tokens/types/merges/special ids of exactly vocab_size entries. `tokenizer`: None (built-in
    vocabulary), a path to tokenizer.model (SentencePiece) or tokenizer.json (HF BPE), or a
    gemma_qat.data.tokenizer.Tokenizer."""
    if tokenizer is None:
        return _minimal_vocab(vocab_size)
    if isinstance(tokenizer, (str, os.PathLike)):
        p = Path(tokenizer)
        v = _hf_vocab(p.read_text("utf-8")) if p.suffix == ".json" else _sp_vocab(p.read_bytes())
    else:
        state = tokenizer.__getstate__()  # gemma_qat.data.tokenizer.Tokenizer
        v = _sp_vocab(state["sp_proto"]) if state.get("sp_proto") else _hf_vocab(state["hf_json"])
    if len(v["tokens"]) > vocab_size:
        raise ValueError(f"tokenizer has {len(v['tokens'])} tokens, more than the model's vocab_size={vocab_size}")
    if not v["merges"]:
        raise ValueError("tokenizer yields no BPE merges; llama.cpp's gemma4 tokenizer requires them")
    taken = set(v["tokens"])
    pad = (t for t in (f"<unused{k}>" for k in range(vocab_size * 2)) if t not in taken)
    for _ in range(vocab_size - len(v["tokens"])):  # embedding rows past the tokenizer: unused tokens
        v["tokens"].append(next(pad)), v["types"].append(_TT.UNUSED)
    return v


def _write_vocab(w: gguf.GGUFWriter, v: dict) -> None:
    w.add_tokenizer_model("gemma4")  # llama.cpp: BPE on raw UTF-8 with ▁ for spaces and <0xXX> fallback
    w.add_token_list(v["tokens"])
    w.add_token_scores([0.0 if t != _TT.NORMAL else -float(i) for i, t in enumerate(v["types"])])
    w.add_token_types([int(t) for t in v["types"]])
    w.add_token_merges(v["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if v[key] is not None and 0 <= v[key] < len(v["tokens"]):
            add(int(v[key]))
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)


# ----------------------------------------------------------------------------------------- export
def export_gguf(config: ModelConfig, params, resolution: Resolution, out_path, *, tokenizer=None,
                force: bool = False, float_type: str = "f32", name: str | None = None) -> Path:
    """Write `params` (our tree) as a llama.cpp-loadable GGUF: tensors the recipe puts in q4_0 as
    Q4_0 bytes of our quantizer, the rest as `float_type` (f32/f16/bf16; 1-D tensors and the router
    always F32). Atomic (temp file + os.replace); refuses an existing file unless `force`."""
    out = Path(out_path)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True to overwrite")
    check_llama_cpp_compatible(config)
    tensors = gguf_tensors(config, params, resolution, float_type)
    vocab = load_vocab(tokenizer, config.vocab_size)
    any_q4 = any(q == _Q.Q4_0 for _, _, q in tensors)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_name(name or config.name)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if any_q4 else _FILE_TYPES[float_type])
        if any_q4:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_hparams(w, config)
        _write_vocab(w, vocab)
        for tname, arr, qtype in tensors:
            w.add_tensor(tname, arr, raw_dtype=None if qtype == _Q.F32 else qtype)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
