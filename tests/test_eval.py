"""Evaluation: metrics against an independent torch computation, candidates of every kind, recovery
arithmetic, the report folder, the sampler against repeated full forwards, and path errors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma_qat.cli import build_parser
from gemma_qat.data import build_python_corpus, train_sentencepiece
from gemma_qat.data.packing import pack_documents, stack_rows
from gemma_qat.eval import candidates as C
from gemma_qat.eval.generate import filter_logits, generate
from gemma_qat.eval.metrics import add_recovery, evaluate, layer_errors, quant_errors, recovery_ratio
from gemma_qat.eval import report as R
from gemma_qat.eval.report import write_report
from gemma_qat.export.orbax_q4_0 import export_q4_0
from gemma_qat.model.checkpoint import CheckpointMeta, save_model
from gemma_qat.model.config import get_config
from gemma_qat.model.transformer import Transformer
from gemma_qat.quant.policy import RecipePolicy
from gemma_qat.quant.recipe import resolve_recipe
from model_fixtures import calm_weights, to_params

MODEL = "tiny-31b"
SEQ, ROWS = 24, 3


@functools.lru_cache(maxsize=None)
def _params(noise: float = 0.0):
    """Calm random weights (tests/model_fixtures.py) with a tied embedding of N(0, 0.1²) — a larger
    one lets the residual copy of the input dominate, and greedy decoding then repeats the last
    token, which would make the sampler test weak. `noise` multiplies every tensor by
    (1 + noise·N(0, 1)) to make a distinct candidate."""
    cfg, flat = calm_weights(MODEL, embed_std=0.1)
    if noise:
        noisy = np.random.default_rng(1)
        flat = {k: w * (1 + noise * noisy.standard_normal(w.shape)) for k, w in flat.items()}
    return cfg, to_params(flat)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens, positions=None, segment_ids=None):
    """Full [B, T, V] logits of the model itself (the reference side of the tests)."""
    return model.apply({"params": params}, tokens, positions, segment_ids)


def _batches():
    """Packed rows with several documents, a document split across rows and an all-padding row."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 512, n).tolist() for n in (10, 5, 30, 3, 13, 7)]
    rows = pack_documents(docs, SEQ)
    return [stack_rows(rows[i:i + ROWS], ROWS, SEQ) for i in range(0, len(rows), ROWS)]


def _ckpt(tmp_path, name, params, meta):
    return save_model(tmp_path / name, params, get_config(MODEL), meta=CheckpointMeta(param_dtype="float32", **meta))


def _torch_reference(t_logits, c_logits, batches):
    """Masked PPL, KL(t‖c) mean/std/s.e. and top-1 in float64 torch, from full logits."""
    kl, ce, agree = [], [], []
    for t, c, b in zip(t_logits, c_logits, batches):
        t, c = torch.tensor(np.asarray(t), dtype=torch.float64), torch.tensor(np.asarray(c), dtype=torch.float64)
        m = torch.tensor(b["loss_mask"]).bool()
        lt, lc = torch.log_softmax(t, -1), torch.log_softmax(c, -1)
        kl.append((lt.exp() * (lt - lc)).sum(-1)[m])
        ce.append(-lc.gather(-1, torch.tensor(b["targets"]).long()[..., None])[..., 0][m])
        agree.append((c.argmax(-1) == t.argmax(-1)).double()[m])
    kl, ce, agree = torch.cat(kl), torch.cat(ce), torch.cat(agree)
    return {"ppl": float(ce.mean().exp()), "kl_mean": float(kl.mean()), "kl_std": float(kl.std()),
            "kl_sem": float(kl.std() / kl.numel() ** 0.5), "top1": float(agree.mean()), "tokens": kl.numel(),
            "kl_p99": float(torch.quantile(kl, 0.99)), "kl_p999": float(torch.quantile(kl, 0.999))}


def _full_logits(cfg, params, batches, quant=None):
    model = Transformer(cfg, quant=quant or C._NOQUANT)
    return [_apply(model, params, b["tokens"], b["positions"], b["segment_ids"]) for b in batches]


