"""Training metrics on the host: throughput, MFU, ETA, and where they go (JSONL, TensorBoard,
one console line). Only process 0 writes; every process computes the same numbers."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from gemma_qat.model.config import ModelConfig
from gemma_qat.model.params import count_params
from gemma_qat.train.tensorboard import EventWriter


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: everything active except the embedding
    gathers (input and per-layer tables are lookups), plus the tied head's V·D."""
    c = count_params(config)
    active = c.get("active_params", c["total_params"])
    return active - c["embedding_params"] - c["per_layer_embedding_params"] + config.vocab_size * config.d_model


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward QKᵀ and PV: 2 matmuls · 2 FLOPs · heads · head_dim · keys attended, where a causal
    token sees (T+1)/2 keys on average, a sliding one at most the window."""
    causal = (seq_len + 1) / 2
    total = 0.0
    for i in range(config.num_layers):
        keys = causal if config.is_global(i) else min(float(config.sliding_window), causal)
        total += 4 * config.num_heads * config.layer_head_dim(i) * keys
    return total


def flops_per_token(student: ModelConfig, teacher: ModelConfig | None, seq_len: int) -> float:
    """Student forward + backward (3× forward) and teacher forward only:
    6·N_student + 2·N_teacher + 3·attn_student + attn_teacher. teacher None: offline (cached) run."""
    if teacher is None:
        return 6 * matmul_params(student) + 3 * attention_flops_per_token(student, seq_len)
    return (6 * matmul_params(student) + 2 * matmul_params(teacher)
            + 3 * attention_flops_per_token(student, seq_len) + attention_flops_per_token(teacher, seq_len))


def _fmt_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class MetricsLogger:
    def __init__(self, run_dir: Path, *, total_steps: int, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float, tensorboard: bool, is_writer: bool, resumed_from: int | None = None,
                 print_fn=print):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # all devices together; 0 = no MFU
        self.is_writer = is_writer
        self.print = print_fn
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        if is_writer and resumed_from is not None:
            _truncate_jsonl(self.jsonl_path, resumed_from, warn=print_fn)
        self._jsonl = open(self.jsonl_path, "a") if is_writer else None
        self._tb = EventWriter(Path(run_dir) / "tensorboard") if (tensorboard and is_writer) else None
        self._last_time: float | None = None
        self._times: list[float] = []  # recent step times, for a steady ETA

    def step_done(self) -> float | None:
        """Marks a step as finished on the host; returns its duration (None for the first, which
        includes compilation)."""
        now = time.perf_counter()
        dt = None if self._last_time is None else now - self._last_time
        self._last_time = now
        if dt is not None:
            self._times = (self._times + [dt])[-50:]
        return dt

    def derived(self, step_time: float | None) -> dict:
        if step_time is None or step_time <= 0:
            return {}
        tps = self.tokens_per_step / step_time
        out = {"step_time_s": step_time, "tokens_per_s": tps}
        if self.peak_flops > 0:
            out["mfu"] = tps * self.flops_per_token / self.peak_flops
        return out

    def log(self, step: int, metrics: dict, step_time: float | None) -> dict:
        """Writes one record for `step` (the number of steps done) and prints the progress line."""
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}, **self.derived(step_time)}
        if not self.is_writer:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.scalars(step, {f"train/{k}": v for k, v in record.items() if k != "step"})
            self._tb.flush()
        self.print(self._line(record))
        return record

    def _line(self, r: dict) -> str:
        parts = [f"step {r['step']}/{self.total_steps}",
                 f"loss {r['loss']:.4f} kl {r['kl']:.4f} ce {r['ce']:.3f} agree {r['top1_agree']:.3f}",
                 f"gnorm {r['grad_norm']:.3g} lr {r['lr']:.3g}"]
        if "tokens_per_s" in r:
            speed = f"{r['tokens_per_s']:,.0f} tok/s {r['step_time_s']:.3f} s/step"
            if "mfu" in r:
                speed += f" MFU {100 * r['mfu']:.1f}%"
            parts.append(speed)
        if self._times:
            avg = sum(self._times) / len(self._times)
            parts.append(f"ETA {_fmt_duration(avg * (self.total_steps - r['step']))}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _truncate_jsonl(path: Path, last_step: int, warn=print) -> None:
    """Drops records past the checkpoint a run resumes from: those steps are about to be redone, and
    one record per step keeps the file a plain table. A line a kill tore in half is dropped with a
    warning naming the file (its step is past the checkpoint, or it was never complete)."""
    if not path.is_file():
        return
    kept, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            torn += 1
            continue
        if step <= last_step:
            kept.append(line)
    if torn:
        warn(f"warning: {path}: dropped {torn} unreadable line(s) (a write cut short by a kill)")
    path.write_text("".join(l + "\n" for l in kept))
