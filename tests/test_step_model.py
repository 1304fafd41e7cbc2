"""The step model's arithmetic on hand-computed cases (numbers written out from the module's formulas)."""

import pytest

from gemma_qat.preflight import step_model as sm


def test_pure_compute_case():
    # 2e12 FLOP at 989e12 × 0.5 = 4.044 ms; 1e9 B of HBM at 3.35e12 B/s = 0.299 ms; no communication.
    p = sm.predict({"flops": 2e12, "bytes accessed": 1e9}, {}, "H100", calibration=0.5,
                   tokens_per_step=8192, model_flops_per_token=6e8, chips=8)
    assert p.compute_s == pytest.approx(2e12 / (989e12 * 0.5))
    assert p.hbm_s == pytest.approx(1e9 / 3350e9)
    assert p.comm_s == 0 and p.overlapped_s == p.serial_s == p.compute_s
    assert p.bottleneck == "compute"
    assert p.tokens_per_s == pytest.approx((8192 / p.compute_s,) * 2)
    assert p.mfu[0] == pytest.approx(6e8 * 8192 / p.compute_s / (8 * 989e12))


def test_comm_bound_case_splits_links():
    # 45 GB over NVLink at 450 GB/s = 0.1 s, 5 GB over InfiniBand at 50 GB/s = 0.1 s: comm 0.2 s;
    # compute 1e12 / (989e12 × 0.6) = 1.685 ms.
    p = sm.predict([{"flops": 1e12, "bytes accessed": 0.0}], {"intra_host": 45e9, "inter_host": 5e9}, "H200")
    assert p.comm_s == pytest.approx(0.2)
    assert p.compute_s == pytest.approx(1e12 / (989e12 * sm.DEFAULT_CALIBRATION))
    assert p.bottleneck == "interconnect"
    assert p.overlapped_s == pytest.approx(0.2) and p.serial_s == pytest.approx(0.2 + p.compute_s)
    assert p.tokens_per_s is None and "interconnect" in p.describe()


def test_hbm_bound_and_tpu_links():
    # v5e: 1 GFLOP at 197e12 × 0.6 = 8.46 µs; 8.19e9 B at 819e9 B/s = 10 ms; ICI 200 GB/s both ways.
    p = sm.predict({"flops": 1e9, "bytes accessed": 8.19e9}, {"intra_host": 5e8, "inter_host": 5e8}, "v5e")
    assert p.hbm_s == pytest.approx(0.01) and p.bottleneck == "HBM"
    assert p.comm_s == pytest.approx(1e9 / 200e9)  # 5 ms: below the 10 ms of HBM


def test_cost_analysis_forms_and_overrides():
    assert sm.cost_dict(None) == {} and sm.cost_dict([{"flops": 3.0}]) == {"flops": 3.0}
    with pytest.raises(ValueError, match="pass flops"):
        sm.predict(None, {}, "v5p")  # what a GPU AOT compile's cost_analysis() gives
    # A loop-aware flop count replaces the cost analysis's (which counts a while body once).
    p = sm.predict({"flops": 1.0}, {}, "v5p", flops=459e12 * 0.6)
    assert p.compute_s == pytest.approx(1.0)


def test_calibration_tells_moe_from_dense_and_predicts_the_measured_steps():
    # The measured single-H200 steps (launch/README.md): executed FLOPs per step over peak × fraction.
    # bench-1b 58.108 TFLOP in 146.1 ms and 26B-A4B-4l 48.996 TFLOP in 155.6 ms (both measured 2026-12-01).
    assert sm.calibration("H200") == sm.CALIBRATION["default"] != sm.calibration("H200", moe=True)
    dense = 58.108e12 / (989e12 * sm.calibration("H200"))
    moe = 48.996e12 / (989e12 * sm.calibration("v5p", moe=True))
    assert dense == pytest.approx(0.1461, rel=0.05) and moe == pytest.approx(0.1556, rel=0.05)