def test_metrics_match_independent_torch_computation():
    cfg, pt = _params()
    _, pc = _params(0.3)
    teacher = C.jax_candidate("teacher", "float", "mem", cfg, pt)
    cand = C.jax_candidate("noisy", "float", "mem", cfg, pc)
    batches = _batches()
    res = evaluate(teacher, [cand], batches, chunk_size=7)  # 7 ∤ 24: a padded last chunk
    rows = {r["name"]: r for r in res["rows"]}
    lt, lc = _full_logits(cfg, pt, batches), _full_logits(cfg, pc, batches)
    ref = _torch_reference(lt, lc, batches)
    assert res["tokens"] == ref["tokens"] == sum(int(b["loss_mask"].sum()) for b in batches)
    for k in ("ppl", "kl_mean", "kl_std", "kl_sem", "top1"):
        np.testing.assert_allclose(rows["noisy"][k], ref[k], rtol=2e-5, err_msg=k)
    for k in ("kl_p99", "kl_p999"):  # per-token values in fp32 against fp64: the tail within 1e-4
        np.testing.assert_allclose(rows["noisy"][k], ref[k], rtol=1e-4, err_msg=k)
    assert rows["noisy"]["kl_p999"] >= rows["noisy"]["kl_p99"] > rows["noisy"]["kl_mean"]
    assert 0.05 < rows["noisy"]["kl_mean"] and rows["noisy"]["top1"] < 1  # a real difference was measured
    self_ref = _torch_reference(lt, lt, batches)
    np.testing.assert_allclose(rows["teacher"]["ppl"], self_ref["ppl"], rtol=2e-5)
    assert rows["teacher"]["kl_mean"] == 0 and rows["teacher"]["top1"] == 1


def test_teacher_against_itself_and_undefined_recovery(tmp_path):
    cfg, p = _params()
    ck = _ckpt(tmp_path, "float", p, {"kind": "float"})
    teacher = C.load_candidate("teacher", ck)
    again = C.load_candidate("again", ck)
    assert again.kind == "float"
    res = evaluate(teacher, [again], _batches())
    row = res["rows"][1]
    assert row["kl_mean"] == 0 and row["kl_std"] == 0 and row["top1"] == 1 and row["ppl"] == res["rows"][0]["ppl"]
    assert row["recovery"] is None and "no PTQ" in row["recovery_note"] and res["ptq"] is None
    # a "PTQ" row identical to the teacher: the gap is 0, recovery is undefined rather than 0/0
    fake_ptq = C.jax_candidate("ptq", "ptq", "mem", cfg, p, recipe="q4_0")
    res = evaluate(teacher, [fake_ptq, again], _batches())
    assert all(r["recovery"] is None for r in res["rows"])
    assert "not worse" in res["rows"][2]["recovery_note"]


def test_ptq_candidate_is_the_fake_quant_policy(tmp_path):
    cfg, p = _params()
    res = resolve_recipe("q4_0", cfg)
    ptq = C.ptq_candidate("ptq", cfg, p, "q4_0")
    b = _batches()[0]
    h, table = ptq.hidden(b)
    ours = _full_logits(cfg, ptq.variables["params"], [b])[0]
    policy = _full_logits(cfg, p, [b], quant=RecipePolicy(res))[0]
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(policy))
    from gemma_qat.model.embed import logits_from_hidden  # and hidden+table is that same model's head
    np.testing.assert_allclose(logits_from_hidden(h, table, softcap=cfg.final_softcap), policy, rtol=1e-4, atol=1e-4)
    # a `gemma-qat quantize`-style checkpoint (kind ptq) loads as the same candidate
    ck = _ckpt(tmp_path, "ptq", ptq.variables["params"], {"kind": "ptq", "recipe": res.recipe.to_dict()})
    again = C.load_candidate("p2", ck)
    assert (again.kind, again.recipe) == ("ptq", "q4_0")
    np.testing.assert_array_equal(np.asarray(again.hidden(b)[0]), np.asarray(h))


def test_student_q4_0_export_and_gguf_candidates(tmp_path):
    cfg, p = _params(0.05)
    res = resolve_recipe("q4_0", cfg)
    ck = _ckpt(tmp_path, "student", p, {"kind": "qat", "recipe": res.recipe.to_dict()})
    student = C.load_candidate("qat", ck)
    assert (student.kind, student.recipe) == ("qat", "q4_0") and isinstance(student.model.quant, RecipePolicy)
    exported = C.load_candidate("q4", export_q4_0(ck, tmp_path / "q4"))
    assert exported.kind == "q4_0"
    batches = _batches()
    out = evaluate(student, [exported], batches)
    assert out["rows"][1]["kl_mean"] < 1e-9 and out["rows"][1]["top1"] == 1  # the export is the student
    llama_cpp = pytest.importorskip("llama_cpp")
    del llama_cpp
    from gemma_qat.export.gguf import export_gguf
    path = export_gguf(cfg, p, res, tmp_path / "s.gguf")
    gg = C.load_candidate("gguf", path, type_k=0, type_v=0)  # F32 KV cache: compare the weights only
    try:
        out = evaluate(student, [gg], batches)
    finally:
        gg.close()
    row = out["rows"][1]
    # llama.cpp also rounds matmul inputs to Q8_0 (see test_gguf), hence not ~0
    assert row["kind"] == "gguf" and row["kl_mean"] < 1e-3 and row["top1"] > 0.95, row


