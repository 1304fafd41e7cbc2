"""The GPU benchmark scripts run end to end on CPU at tiny sizes, so a flag or a model change cannot
break them unnoticed between device sessions. Functional only: the timings here mean nothing."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from gemma_qat.model.params import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script: str, *args: str):
    """Runs benchmarks/<script> with args; returns its last `JSON ` line, parsed."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith("JSON ")]
    assert lines, out.stdout
    return json.loads(lines[-1][5:])


def test_bench_step_runs_a_tiny_moe_qat_teacher_step():
    (row,) = _run("bench_step.py", "--config", "tiny-26b-a4b", "--batch", "2", "--seq", "64", "--chunk", "32",
                  "--steps", "2", "--modes", "qat+teacher", "--remat", "weights", "--grouped", "blocked",
                  "--freeze-embeddings")
    assert (row["mode"], row["remat"], row["grouped"]) == ("qat+teacher", "weights", "blocked")
    assert math.isfinite(row["loss"]) and row["loss"] >= 0 and row["tokens_per_s"] > 0


def test_bench_step_times_the_pipeline_step():
    (row,) = _run("bench_step.py", "--config", "tiny-e2b", "--batch", "2", "--seq", "64", "--chunk", "32",
                  "--steps", "2", "--modes", "qat+teacher", "--pipeline")
    assert row["pipeline"] and row["mode"] == "qat+teacher"
    assert math.isfinite(row["loss"]) and row["loss"] >= 0 and row["tokens_per_s"] > 0


def test_bench_grouped_reports_small_errors():
    rows = _run("bench_grouped.py", "--tokens", "32", "--experts", "8", "--top-k", "2",
                "--impls", "blocked,ragged,blocked-nk")["rows"]
    assert [r["shape"] for r in rows] == ["gate_up", "down"]
    for r in rows:
        for impl in ("blocked", "ragged", "blocked-nk"):  # -nk: weights stored [G, N, K]
            errs = [r[impl][f"err_{t}"] for t in ("y", "dx", "dw")]
            assert all(0 < e < 1e-2 for e in errs), (impl, errs)  # bf16 against the fp32 product


def test_bench_q4_0_finds_the_kernel_bit_identical():
    row = _run("bench_q4_0.py", "--config", "tiny-e2b", "--reps", "1", "--limit", "12")
    assert row["weights"] == 12 and row["kernel_weights"] == 12
    assert row["mismatched"] == 0 and row["stress_mismatched"] == 0


@pytest.mark.parametrize("name", ["bench-1b", "e2b", "26b-a4b-4l"])
def test_the_peer_builds_the_model_we_benchmark(name):
    # bench_peer.py hands these fields to transformers for the peer's E2B and 26B-A4B-4l columns.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_peer import peer_config
    from bench_step import bench_config

    with torch.device("meta"):
        model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**peer_config(name)))
    hf_total = sum(p.numel() for n, p in model.named_parameters() if n != "lm_head.weight")  # tied head
    assert hf_total == count_params(bench_config(name))["total_params"]


def test_bench_loss_runs_both_paths_and_they_agree():
    out = _run("bench_loss.py", "--config", "tiny-e2b", "--batch", "1", "--seq", "64", "--chunk", "32", "--reps", "1")
    assert [r["loss"] for r in out["rows"]] == ["kl+ce", "ce"]
    for r in out["rows"]:
        assert abs(r["loss_pallas"] - r["loss_xla"]) <= 1e-5 * abs(r["loss_xla"])
        assert r["rel_dh"] < 5e-3 and r["rel_dtable"] < 5e-3


def test_hlo_liveness_lists_the_buffers_live_at_the_peak(tmp_path):
    import jax
    import jax.numpy as jnp

    # Three [256, 512] fp32 products feed one sum: at the peak all three are live, the inputs are not counted.
    def f(x, w):
        a, b, c = jnp.tanh(x @ w), jnp.sin(x @ w * 2), jnp.cos(x @ w * 3)
        return jnp.sum(a * b + b * c + c * a, axis=0)

    x, w = jnp.ones((256, 128)), jnp.ones((128, 512))
    text = jax.jit(f).lower(x, w).compile().as_text()
    (tmp_path / "f.hlo").write_text(text)
    res = _run("hlo_liveness.py", str(tmp_path / "f.hlo"), "--top", "5")
    assert res["peak_bytes"] >= 256 * 512 * 4 and res["top"]
    assert [r["bytes"] for r in res["top"]] == sorted((r["bytes"] for r in res["top"]), reverse=True)
    assert all(r["count"] >= 1 and r["shape"] for r in res["top"])


def test_bench_checksums_saves_seals_and_verifies(tmp_path):
    row = _run("bench_checksums.py", "--params", "600000", "--leaves", "4", "--dir", str(tmp_path / "ck"))
    assert row["verify_ok"] and row["params"] == 600000
    assert row["checkpoint_bytes"] > 3 * 600000 * 4 * 0.5  # params and two moments, fp32


