"""Analytic per-device activation memory of one distillation step (an estimate, not a measurement).

Used by the preflight when no compiler for the target platform is at hand (a CPU host without
libtpu, any GPU target). The model is the one in model/transformer.py as written: attention
materialises fp32 scores [B, K, G, T, S] (the XLA path), except where the step runs a flash kernel
(`flash_attention`: splash on a TPU, where T and H fit it), remat wraps whole blocks, the loss runs
over sequence chunks with remat (loss/distill.py), the teacher runs forward only.

Letters: b rows per device, T seq_len, c bytes of the compute dtype, D model dim, N/K q/kv heads,
H head dim, F FFN dim, P PLE dim, V vocab, L layers, tp the tensor shards of heads/FFN/vocab
activations (1 under the `fsdp` parallelism; a dim tp does not divide stays whole, as sharding._fit does).

Per layer i, everything live if nothing were rematerialised:
    A_i = 8·bTD·c                      residual stream, its norms and branch outputs
        + bT·H·(2N + 2K)/tp·c          q, k, v and attention output
        + b·N/tp·T²·(8 + c)            fp32 scores, fp32 softmax, probabilities (0 under a flash kernel)
        + 3·bT·F/tp·c                  gate, up, gelu·up  (+ MoE: top-k routed copies, fp32 scatter)
        + 3·bT·P·c                     per-layer-embedding gate/projection
Saved for the backward, by `remat`:
    none: A_i      dots: the matmul outputs without batch dims, bT·(H(N+2K)/tp + 3D + 2F/tp + 2P)·c
    full: the block input bT·(D + P)·c
    weights: as full, plus every layer's matmul weights in the compute dtype, as sharded on this device
             (the kept value is the fake-quantized weight that `Einsum` holds to its parameter's sharding,
             before the FSDP gather; libtpu, 6 layers of 31B shape at D=1024 on v5p-8, fsdp 4: +29.5 MiB
             over remat=full, against 45.3 MiB for the sharded weights and 181 MiB whole)
Step peak = Σ_i saved_i + embeddings/PLE/final hidden (bT·(3D + 2LP)·c)
          + max( one layer's backward: A_max × (1 if remat=none or phases else 2: recompute + cotangents),
                 teacher forward: its A_max + its PLE and hidden,
                 loss chunk: 6 · b·chunk·V/tp · 4 bytes  (student and teacher logits, log-softmaxes, grad) )
          + tied head tables: 2·V/tp·D·c (student, teacher, gathered over fsdp) + V/tp·D·4 (fp32 grad)
          + weights in flight: 3 × the largest layer's weights gathered over fsdp (all-gather,
            prefetch, fake-quant temporaries), in the param dtype; an MoE's expert weights gathered
            over expert too, in the compute dtype (its shard_map gathers every expert)
          + scan_layers: the scanned layers' student params stacked, their gradient stacked, and the
            teacher's scanned layers stacked (model/scan.py), per device. An upper bound: libtpu kept
            fewer of them live at once (12 layers of 31B shape at D = 1024 on v5p-8: +244 MB compiled
            peak over the unrolled step, against 570 MB here).
          − phases (GPU targets): the gradient row, up to this sum, and one layer's backward, not two.
            The GPU compiler, with every gradient tied to its input's (model/layers.py), runs one
            layer's backward at a time and releases each saved input as that layer's gradients appear,
            so the step peaks at the backward's start (everything saved, few gradients) or its end (all
            gradients, little saved): the report's total is then params + optimizer + teacher +
            max(this backward, the gradients). Fitted on six GPU programs compiled 2026-12-02 (E2B, E4B
            mobile, 31B at 16 and 32 rows, 26B-A4B on two clusters): 0.94-1.14 of their peaks (the
            dense ones were 1.41-1.47 before). TPU programs (libtpu, compiled before the norm-scale tie)
            keep the doubled layer backward and the whole gradient row beside it.
"""

from __future__ import annotations

import dataclasses

