"""Predicted step time of a compiled training step on a chip: a roofline for the device's own work plus a
bandwidth model of its collectives. Pure arithmetic; imports no jax.

Assumptions, all of them:
  1. Inputs are per device. A SPMD-compiled module is the program one device runs, so its
     `compiled.cost_analysis()` 'flops' and 'bytes accessed' are one device's, and the collectives'
     `bytes_moved` (collectives.py) are one device's.
  2. XLA's cost analysis counts a while-loop body ONCE (seen on XLA:CPU, jax 0.10.2: a 4-layer scan
     reports about one layer's flops), and the GPU compiler's AOT compile returned no cost analysis at
     all (jax 0.11.2). So `flops` / `hbm_bytes` can be passed explicitly; `hlo.dot_flops` gives a
     loop-aware matmul count from the same program. 'bytes accessed' has the same loop undercount and
     is used as given.
  3. Compute time = flops / (peak dense bf16 FLOP/s × calibration). `calibration` is the achieved
     fraction of peak for this chip and program (default 0.6 until measured; BENCHMARKS.md's H200 runs
     reach about 0.40 MFU on small models). fp32 matmuls are not told apart: everything runs at the bf16 peak.
  4. HBM time = bytes accessed / HBM bandwidth (the vendor figure, no calibration).
  5. Device time = max(compute, HBM) (a roofline: the two overlap within the device).
  6. Comm time = Σ bytes_moved × runs / link bandwidth, every collective one after another (no two
     collectives share time), intra-host bytes over the intra-host link and bytes of groups spanning
     hosts over the inter-host link (`collectives.link_bytes(..., chips_per_host)`; a group whose
     layout is not understood counts as inter-host). Link bandwidth is per chip, per direction: the
     ring algorithm's bytes each device sends are limited by one direction of its links. Latency
     (α terms) is ignored, so many small collectives are predicted too fast.
  7. TPU: ICI spans hosts inside a slice, so intra- and inter-host bandwidth are both the ICI figure;
     a collective over one axis of a torus uses only that axis's links, so the per-chip total is an
     upper bound (multi-slice DCN traffic is not modelled). GPU: NVLink inside an HGX host, one
     400 Gb/s InfiniBand NIC per GPU between hosts.
  8. Two predictions: fully overlapped = max(device, comm), not overlapped = device + comm. The truth
     lies between; collectives.summarize's overlapped_bytes says how much the compiler scheduled
     beside compute.
  9. tokens/s = tokens per step (global) / step time; MFU = model flops per token × tokens/s /
     (chips × peak). The first resource to saturate is the largest of compute, HBM and interconnect time.
"""

from __future__ import annotations

import dataclasses

GB = 10**9


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str
    peak_flops: float        # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    intra_bytes_per_s: float  # per chip, per direction: ICI (TPU) / NVLink (GPU)
    inter_bytes_per_s: float  # per chip, per direction, between hosts: ICI (TPU) / InfiniBand (GPU)


# Sources, read 2026 (search tool, docs and pages corpora):
#  v5p: https://cloud.google.com/tpu/docs/v5p-training: 459 TFLOPs bf16, 2765 GBps HBM2e, interchip
#       interconnect 4800 Gbps (= 600 GB/s; the newer table there: 1200 GBps bidirectional per chip).
#  v6e: https://cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 1640 GBps HBM, ICI 3584 Gbps (= 448 GB/s;
#       a later revision of the page says 1600 GBps, 3200 Gbps / 800 GBps bidirectional).
#  v5e: https://docs.cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 819 GBps HBM2, 400 GBps
#       bidirectional ICI per chip (the Spanish page: 1600 Gbps) = 200 GB/s per direction.
#  H100 SXM: https://glennklockwood.com/garden/processors/h100: BF16 matrix 989.4 TFLOPS dense (1978.9
#       sparse; NVIDIA's sheet prints the sparse figure, https://archive-lib.hpctech.co.jp/gpuproduct/
#       nvidia-h100.html: "1,979 TFLOPS*, *with sparsity ... 1/2 lower without"), 3,350 GB/s HBM3,
#       NVLink 900 GB/s (bidirectional: 450 GB/s per direction). Between hosts: 8x 400 Gb/s InfiniBand
#       per 8-GPU host (https://github.com/mlcommons/inference_results_v3.1/blob/main/closed/Dell/systems/
#       XE9680_H100_SXM_80GBx8_TRT.json: "8x 400Gb Infiniband") = 50 GB/s per GPU.
#  H200 SXM: same GH100 die as the H100 (glennklockwood, above), 4.8 TB/s HBM3e
#       (https://www.aiminingco.com/gpu/h200/specs), NVLink 900 GB/s ("18x 4th Gen NVLink, 900GB/s",
#       https://raw.githubusercontent.com/mlcommons/inference_results_v4.1/main/closed/NVIDIA/systems/
#       H200-SXM-141GBx8_TRT_MaxQ.json), same InfiniBand per GPU as the H100 hosts.
CHIPS = {
    "v5p": ChipSpec("v5p", 459e12, 2765 * GB, 4800 / 8 * GB, 4800 / 8 * GB),
    "v6e": ChipSpec("v6e", 918e12, 1640 * GB, 3584 / 8 * GB, 3584 / 8 * GB),
    "v5e": ChipSpec("v5e", 197e12, 819 * GB, 1600 / 8 * GB, 1600 / 8 * GB),
    "H100": ChipSpec("H100", 989e12, 3350 * GB, 450 * GB, 400 / 8 * GB),
    "H200": ChipSpec("H200", 989e12, 4800 * GB, 450 * GB, 400 / 8 * GB),
}
DEFAULT_CALIBRATION = 0.6
# The achieved fraction of peak of the distillation step (executed FLOPs / (peak × measured step time)),
# measured on one H200 (launch/README.md, "Calibration"), for dense models and for MoE models apart: the
# grouped expert matmuls reach a smaller fraction. Other chips are assumed to reach the same.
# 2026-12-01, one H200, the pipeline's QAT + teacher step at 2 × 2048 (benchmarks/pod_gpu.sh calibrate):
# bench-1b 143.6 ms → 0.409 of peak on executed FLOPs, E2B (remat weights) 267.2 ms → 0.372; the geometric
# mean 0.390 predicts them at 150.7 and 254.6 ms (+4.9%, -4.7%; bench-1b again in the eighth session:
# 146.1 ms, +3.1%). 26B-A4B-4l (remat weights) 155.6 ms → 0.318, which the dense figure would predict at
# 127.0 ms (-18%).
CALIBRATION: dict[str, float] = {"default": 0.390, "moe": 0.318}