def test_compare_table_puts_ours_beside_the_compiled_and_eager_peer(tmp_path):
    row = lambda mode, step, mfu: {"config": "bench-1b", "mode": mode, "step_s": step, "tokens_per_s": 4096 / step,
                                    "mfu": mfu, "device": "NVIDIA H200"}
    (tmp_path / "ours.txt").write_text("noise\nJSON " + json.dumps([row("plain", 0.1, 0.4), row("qat+teacher", 0.2, 0.4)]))
    (tmp_path / "ours-pipeline.txt").write_text("JSON " + json.dumps([row("qat+teacher", 0.25, 0.32)]))
    peer = {"plain": {"tokens_per_s": 4096 / 0.2, "mfu": 0.2}, "qat+teacher": {"tokens_per_s": 4096 / 0.5, "mfu": 0.16},
            "qat": {"error": "OutOfMemoryError"}}
    # The peer prints each mode as it finishes; a run cut short has no closing PEER line.
    (tmp_path / "peer-compiled.txt").write_text("".join(f"{m} {json.dumps(r)}\n" for m, r in peer.items()))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_table.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    lines = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "2.00× | – |" in lines["plain"]  # 0.2 s against 0.1 s; no eager file
    assert "2.50×" in lines["qat+teacher"] and "2.00×" in lines["qat+teacher, pipeline step"]
    assert "NVIDIA H200" in out


@pytest.mark.parametrize("hlo_name,small", [("TUPLE_HLO", "fusion"), ("BARRIER_HLO", "slice")],
                         ids=["multi-output-fusion", "aliasing-tuple"])
def test_hlo_liveness_follows_one_element_of_a_tuple(tmp_path, hlo_name, small):
    # The large element dies at its one user; the small one lives to the end. Counting a multi-output
    # fusion's tuple as one buffer kept the large output live at the peak (how 34 layers' bf16 [B, T, D]
    # appeared to be kept); taking a get-tuple-element of tie_gradients' aliasing tuple / barrier (input
    # gradient, weight gradient) as the whole tuple kept every layer's input gradient live to the end
    # (31B on 4x8xH100: 59 GiB against the compiler's 31).
    (tmp_path / "t.hlo").write_text(globals()[hlo_name])
    res = _run("hlo_liveness.py", str(tmp_path / "t.hlo"), "--top", "5")
    assert res["peak_bytes"] == 2 * 4096 * 4 + 4  # concatenate and tanh, plus the small output
    assert {(r["shape"], r["opcode"]) for r in res["top"]} == {("f32[4096]", "tanh"), ("f32[4096]", "concatenate"),
                                                               ("f32[1]", small)}


BARRIER_HLO = """HloModule m, entry_computation_layout={(f32[1024]{0})->f32[1]{0}}

ENTRY %main (x: f32[1024]) -> f32[1] {
  %x = f32[1024]{0} parameter(0)
  %dx = f32[1024]{0} negate(%x)
  %dw = f32[1]{0} slice(%x), slice={[0:1]}
  %t = (f32[1024]{0}, f32[1]{0}) tuple(%dx, %dw)
  %b = (f32[1024]{0}, f32[1]{0}) opt-barrier(%t)
  %big = f32[1024]{0} get-tuple-element(%b), index=0
  %e = f32[1024]{0} exponential(%big)
  %f = f32[4096]{0} concatenate(%e, %e, %e, %e), dimensions={0}
  %g = f32[4096]{0} tanh(%f)
  %small = f32[1]{0} get-tuple-element(%b), index=1
  %s = f32[1]{0} slice(%g), slice={[0:1]}
  ROOT %out = f32[1]{0} add(%small, %s)
}
"""


TUPLE_HLO = """HloModule m, entry_computation_layout={(f32[1024]{0})->f32[1]{0}}

%fused (p: f32[1024]) -> (f32[1], f32[1024]) {
  %p = f32[1024]{0} parameter(0)
  %z = f32[] constant(0)
  %r = f32[] reduce(%p, %z), dimensions={0}, to_apply=%add
  %rb = f32[1]{0} broadcast(%r), dimensions={}
  %n = f32[1024]{0} negate(%p)
  ROOT %t = (f32[1]{0}, f32[1024]{0}) tuple(%rb, %n)
}

ENTRY %main (x: f32[1024]) -> f32[1] {
  %x = f32[1024]{0} parameter(0)
  %fus = (f32[1]{0}, f32[1024]{0}) fusion(%x), kind=kLoop, calls=%fused
  %big = f32[1024]{0} get-tuple-element(%fus), index=1
  %e = f32[1024]{0} exponential(%big)
  %f = f32[4096]{0} concatenate(%e, %e, %e, %e), dimensions={0}
  %g = f32[4096]{0} tanh(%f)
  %small = f32[1]{0} get-tuple-element(%fus), index=0
  %s = f32[1]{0} slice(%g), slice={[0:1]}
  ROOT %out = f32[1]{0} add(%small, %s)
}
"""


def test_hlo_traffic_counts_kernel_operands_and_results_by_part(tmp_path):
    # Per kernel, its operands and its result: a gather of tuple elements or the fusion's insides add nothing.
    (tmp_path / "t.hlo").write_text(TUPLE_HLO)
    res = _run("hlo_traffic.py", str(tmp_path / "t.hlo"), "--top", "10")
    e = 1024 * 4  # bytes of an f32[1024]
    fusion, exp_, concat, tanh, slice_, add = e + 4 + e, 2 * e, 4 * e + 4 * e, 2 * 4 * e, 4 * e + 4, 12
    assert res["total_bytes"] == fusion + exp_ + concat + tanh + slice_ + add
    assert sum(res["by_kind"].values()) == res["total_bytes"]
    assert [r["bytes"] for r in res["top"]] == sorted((r["bytes"] for r in res["top"]), reverse=True)