from gemma_qat.model import splash
from gemma_qat.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class StepGeometry:
    rows: int  # b: batch rows per device
    seq_len: int
    compute_bytes: int
    tensor: int  # tp: shards of head/FFN/vocab activations
    remat: str
    chunk: int
    gathered_layer_bytes: int  # the largest layer's weights after the FSDP all-gather, per device
    kept_weight_elements: int = 0  # every layer's matmul weights on this device, as sharded (remat=weights)
    scan_stack_bytes: int = 0  # scan_layers: the stacked copies of the scanned layers' params (and grads)
    flash_attention: bool = False  # splash attention on a TPU (model/splash.py): no [T, S] scores in HBM
    # The GPU compiler's schedule as measured with the gradient ties (model/layers.py): one layer's backward
    # at a time, and the gradients (`gradient_bytes`, the report's own row) growing as the saved activations
    # are released, so the step peaks at one end of the backward, not with both whole (launch/README.md).
    phases: bool = False
    gradient_bytes: int = 0


def _div(n: int, shards: int) -> int:
    return n // shards if n % shards == 0 else n


def _layer(cfg: ModelConfig, i: int, g: StepGeometry) -> tuple[int, int, int]:
    """(A_i, saved under remat=dots, saved under remat=full) in bytes."""
    b, t, c, tp = g.rows, g.seq_len, g.compute_bytes, g.tensor
    bt, d, h, p = b * t, cfg.d_model, cfg.layer_head_dim(i), cfg.ple_dim
    nq, nk = _div(cfg.num_heads, tp), _div(cfg.layer_kv_heads(i), tp)
    f = _div(cfg.layer_ffn_dim(i), tp)
    flash = g.flash_attention and splash.fits(t, t, h)
    full = (8 * bt * d * c + bt * h * (2 * nq + 2 * nk) * c + (0 if flash else b * nq * t * t * (8 + c))
            + 3 * bt * f * c + 3 * bt * p * c)
    dots = bt * (h * (nq + 2 * nk) + 3 * d + 2 * f + 2 * p) * c
    if cfg.is_moe:
        k, fe = cfg.top_k_experts, _div(cfg.expert_ffn_dim, tp)
        # Routed copies [bT·k, D] and [bT·k, 2F_e], the fp32 expert outputs and scatter target, router probs.
        full += bt * k * (d + 3 * fe) * c + bt * k * d * 4 + bt * d * 4 + bt * cfg.num_experts * 4
        dots += bt * k * (2 * fe + d) * c  # ragged_dot outputs have no batch dims: saved
    return full, dots, bt * (d + p) * c


def _outside_layers(cfg: ModelConfig, g: StepGeometry) -> int:
    bt, c = g.rows * g.seq_len, g.compute_bytes
    return bt * (3 * cfg.d_model + 2 * cfg.num_layers * cfg.ple_dim) * c


def estimate(student: ModelConfig, teacher: ModelConfig | None, g: StepGeometry) -> tuple[dict[str, int], str]:
    """(named terms in bytes per device of the formula in the module docstring, with their `total`;
    which transient is the largest). teacher None: an offline run (teacher.cache), no teacher forward."""
    layers = [_layer(student, i, g) for i in range(student.num_layers)]
    pick = {"none": 0, "dots": 1, "full": 2, "weights": 2}[g.remat]
    saved = sum(layer[pick] for layer in layers) + _outside_layers(student, g)
    if g.remat == "weights":
        saved += g.kept_weight_elements * g.compute_bytes
    a_max = max(layer[0] for layer in layers)
    backward = a_max * (1 if g.remat == "none" or g.phases else 2)
    teacher_fwd = 0 if teacher is None else (
        max(_layer(teacher, i, g)[0] for i in range(teacher.num_layers)) + _outside_layers(teacher, g))
    v_local = _div(student.vocab_size, g.tensor)
    loss_chunk = 6 * g.rows * min(g.chunk, g.seq_len) * v_local * 4
    transient = max(backward, teacher_fwd, loss_chunk)
    t_d = 0 if teacher is None else teacher.d_model
    tables = v_local * (student.d_model + t_d) * g.compute_bytes + v_local * student.d_model * 4
    in_flight = 3 * g.gathered_layer_bytes
    terms = {"saved_activations": saved, "largest_transient": transient, "head_tables": tables,
             "weights_in_flight": in_flight, "scan_stacks": g.scan_stack_bytes}
    if g.phases:  # the gradient row is counted in the report: here only what the backward holds beyond it
        terms["gradients_counted_above"] = -min(g.gradient_bytes, sum(terms.values()))
    terms["total"] = sum(terms.values())
    kind = {backward: "layer backward", teacher_fwd: "teacher forward", loss_chunk: "loss chunk"}[transient]
    return terms, kind