def test_recovery_ratio_arithmetic():
    assert recovery_ratio(12.0, 11.0, 10.0) == pytest.approx(0.5)
    assert recovery_ratio(12.0, 10.0, 10.0) == pytest.approx(1.0)
    assert recovery_ratio(12.0, 12.0, 10.0) == 0.0
    assert recovery_ratio(12.0, 13.0, 10.0) == pytest.approx(-0.5)  # worse than PTQ
    assert recovery_ratio(10.0, 10.5, 10.0) is None and recovery_ratio(9.0, 9.5, 10.0) is None
    rows = [dict(name="t", kind="float", recipe=None, ppl=10.0), dict(name="p4", kind="ptq", recipe="q4_0", ppl=14.0),
            dict(name="pm", kind="ptq", recipe="mobile", ppl=20.0), dict(name="m", kind="qat", recipe="mobile", ppl=12.5),
            dict(name="g", kind="gguf", recipe=None, ppl=11.0)]
    assert add_recovery(rows, reference="t") == "p4"
    r = {x["name"]: x for x in rows}
    assert r["m"]["recovery_vs"] == "pm" and r["m"]["recovery"] == pytest.approx(0.75)  # same recipe's PTQ
    assert r["g"]["recovery_vs"] == "p4" and r["g"]["recovery"] == pytest.approx(0.75)
    assert r["t"]["recovery"] == pytest.approx(1.0) and r["p4"]["recovery"] == 0.0


def test_quant_errors_and_report_folder(tmp_path):
    cfg, pt = _params()
    res = resolve_recipe("q4_0", cfg)
    teacher = C.jax_candidate("teacher", "float", "mem", cfg, pt)
    cands = [C.ptq_candidate("ptq-q4_0", cfg, pt, res), C.jax_candidate("qat-student", "qat", "mem", cfg,
                                                                       _params(0.05)[1], quant=RecipePolicy(res),
                                                                       recipe="q4_0")]
    results = evaluate(teacher, cands, _batches())
    errors = quant_errors(cfg, pt, res)
    assert len(errors) == len(res.quantized()) and errors[0]["rel_error"] >= errors[-1]["rel_error"] > 0
    w = np.asarray(pt["layer_0"]["mlp"]["linear"]["w"])
    from gemma_qat.quant.ptq import dequantized_params
    dq = np.asarray(dequantized_params(cfg, pt, res)["layer_0"]["mlp"]["linear"]["w"])
    e = next(x for x in errors if x["param"] == "layer_0/mlp/linear/w")
    assert e["rel_error"] == pytest.approx(np.linalg.norm(w - dq) / np.linalg.norm(w), rel=1e-4)
    assert [g["group"] for g in layer_errors(errors)] == [f"layer_{i}" for i in range(cfg.num_layers)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s, "kl": 0.5 / s, "top1_agree": 0.9})
                                               + "\n" for s in range(1, 6)))
    teacher_run = tmp_path / "teacher-run"  # trained on CE alone: kl and agreement logged as 0
    teacher_run.mkdir()
    (teacher_run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5 / s, "ce": 5 / s, "kl": 0.0})
                                                       + "\n" for s in range(1, 6)))
    curves = {"qat-student": run, "teacher": teacher_run}
    rows = {r["name"]: r for r in results["rows"]}
    assert R.curve_baselines(results, list(curves)) == {"qat-student": ("ptq-q4_0", rows["ptq-q4_0"]["kl_mean"])}
    out = write_report(tmp_path / "report", results, quant_errors=errors, curves=curves, quant_label="q4_0")
    md = (out / "report.md").read_text()
    for name in ("teacher", "ptq-q4_0", "qat-student"):
        assert f"| {name} |" in md
    assert "recovers" in md or "undefined" in md
    assert errors[0]["param"] in md
    saved = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["teacher", "ptq-q4_0", "qat-student"]
    for png in ("ptq_vs_qat.png", "quant_error_layers.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_generate_greedy_matches_repeated_full_forward():
    cfg, p = _params()
    cand = C.jax_candidate("t", "float", "mem", cfg, p)
    prompt = [2, 17, 300, 45, 9, 120, 33, 7, 80, 5]  # longer than the sliding window (8)
    n = 4
    got = generate(cand, prompt, max_new_tokens=n)
    seq, model = list(prompt), Transformer(cfg)
    for _ in range(n):  # independent reference: an unpadded forward over the growing sequence
        seq.append(int(np.argmax(np.asarray(_apply(model, p, jnp.asarray([seq], jnp.int32)))[0, -1])))
    assert got == seq[len(prompt):]
    assert len(set(got)) > 1, got  # a model that repeats one token would make this test weak
    i = next(j for j in range(1, n) if got[j] not in got[:j])
    assert generate(cand, prompt, max_new_tokens=n, eos_ids=[got[i]]) == got[: i + 1]  # stops at eos, kept
    # sampling restricted to the single most likely token is greedy, whatever the seed
    assert generate(cand, prompt, max_new_tokens=n, temperature=1.5, top_k=1, top_p=0.9, seed=3) == got
    z = filter_logits(jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05])), temperature=1.0, top_k=None, top_p=0.7)
    assert (np.asarray(z) > -1e29).tolist() == [True, True, False, False]
    z = filter_logits(jnp.asarray([1.0, 3.0, 2.0, 0.0]), temperature=2.0, top_k=2, top_p=None)
    np.testing.assert_allclose(np.asarray(z)[1:3], [1.5, 1.0])
    assert (np.asarray(z)[[0, 3]] < -1e29).all()
    with pytest.raises(ValueError, match="positions"):
        generate(cand, prompt, max_new_tokens=cfg.max_position)


