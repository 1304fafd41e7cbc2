"""The compiled step's communication and predicted speed, for the preflight report.

    compiled program ─► collectives.py (every collective: kind, dtype, bytes, source, overlap)
                     ─► step_model.py (roofline + link bandwidth) with the FLOPs below

FLOPs: the model's own count (train/metrics.flops_per_token, the numerator of MFU) plus the forward
that remat recomputes (`full` / `weights`: one more student forward, 2·N + attention per token). The
compiler's cost analysis is reported beside it, not used: the GPU compiler's AOT compile returns none,
and on any GPU its count leaves out library GEMMs and kernels (custom calls). HBM bytes: the compiler's
'bytes accessed' where it gives them. `calibration` is the fraction of peak the step achieves
(step_model.CALIBRATION: measured on one H200 for dense and for MoE steps, see launch/README.md); the
same fraction is assumed on other chips, which is the model's largest assumption.
"""

from __future__ import annotations

from gemma_qat.model.config import ModelConfig
from gemma_qat.preflight import collectives as coll, step_model
from gemma_qat.train.metrics import attention_flops_per_token, matmul_params, flops_per_token


def executed_flops_per_token(student: ModelConfig, teacher: ModelConfig | None, seq_len: int, remat: str) -> float:
    """Model FLOPs per token plus the student forward that remat recomputes in the backward."""
    model = flops_per_token(student, teacher, seq_len)
    if remat in ("full", "weights"):
        model += 2 * matmul_params(student) + attention_flops_per_token(student, seq_len)
    return model


def analyse(report, student: ModelConfig, teacher: ModelConfig | None) -> None:
    """Fills report.collectives, report.weight_gathers and report.prediction from report.compiled_program."""
    cfg, topo = report.config, report.topology
    found = coll.from_compiled(report.compiled_program)
    summary = coll.summarize(found, chips_per_host=topo.chips_per_host)
    report.collectives = summary
    report.collectives_table = coll.format_table(found)
    report.weight_gathers = coll.weight_gather_dtypes(found)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    per_token = executed_flops_per_token(student, teacher, cfg.data.seq_len, cfg.remat)
    chip = topo.chip.name
    fraction = step_model.calibration(chip, moe=student.is_moe)
    pred = step_model.predict(report.cost, summary["links"], chip, calibration=fraction,
                              flops=per_token * tokens / topo.chips,
                              hbm_bytes=report.cost.get("bytes accessed", 0.0),
                              tokens_per_step=tokens, model_flops_per_token=flops_per_token(student, teacher,
                                                                                            cfg.data.seq_len),
                              chips=topo.chips)
    report.prediction = {
        "step_s_overlapped": pred.overlapped_s, "step_s_serial": pred.serial_s, "compute_s": pred.compute_s,
        "hbm_s": pred.hbm_s, "comm_s": pred.comm_s, "bottleneck": pred.bottleneck,
        "tokens_per_s_serial": pred.tokens_per_s[0], "tokens_per_s_overlapped": pred.tokens_per_s[1],
        "mfu_serial": pred.mfu[0], "mfu_overlapped": pred.mfu[1], "calibration": fraction,
        "flops_per_device": per_token * tokens / topo.chips,
        "compiler_flops_per_device": report.cost.get("flops"),
        "compiler_optimal_s": report.cost.get("optimal_seconds"),
        "text": pred.describe(),
    }
