"""What checkpoint checksums (gemma_qat/train/checksums.py) cost: a train-state-sized pytree (params and
two Adam moments in fp32, as the run checkpoints them) saved through the run's own checkpointer, then
the sealing (CRC-32 of every file) and the verification timed on their own beside the save and a plain
Orbax restore of the same state.

    python benchmarks/bench_checksums.py --params 1685221888 --dir /tmp/ck   # bench-1b's parameter count

One `JSON {...}` line. Not part of CI. The sealing runs in Orbax's post-finalization thread (off the step
loop); the verification runs before each restore.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=50_000_000)
    ap.add_argument("--leaves", type=int, default=64, help="arrays per copy (params, mu, nu)")
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from gemma_qat.train import checksums
    from gemma_qat.train.checkpointing import RunCheckpointer

    n = args.params // args.leaves
    key = jax.random.PRNGKey(0)
    state = {part: {f"w{i}": jax.random.normal(jax.random.fold_in(key, 1000 * j + i), (n,), jnp.float32)
                    for i in range(args.leaves)} for j, part in enumerate(("params", "mu", "nu"))}
    jax.block_until_ready(state)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    ck = RunCheckpointer(root, keep=2, keep_every=0, async_save=True)
    t0 = time.perf_counter()
    ck.save(1, state, {"pos": 0}, {"run": "bench"})
    t_call = time.perf_counter() - t0
    ck.wait()  # finishes the save and its sealing
    t_total = time.perf_counter() - t0
    step_dir = root / "1"
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    nbytes = sum(p.stat().st_size for p in files)
    t0 = time.perf_counter()
    checksums.seal(step_dir)
    t_seal = time.perf_counter() - t0
    t0 = time.perf_counter()
    problem = checksums.verify(step_dir)
    t_verify = time.perf_counter() - t0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    t0 = time.perf_counter()
    restored = ck.manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    jax.block_until_ready(restored.state)
    t_restore = time.perf_counter() - t0
    ck.close()
    print("JSON " + json.dumps({"params": n * args.leaves, "checkpoint_bytes": nbytes, "files": len(files),
                      "save_call_s": t_call, "save_and_seal_s": t_total, "seal_s": t_seal,
                      "verify_s": t_verify, "verify_ok": problem is None, "restore_s": t_restore,
                      "crc_gb_per_s": nbytes / 1e9 / t_verify, "device": str(jax.devices()[0])}), flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
