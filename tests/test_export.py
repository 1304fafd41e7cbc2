"""Exports: round trips per format on tiny models of each structural kind, GGUF-exact Q4_0 bytes, sizes
against theory, the E2B mobile size from shapes alone, the CLI's --force behaviour and inspect."""

import functools
import json
import sys

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from safetensors import safe_open

from gemma_qat.cli import build_parser
from gemma_qat.export import common, mobile, orbax_q4_0, safetensors_hf
from gemma_qat.export.inspect import format_inspect, inspect
from gemma_qat.hf.importer import load_hf
from gemma_qat.hf.layout import tensor_maps
from gemma_qat.model.checkpoint import SCALES_DIR, CheckpointMeta, load_quant_scales, save_model, save_quant_scales
from gemma_qat.model.config import E2B, get_config
from gemma_qat.model.inference import forward_logits
from gemma_qat.model.params import abstract_params
from gemma_qat.model.transformer import Transformer
from gemma_qat.quant import formats, pack
from gemma_qat.quant.policy import RecipePolicy, calibrate
from gemma_qat.quant.ptq import dequantized_params
from gemma_qat.quant.recipe import resolve_recipe
from hf_fixtures import hf_logits, save_text_model

Q40 = gguf.GGMLQuantizationType.Q4_0
TOKENS = np.random.default_rng(0).integers(0, 512, (1, 20)).astype(np.int32)  # > the tiny window (8)


@functools.lru_cache(maxsize=None)
def _random(name):
    """Random float32 parameters of the tiny variant, drawn in numpy on the abstract tree (no model
    init to compile); norms and scalars around 1 so that every tensor matters."""
    cfg = get_config(name)
    rng = np.random.default_rng(1)
    draw = lambda s: (1 + 0.2 * rng.standard_normal(s.shape) if len(s.shape) == 1 else
                      0.05 * rng.standard_normal(s.shape)).astype(np.float32)
    return cfg, jax.tree.map(lambda s: jnp.asarray(draw(s)), abstract_params(cfg))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """kind -> (HF folder, torch model); each kind is built once per module."""
    made = {}

    def get(kind):
        if kind not in made:
            d = tmp_path_factory.mktemp(f"hf-{kind}")
            made[kind] = (d, save_text_model(kind, d, seed=2))
        return made[kind]
    return get


def _student(tmp_path, cfg, params, res=None, scales=None):
    meta = CheckpointMeta(param_dtype="float32", step=42, recipe=res.recipe.to_dict() if res else None)
    ck = save_model(tmp_path / "student", params, cfg, meta=meta)
    if scales is not None:
        save_quant_scales(ck, scales)
    return ck


def _tokenizer(tmp_path):
    f = tmp_path / "tokenizer.model"
    f.write_bytes(b"\x0a\x03abc")
    return f


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _student_fn(cfg, res):
    return jax.jit(lambda p, s, t: Transformer(cfg, quant=RecipePolicy(res)).apply({"params": p, "quant_scales": s}, t))


@pytest.mark.parametrize("source", ["tiny-e2b", "tiny-31b", "tiny-26b-a4b", "hf-dense"])
def test_q4_0_round_trip_is_exact_and_gguf_byte_equal(tmp_path, source, hf_model):
    if source.startswith("hf-"):
        cfg, params = load_hf(hf_model("dense")[0])
        ck = _student(tmp_path, cfg, params)  # imported float model: no recipe in meta, given on export
    else:
        cfg, params = _random(source)
        ck = _student(tmp_path, cfg, params, resolve_recipe("q4_0", cfg))
    res = resolve_recipe("q4_0", cfg)
    out = orbax_q4_0.export_q4_0(ck, tmp_path / "q4", recipe="q4_0", tokenizer=_tokenizer(tmp_path))
    cfg2, deq = orbax_q4_0.load_q4_0(out)
    assert cfg2 == cfg

    # The student's program gives identical logits on the loaded weights (they are its fake-quant
    # values and fake-quant is idempotent on them); the plain float program agrees up to XLA's
    # fusion-dependent fp32 summation order.
    student = _student_fn(cfg, res)
    ref = np.asarray(student(params, {}, TOKENS))
    np.testing.assert_array_equal(np.asarray(student(deq, {}, TOKENS)), ref)
    if source == "hf-dense":
        plain = np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(deq, TOKENS))
        assert np.abs(plain - ref).max() <= 1e-5 * np.abs(ref).max()

    # Bytes: each Q4_0 tensor is gguf-py's quantizer output on the same HF-oriented float tensor, 18 B
    # per 32 weights, and the loaded weight is gguf-py's dequantisation of it (the values the student's
    # fake-quant computes, FORMATS.md); float tensors are stored and loaded unchanged.
    _, info, tensors = common.read_export(out, orbax_q4_0.FORMAT)
    flat = common.flat_params(deq)
    loaded = {n: a for m in tensor_maps(cfg) for n, a in zip(m.hf, m.to_hf(np.asarray(flat[m.ours])))}
    n_q4 = 0
    for _, name, a in common.hf_arrays(cfg, params):
        if info["tensors"][name]["format"] == "q4_0":
            n_q4 += 1
            ref_bytes = gguf.quants.quantize(a.astype(np.float32), Q40)
            np.testing.assert_array_equal(tensors[name], ref_bytes)
            np.testing.assert_array_equal(loaded[name], gguf.quants.dequantize(ref_bytes, Q40))
            assert tensors[name].nbytes == a.size // 32 * 18
        else:
            np.testing.assert_array_equal(tensors[name], a)
            np.testing.assert_array_equal(loaded[name], a)
    assert n_q4 > 0
    assert info["format_version"] == common.FORMAT_VERSION and info["source"]["step"] == 42
    assert info["recipe"] == res.recipe.to_dict() and (out / info["tokenizer"]).read_bytes() == b"\x0a\x03abc"


