"""The same run on 1 device and on 8 (fake) devices under each mesh.parallelism gives the same loss
trajectory: sharding changes where the math runs, never what it computes (fp32, so only reduction
order differs).

Training amplifies that reduction-order noise (~1e-7 at step 1) over the steps; with the base
config's lr it grows to ~1e-4 relative over 20 dense steps, with single-step spikes near 3e-4 on some
hosts (measured per ISA in the test). MoE routing is discontinuous: once
the noise flips one token's top-k expert choice (here after ~5 steps) the trajectories legitimately
part, so the MoE case compares the steps before that.
"""

import functools

import jax
import numpy as np
import pytest

from gemma_qat.train.loop import train
from train_helpers import TOTAL_STEPS, base_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

CASES = [  # (model, mesh, steps compared)
    ("tiny-e2b", ["mesh.data=2", "mesh.fsdp=4", "mesh.parallelism=fsdp"], TOTAL_STEPS),
    ("tiny-e2b", ["mesh.fsdp=4", "mesh.tensor=2", "mesh.parallelism=fsdp_tp"], TOTAL_STEPS),
    ("tiny-26b-a4b", ["mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2", "mesh.parallelism=fsdp_tp_ep"], 5),
]


def _losses(result, steps: int) -> np.ndarray:
    return np.array([result.losses[s] for s in range(1, steps + 1)])


@functools.lru_cache(maxsize=None)
def _single_device(model: str, steps: int, run_dir: str) -> np.ndarray:
    cfg = base_config(run_dir, f"optimizer.total_steps={steps}", model=model)
    return _losses(train(cfg, devices=jax.devices()[:1], print_fn=lambda s: None), steps)


@pytest.mark.parametrize("model,mesh,steps", CASES, ids=[m[-1].split("=")[1] for _, m, _ in CASES])
def test_sharded_run_matches_single_device(model, mesh, steps, tmp_path, tmp_path_factory):
    ref = _single_device(model, steps, str(tmp_path_factory.getbasetemp() / f"single-{model}"))
    cfg = base_config(tmp_path, f"optimizer.total_steps={steps}", "mesh.data=1", "mesh.fsdp=1", *mesh, model=model)
    result = train(cfg, print_fn=lambda s: None)
    got = _losses(result, steps)
    assert len(set(np.round(ref, 4))) == steps  # the trajectory moves, so matching it means something
    # Tolerances measured over instruction sets, not on one machine: max relative loss difference,
    # sharded vs single device (jax 0.10.2):
    #                      steps 1-5   steps 6-20
    #   AVX-512 host       < 2e-4      < 2e-4 (the former rtol passed; not measured per step)
    #   EPYC AVX2+FMA      1.7e-6      2.9e-4 (fsdp, step 19; fsdp_tp 1.1e-4; fsdp_tp_ep 1.7e-6 over 5 steps)
    #   same, max_isa=SSE4_2  4.5e-7   8.4e-5 (fsdp)
    # The early steps carry only the reduction-order rounding (~1e-7); Adam's normalised steps then
    # amplify it chaotically (~1e-5 by step 8, single-step spikes near 3e-4 late), so which step peaks
    # and how high depends on the host's kernels. 2e-5 early (>10x the measured max) keeps a real
    # sharding error visible at once; 1e-3 later is ~3x the largest measured spike.
    early = min(steps, 5)
    np.testing.assert_allclose(got[:early], ref[:early], rtol=2e-5)
    np.testing.assert_allclose(got, ref, rtol=1e-3)
    # The parameters really are spread over the mesh.
    emb = result.state.params["embedder"]["input_embedding"]
    assert len({s.device for s in emb.addressable_shards}) == 8
