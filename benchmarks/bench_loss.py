"""The fused head + loss alone (forward with its closed-form gradient, `gemma_qat/loss/fused.py`) with its vocabulary
passes in XLA and in the two Pallas kernels (`gemma_qat/loss/kernel.py`): time per call and the kernels' difference
from the XLA path on the device.

    python benchmarks/bench_loss.py --config bench-1b            # KL + CE with a teacher, and CE alone
    python benchmarks/bench_loss.py --config tiny-e2b --batch 1 --seq 64 --chunk 32   # CPU smoke (interpreted)

Hidden states and tables are random; the GEMMs are the same in both paths, so the difference in time is the
vocabulary-wide elementwise and reduction work.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from gemma_qat.loss.fused import fused_ce_loss, fused_distill_loss
from gemma_qat.model.config import get_config
from timing import median_seconds  # benchmarks/ is on sys.path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench-1b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    cfg = get_config(args.config)
    b, t, d, v = args.batch, args.seq, cfg.d_model, cfg.vocab_size
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    sh = jax.random.normal(ks[0], (b, t, d), jnp.bfloat16)
    th = jax.random.normal(ks[1], (b, t, d), jnp.bfloat16)
    table = jax.random.normal(ks[2], (v, d), jnp.float32) * 0.05
    t_table = (jax.random.normal(ks[3], (v, d), jnp.float32) * 0.05).astype(jnp.bfloat16)
    labels = jax.random.randint(ks[4], (b, t), 0, v)
    w = jnp.ones((b, t), jnp.float32)
    cap = cfg.final_softcap
    losses = {
        "kl+ce": lambda impl: lambda sh, table: fused_distill_loss(
            sh, th, table, t_table, softcap=cap, temperature=1.0, alpha=0.5, labels=labels, weights=w,
            with_ce=True, chunk_size=args.chunk, impl=impl)[0],
        "ce": lambda impl: lambda sh, table: fused_ce_loss(sh, table, labels, softcap=cap, weights=w,
                                                           chunk_size=args.chunk, impl=impl)[0],
    }
    rows = []
    for name, make in losses.items():
        out = {}
        for impl in ("xla", "pallas"):
            f = jax.jit(jax.value_and_grad(make(impl), argnums=(0, 1)))
            ms = median_seconds(f, sh, table, reps=args.reps) * 1e3
            loss, (dh, dt) = f(sh, table)
            out[impl] = (ms, loss, dh.astype(jnp.float32), dt)
        rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        (mx, lx, hx, tx), (mk, lk, hk, tk) = out["xla"], out["pallas"]
        row = {"loss": name, "xla_ms": mx, "pallas_ms": mk, "loss_xla": float(lx), "loss_pallas": float(lk),
               "rel_dh": rel(hk, hx), "rel_dtable": rel(tk, tx)}
        rows.append(row)
        print(f"{name:6s} xla {mx:8.2f} ms   kernels {mk:8.2f} ms   loss {float(lx):.6f} / {float(lk):.6f}   "
              f"rel. diff dh {row['rel_dh']:.1e}  dtable {row['rel_dtable']:.1e}", flush=True)
    print("JSON " + json.dumps({"config": cfg.name, "device": jax.devices()[0].device_kind, "rows": rows}))


if __name__ == "__main__":
    main(sys.argv[1:])