def calibration(chip: str, moe: bool = False) -> float:
    """The fraction of `chip`'s peak a step reaches: its own entry, else the MoE or dense measurement."""
    if chip in CALIBRATION:
        return CALIBRATION[chip]
    return CALIBRATION["moe" if moe else "default"]


def cost_dict(cost) -> dict:
    """compiled.cost_analysis() is a dict, a list of one dict (jax 0.10/0.11 on some backends), or None."""
    if cost is None:
        return {}
    if isinstance(cost, (list, tuple)):
        return dict(cost[0]) if cost else {}
    return dict(cost)


@dataclasses.dataclass(frozen=True)
class Prediction:
    compute_s: float
    hbm_s: float
    comm_s: float
    overlapped_s: float      # max(max(compute, HBM), comm)
    serial_s: float          # max(compute, HBM) + comm
    bottleneck: str          # "compute" | "HBM" | "interconnect"
    tokens_per_s: tuple[float, float] | None = None   # (not overlapped, fully overlapped)
    mfu: tuple[float, float] | None = None

    def describe(self) -> str:
        ms = lambda s: f"{s * 1e3:.3f} ms"  # noqa: E731
        text = (f"step {ms(self.overlapped_s)} (comm fully overlapped) to {ms(self.serial_s)} (not overlapped): "
                f"compute {ms(self.compute_s)}, HBM {ms(self.hbm_s)}, interconnect {ms(self.comm_s)}; "
                f"first to saturate: {self.bottleneck}")
        if self.tokens_per_s:
            text += f"; {self.tokens_per_s[0]:,.0f}-{self.tokens_per_s[1]:,.0f} tokens/s"
        if self.mfu:
            text += f", MFU {self.mfu[0]:.1%}-{self.mfu[1]:.1%}"
        return text


def predict(cost, link_bytes: dict, chip: ChipSpec | str, *, calibration: float = DEFAULT_CALIBRATION,
            flops: float | None = None, hbm_bytes: float | None = None, tokens_per_step: int | None = None,
            model_flops_per_token: float | None = None, chips: int | None = None) -> Prediction:
    """cost: compiled.cost_analysis() (per device); link_bytes: {'intra_host': B, 'inter_host': B} per
    device per step (collectives.link_bytes); flops / hbm_bytes override the cost analysis (assumption 2).
    tokens_per_step is global; MFU needs model_flops_per_token and chips."""
    spec = CHIPS[chip] if isinstance(chip, str) else chip
    cost = cost_dict(cost)
    flops = cost.get("flops") if flops is None else flops
    hbm_bytes = cost.get("bytes accessed", 0.0) if hbm_bytes is None else hbm_bytes
    if flops is None:
        raise ValueError("no flops: the cost analysis has none (GPU AOT compiles return None); pass flops=")
    compute_s = flops / (spec.peak_flops * calibration)
    hbm_s = hbm_bytes / spec.hbm_bytes_per_s
    comm_s = (link_bytes.get("intra_host", 0) / spec.intra_bytes_per_s
              + link_bytes.get("inter_host", 0) / spec.inter_bytes_per_s)
    device_s = max(compute_s, hbm_s)
    times = {"compute": compute_s, "HBM": hbm_s, "interconnect": comm_s}
    serial_s, overlapped_s = device_s + comm_s, max(device_s, comm_s)
    tokens = mfu = None
    if tokens_per_step and overlapped_s > 0:
        tokens = (tokens_per_step / serial_s, tokens_per_step / overlapped_s)
        if model_flops_per_token and chips:
            mfu = tuple(model_flops_per_token * t / (chips * spec.peak_flops) for t in tokens)
    return Prediction(compute_s, hbm_s, comm_s, overlapped_s, serial_s, max(times, key=times.get), tokens, mfu)