def test_mobile_round_trip_with_activation_scales(tmp_path):
    cfg, params = _random("tiny-e2b")
    res = resolve_recipe("mobile", cfg)
    scales = calibrate(cfg, params, res, [{"tokens": TOKENS}])
    ck = _student(tmp_path, cfg, params, res, scales)
    _assert_trees_equal(load_quant_scales(ck), scales)  # the quant_scales.json convention
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "alt" / SCALES_DIR, scales)  # ... and the Orbax one
    ckptr.wait_until_finished()
    _assert_trees_equal(load_quant_scales(tmp_path / "alt"), scales)
    out = mobile.export_mobile(ck, tmp_path / "mobile")
    cfg2, deq, scales2, res2 = mobile.load_mobile(out)
    assert cfg2 == cfg and res2.formats == res.formats
    _assert_trees_equal(scales2, scales)
    _assert_trees_equal(deq, jax.jit(lambda p: dequantized_params(cfg, p, res))(params))
    student = _student_fn(cfg, res)
    ref = np.asarray(student(params, scales, TOKENS))
    np.testing.assert_array_equal(np.asarray(student(deq, scales2, TOKENS)), ref)
    off = jax.tree.map(jnp.zeros_like, scales2)  # scale 0 = pass-through; same program, no recompile
    assert np.abs(ref - np.asarray(student(deq, off, TOKENS))).max() > 0  # activation scales are live

    # Packed at the bit width, per-channel fp32 scales; codes are the fake-quant's own.
    _, info, tensors = common.read_export(out, mobile.FORMAT)
    seen = set()
    for name, t in info["tensors"].items():
        if t["format"] == "float":
            continue
        bits = formats.get_format(t["format"]).bits
        w, s = tensors[name], tensors[name + "_scale"]
        assert w.shape[-1] == t["shape"][-1] * bits // 8 and s.dtype == np.float32
        assert s.shape == (*t["shape"][:-1], t["shape"][-1] // t["channel"])
        seen.add(t["format"])
    assert seen == {"int2", "int4", "int8"}
    assert tensors["model.embed_tokens_per_layer.weight_scale"].shape == (cfg.vocab_size, cfg.num_layers)
    emb = np.asarray(params["embedder"]["input_embedding"])
    q, _ = formats.int_quantize(emb, bits=2, in_axis=-1)
    np.testing.assert_array_equal(pack.unpack_int(tensors["model.embed_tokens.weight"], 2, cfg.d_model), q)

    # The byte report from shapes alone is the written export's.
    written = mobile.export_byte_report(out)
    assert mobile.mobile_byte_report(cfg, res.recipe, float_dtype=jnp.float32) == written
    assert written["total"] == sum(a.nbytes for a in tensors.values())


def test_e2b_mobile_bytes_from_shapes():
    """Full-size E2B text model, no weights. The recipe as written stores 2.007 GB (bf16 floats),
    over 1.1 GB: the int4 PLE table alone is V·L·P/2 = 1.17 GB (+ 37 MB of scales). Without it (a
    runtime can read its rows from flash per token, as Google's 0.84 GB text-only figure assumes)
    the export is 0.80 GB."""
    r = mobile.mobile_byte_report(E2B, float_dtype=jnp.bfloat16)
    v, d, n_layers, p = E2B.vocab_size, E2B.d_model, E2B.num_layers, E2B.ple_dim
    assert r["embeddings"] == v * d * 2 // 8  # int2 embedding, tied head
    assert r["detail"]["ple_table"] == v * n_layers * p // 2 and r["detail"]["ple_table_scales"] == v * n_layers * 4
    assert r["total"] == 2_006_857_438
    assert r["total"] - r["detail"]["ple_table"] - r["detail"]["ple_table_scales"] <= 1.1e9


@pytest.mark.parametrize("kind", ["e", "dense", "moe"])
def test_safetensors_round_trip_and_transformers_load(tmp_path, kind, hf_model):
    hf_dir, _ = hf_model(kind)
    cfg, params = load_hf(hf_dir)
    ck = _student(tmp_path, cfg, params)
    shard = 150_000 if kind == "dense" else safetensors_hf.DEFAULT_MAX_SHARD_BYTES
    out = safetensors_hf.export_safetensors(ck, tmp_path / "st", dtype="float32", max_shard_bytes=shard)
    assert (out / safetensors_hf.INDEX_FILE).is_file() == (kind == "dense")

    def read(folder):
        t = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="numpy") as h:
                t.update({k: h.get_tensor(k) for k in h.keys()})
        return t
    orig, ours = read(hf_dir), read(out)
    assert set(orig) == set(ours)
    for k in orig:
        assert orig[k].dtype == ours[k].dtype and orig[k].shape == ours[k].shape
        assert orig[k].tobytes() == ours[k].tobytes(), k

    model = transformers.Gemma4ForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = hf_logits(model, TOKENS)[0].numpy()
    assert np.abs(forward_logits(cfg, params, TOKENS[0].tolist()) - ref).max() <= 1e-4 * np.abs(ref).max()

    # Files are header + raw data exactly; inspect reports the same bytes.
    info = inspect(out)
    assert info["format"] == safetensors_hf.FORMAT and info["totals"]["tensors"] == len(orig)
    for f in out.glob("*.safetensors"):
        header, start = safetensors_hf.read_header(f)
        assert f.stat().st_size == start + sum(h["data_offsets"][1] - h["data_offsets"][0] for h in header.values())
    assert info["totals"]["bytes"] == sum(a.nbytes for a in orig.values())
    if kind == "dense":  # bf16 export: round-to-nearest-even of the fp32 weights
        out16 = safetensors_hf.export_safetensors(ck, tmp_path / "st16", dtype="bfloat16")
        _, p16 = load_hf(out16)
        _assert_trees_equal(p16, jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), params))


