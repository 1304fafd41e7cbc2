"""One process of the 2-process run in tests/test_multiprocess.py.

It starts exactly as `gemma-qat train` does (gemma_qat/cli/train.py: `distributed.initialize()` from the
JAX_* environment variables, then the library loop), plus two test hooks that need to live inside the
process: it records the host batches it trains on (to prove each host read its own shard), and it
can stop cleanly after a given step through the preemption path, so the test can resume the run.

    python tests/mp_train_driver.py RECORD_DIR STOP_AT key=value ...    (STOP_AT 0: run to the end)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(record_dir: str, stop_at: int, overrides: list[str]) -> int:
    from gemma_qat.train import distributed
    distributed.initialize()  # before anything touches a device, as in gemma_qat/cli/train.py

    import jax
    import numpy as np

    from gemma_qat.train import loop, step as step_lib
    from gemma_qat.train.config import load_run_config
    from gemma_qat.train.signals import StopFlag

    seen: list[np.ndarray] = []
    real_global_batch = step_lib.global_batch

    def recording(host_batch, batch_sh):  # the loop calls step_lib.global_batch once per step
        seen.append(np.array(host_batch["tokens"]))
        return real_global_batch(host_batch, batch_sh)

    step_lib.global_batch = recording
    flag = StopFlag()

    def on_step(step: int, metrics: dict) -> None:
        # Metrics arrive one step late, so a request made at stop_at - 1 stops (and saves) at stop_at.
        if stop_at and step == stop_at - 1:
            flag.request("test stop")

    result = loop.train(load_run_config(None, overrides), stop=flag, on_step=on_step)
    out = Path(record_dir)
    out.mkdir(parents=True, exist_ok=True)
    i = jax.process_index()
    np.save(out / f"tokens_{i}.npy", np.stack(seen))
    (out / f"losses_{i}.json").write_text(json.dumps({str(k): v for k, v in result.losses.items()}))
    print(f"process {i}/{jax.process_count()}: {len(seen)} steps, stopped_early={result.stopped_early}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
