"""Divergence guards (train/guard.py): a non-finite step never reaches a checkpoint, the CLI prints one
report instead of a traceback, and a finite loss explosion is flagged."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_qat.train.config import GuardSection
from gemma_qat.train.guard import Diverged, Guard
from train_helpers import base_overrides

REPO = Path(__file__).resolve().parent.parent


def test_non_finite_metrics_raise_a_report_naming_step_metric_and_last_good_checkpoint():
    g = Guard(GuardSection(), last_good=4, warn=print)
    g.check_step(5, {"loss": 1.5, "grad_norm": 0.3})
    with pytest.raises(Diverged) as e:
        g.check_step(6, {"loss": 1.5, "grad_norm": float("inf")})
    assert e.value.step == 6 and e.value.last_good == 4
    text = str(e.value)
    assert text.startswith("training diverged at step 6: grad_norm is not finite = inf")
    assert "latest checkpoint is step 4" in text and "fix: lower optimizer.lr" in text
    with pytest.raises(Diverged, match="no checkpoint was written"):
        Guard(GuardSection(), last_good=None, warn=print).check_step(1, {"loss": float("nan")})


def test_spike_guard_warns_once_on_a_sustained_spike_and_ignores_a_single_one():
    warnings = []
    g = Guard(GuardSection(spike_factor=10.0, spike_steps=3, spike_window=50), last_good=None, warn=warnings.append)
    for step in range(1, 31):
        g.check_step(step, {"loss": 1.0 + 0.01 * (step % 3)})
    g.check_step(31, {"loss": 50.0})  # one spike, then back to normal
    g.check_step(32, {"loss": 1.0})
    assert warnings == []
    for step in range(33, 40):
        g.check_step(step, {"loss": 29.0})
    assert len(warnings) == 1 and "step 35: loss above 10× its running median" in warnings[0]

    stop = Guard(GuardSection(spike_factor=10.0, spike_steps=3, on_spike="stop"), last_good=20, warn=print)
    for step in range(1, 31):
        stop.check_step(step, {"loss": 1.0})
    with pytest.raises(Diverged, match=r"at step 33: loss above 10× .* for 3 steps = 29"):
        for step in range(31, 40):
            stop.check_step(step, {"loss": 29.0})


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_diverging_run_stops_before_saving_and_resumes_from_its_last_good_checkpoint(tmp_path):
    """optimizer.lr=1e30 with a checkpoint every step: step 1's update is finite, step 2's loss is not.
    Before the guard, step 2's NaN state was checkpointed and every restart resumed into it."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "gemma_qat.cli", "train",
           *base_overrides(run, "optimizer.lr=1e30", "optimizer.warmup_steps=0", "optimizer.total_steps=6",
                           "checkpoint.every_steps=1", "data.num_threads=1")]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert first.returncode == 3, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    m = re.search(r"gemma-qat train: training diverged at step (\d+): (\w+) is not finite", first.stderr)
    assert m, first.stderr[-3000:]
    bad = int(m.group(1))
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == bad - 1, (steps, bad)  # every step up to the bad one saved, not that one
    assert f"the latest checkpoint is step {bad - 1}" in first.stderr
    before = _snapshot(run / "checkpoints")

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert second.returncode == 3 and "Traceback" not in second.stderr
    assert f"resumed from checkpoint step {bad - 1}" in second.stdout
    assert f"training diverged at step {bad}:" in second.stderr
    assert _snapshot(run / "checkpoints") == before  # the good checkpoints are untouched
    assert not (run / "model").exists()  # no final model from a diverged run