def test_unknown_candidate_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.load_candidate("x", tmp_path / "missing")
    (tmp_path / "w.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="not a .gguf"):
        C.load_candidate("x", tmp_path / "w.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a gemma-qat checkpoint"):
        C.load_candidate("x", tmp_path / "empty")
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "export.json").write_text(json.dumps({"format": "hf-safetensors"}))
    with pytest.raises(ValueError, match="export format"):
        C.load_candidate("x", tmp_path / "st")
    for bad in ("noequals", "=path", "name="):
        with pytest.raises(ValueError, match="NAME=PATH"):
            C.parse_candidate_spec(bad)
    assert C.parse_candidate_spec("a=b=c") == ("a", "b=c")


def test_cli_eval_and_generate(tmp_path, capsys):
    train, _ = build_python_corpus(tmp_path / "data", max_bytes=16 * 1024)
    tok = train_sentencepiece([train], tmp_path / "sp", vocab_size=400)
    cfg, p = _params()
    teacher = _ckpt(tmp_path, "teacher", p, {"kind": "float"})
    res = resolve_recipe("q4_0", cfg)
    student = _ckpt(tmp_path, "student", _params(0.05)[1], {"kind": "qat", "recipe": res.recipe.to_dict()})
    parser = build_parser()
    args = parser.parse_args(["eval", "--teacher", str(teacher), "--candidates", f"qat={student}", "--ptq",
                              "--data", f"jsonl:{train}", "--tokenizer", str(tok),
                              "--seq-len", str(SEQ), "--batch-size", str(ROWS), "--batches", "2", "--report", str(tmp_path / "rep"), "--json"])
    assert args.fn(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out["rows"]] == ["teacher", "ptq-q4_0", "qat"] and out["batches"] == 2
    assert (tmp_path / "rep" / "report.md").is_file()
    args = parser.parse_args(["eval", "--teacher", str(teacher), "--candidates", f"x={tmp_path / 'nope'}",
                              "--data", f"jsonl:{train}", "--tokenizer", str(tok)])
    with pytest.raises(FileNotFoundError, match="nope"):
        args.fn(args)
    args = parser.parse_args(["generate", "--checkpoint", str(student), "--tokenizer", str(tok), "--prompt", "def",
                              "--chat", "--max-new-tokens", "4", "--json"])
    assert args.fn(args) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen["prompt"].startswith("<start_of_turn>user\ndef<end_of_turn>\n<start_of_turn>model\n")
    assert 1 <= len(gen["tokens"]) <= 4
