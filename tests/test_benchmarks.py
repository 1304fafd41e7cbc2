"""The GPU benchmark scripts run end to end on CPU at tiny sizes, so a flag or a model change cannot
break them unnoticed between device sessions. Functional only: the timings here mean nothing."""

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _json_line(stdout: str):
    lines = [l for l in stdout.splitlines() if l.startswith("JSON ")]
    assert lines, stdout
    return json.loads(lines[-1][5:])


def test_bench_step_runs_a_tiny_moe_qat_teacher_step():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_step.py"), "--config", "tiny-26b-a4b",
                          "--batch", "2", "--seq", "64", "--chunk", "32", "--steps", "2", "--modes", "qat+teacher",
                          "--remat", "weights", "--grouped", "blocked", "--freeze-embeddings"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = _json_line(out.stdout)
    assert (row["mode"], row["remat"], row["grouped"]) == ("qat+teacher", "weights", "blocked")
    assert math.isfinite(row["loss"]) and row["loss"] >= 0 and row["tokens_per_s"] > 0


def test_bench_grouped_reports_small_errors():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_grouped.py"), "--tokens", "32", "--experts", "8",
                          "--top-k", "2", "--impls", "blocked,ragged"], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _json_line(out.stdout)["rows"]
    assert [r["shape"] for r in rows] == ["gate_up", "down"]
    for r in rows:
        for impl in ("blocked", "ragged"):
            errs = [r[impl][f"err_{t}"] for t in ("y", "dx", "dw")]
            assert all(0 < e < 1e-2 for e in errs), (impl, errs)  # bf16 against the fp32 product


def test_bench_q4_0_finds_the_kernel_bit_identical():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_q4_0.py"), "--config", "tiny-e2b",
                          "--reps", "1", "--limit", "12"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    row = _json_line(out.stdout)
    assert row["weights"] == 12 and row["kernel_weights"] == 12
    assert row["mismatched"] == 0 and row["stress_mismatched"] == 0