def test_cli_export_force_inspect_and_gguf(tmp_path, capsys, monkeypatch):
    cfg, params = _random("tiny-31b")
    ck = _student(tmp_path, cfg, params, resolve_recipe("q4_0", cfg))
    parser = build_parser()

    def run(*argv):
        args = parser.parse_args([str(a) for a in argv])
        return args.fn(args)

    out = tmp_path / "q4"
    assert run("export", "--checkpoint", ck, "--format", "q4_0", "--out", out) == 0
    (out / "marker").write_text("kept")
    with pytest.raises(FileExistsError, match="--force"):
        run("export", "--checkpoint", ck, "--format", "q4_0", "--out", out)
    assert (out / "marker").read_text() == "kept"  # refused before touching anything
    assert run("export", "--checkpoint", ck, "--format", "q4_0", "--out", out, "--force") == 0
    assert not (out / "marker").exists() and orbax_q4_0.load_q4_0(out)[0] == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    with pytest.raises(ValueError, match="cannot hold"):
        run("export", "--checkpoint", ck, "--format", "mobile", "--out", tmp_path / "m")
    with pytest.raises(ValueError, match="disagrees"):
        run("export", "--checkpoint", ck, "--format", "q4_0", "--out", tmp_path / "x", "--recipe", "mobile")

    monkeypatch.setitem(sys.modules, "gemma_qat.export.gguf", None)  # as if the GGUF writer were absent
    with pytest.raises(ValueError, match="GGUF export is not available"):
        run("export", "--checkpoint", ck, "--format", "gguf", "--out", tmp_path / "m.gguf")
    monkeypatch.undo()

    capsys.readouterr()
    run("inspect", out, "--json")
    info = json.loads(capsys.readouterr().out)
    by = info["totals"]["by_format"]
    assert info["format"] == orbax_q4_0.FORMAT and info["meta"]["source"]["step"] == 42
    assert by["q4_0"]["bits_per_weight"] == 4.5 and by["q4_0"]["bytes"] == by["q4_0"]["params"] // 32 * 18
    assert by["float"]["bytes"] == 4 * by["float"]["params"]
    assert info["totals"]["bytes"] == by["q4_0"]["bytes"] + by["float"]["bytes"]
    assert info["totals"]["file_bytes"] > 0.9 * info["totals"]["bytes"]
    run("inspect", out)
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in text and "4.500" in text

    # The packed blocks go into a GGUF file unchanged; inspect reads it back.
    _, tinfo, tensors = common.read_export(out, orbax_q4_0.FORMAT)
    name = "model.layers.0.self_attn.q_proj.weight"
    g = tmp_path / "one.gguf"
    w = gguf.GGUFWriter(g, "gemma4")
    w.add_tensor("blk.0.attn_q.weight", tensors[name], raw_dtype=Q40)
    w.add_tensor("output_norm.weight", tensors["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rows = {r["name"]: r for r in inspect(g)["tensors"]}
    assert rows["blk.0.attn_q.weight"]["shape"] == tinfo["tensors"][name]["shape"]
    assert rows["blk.0.attn_q.weight"]["bits_per_weight"] == 4.5 and rows["blk.0.attn_q.weight"]["format"] == "q4_0"
    data = next(t for t in gguf.GGUFReader(g).tensors if t.name == "blk.0.attn_q.weight").data
    assert np.asarray(data).tobytes() == tensors[name].tobytes()
    assert "gguf" in format_inspect(inspect(g))
