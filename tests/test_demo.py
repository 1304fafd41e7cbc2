"""The embedded default end to end, at a few steps per stage: every stage produces its artifact,
the report exists, and a re-run reuses every finished stage."""

import json

import pytest

from gemma_qat.cli import demo


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "TEACHER_STEPS", 40)
    monkeypatch.setattr(demo, "QAT_STEPS", 20)
    # As `gemma-qat demo` runs it: the two QAT students in two spawned processes at once.
    assert demo.run_demo(tmp_path, chain=demo.Chain(parallel_qat=True)) == 0
    for path in ("teacher/model/model_config.json", "qat/model/meta.json", "ptq-q4_0/params",
                 "exports/student-q4_0/export.json", "exports/student-q4_0.gguf",
                 "qat-mobile/model/quant_scales.json", "qat/train.log", "exports/teacher-mobile/export.json",
                 "exports/student-mobile/export.json", "report/report.md", "report/ptq_vs_qat.png"):
        assert (tmp_path / path).exists(), path
    rows = {r["name"]: r for r in json.loads((tmp_path / "report" / "results.json").read_text())["rows"]}
    assert {"teacher", "ptq-q4_0", "qat-q4_0", "export-q4_0", "mobile-ptq", "mobile-qat"} <= set(rows)
    # The mobile export of the PTQ'd teacher is the mobile baseline: the mobile student's recovery is against it.
    assert rows["mobile-ptq"]["kind"] == "ptq" and rows["mobile-qat"]["recovery_vs"] == "mobile-ptq"
    # The exported Q4_0 file holds exactly the trained student.
    assert rows["export-q4_0"]["ppl"] == rows["qat-q4_0"]["ppl"]
    assert rows["export-q4_0"]["kl_mean"] == rows["qat-q4_0"]["kl_mean"]
    # What the demo exists to show, already at these few steps: each QAT student is closer to the teacher
    # than its PTQ baseline.
    assert rows["qat-q4_0"]["kl_mean"] < rows["ptq-q4_0"]["kl_mean"]
    assert rows["mobile-qat"]["kl_mean"] < rows["mobile-ptq"]["kl_mean"]
    capsys.readouterr()
    assert demo.run_demo(tmp_path) == 0
    assert capsys.readouterr().out.count("(reusing") == 6
