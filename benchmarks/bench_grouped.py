"""MoE grouped matmul on one GPU: forward + backward time and error of each implementation at 26B-A4B
expert shapes (128 experts, top-8, 2 × 2048 tokens → 32,768 token-expert rows).

    python benchmarks/bench_grouped.py                     # gate/up [2816 → 1408] and down [704 → 2816]
    python benchmarks/bench_grouped.py --impls blocked     # one implementation
    python benchmarks/bench_grouped.py --sweep             # + the Hopper kernels' tile shapes, best first

Rows are routed by random top-8 choices (uneven group sizes, like an untrained router). Error is
against the fp32 ragged_dot-equivalent computed by the blocked form on fp32 inputs; `dense` is one plain
[M, K]·[K, N] GEMM of the same FLOPs, the speed the grouped product could at best reach.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from gemma_qat.model.grouped_matmul import Tiles, grouped_matmul, kernel_grouped_matmul, mgpu_kernels
from timing import median_seconds  # benchmarks/timing.py (this folder is on sys.path)

SHAPES = {"gate_up": (2816, 1408), "down": (704, 2816)}  # (K, N) per expert: D → 2F and F → D
SWEEP = [Tiles(bm, bn, 64, st, gb) for bm in (64, 128) for bn in (64, 128) for st in (3, 4, 6) for gb in (1, 2)]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _sweep(x, w, dy, sizes, ref, flops) -> list[dict]:
    xb, wb, dyb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dy.astype(jnp.bfloat16)
    out = []
    for tiles in SWEEP:
        def f(x, w, dy, kernels=mgpu_kernels(tiles)):
            y, vjp = jax.vjp(lambda x, w: kernel_grouped_matmul(x, w, sizes, kernels), x, w)
            return (y, *vjp(dy))
        try:
            fn = jax.jit(f)
            err = max(_rel(g, r) for g, r in zip(fn(xb, wb, dyb), ref))
            t = median_seconds(fn, xb, wb, dyb)
            out.append({"tiles": tiles._asdict(), "ms": t * 1e3, "tflops": flops / t / 1e12, "max_err": err})
        except Exception as e:  # noqa: BLE001 — e.g. a tile shape over the shared-memory budget
            out.append({"tiles": tiles._asdict(), "error": repr(e)[:200]})
        print("  tile", json.dumps(out[-1]), flush=True)  # as it goes: a time limit keeps what ran
    ok = sorted((r for r in out if "ms" in r), key=lambda r: r["ms"])
    for r in ok[:5]:
        print(f"  {r['ms']:7.2f} ms  {r['tflops']:5.0f} TFLOP/s  err {r['max_err']:.1e}  {r['tiles']}", flush=True)
    print(f"  {len(out) - len(ok)} of {len(out)} tile shapes failed", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--impls", default="blocked,kernel,kernel-nk",
                    help="blocked, ragged, kernel; '-nk' = weights stored [G, N, K] (the MoE gate/up layout)")
    ap.add_argument("--sweep", action="store_true", help="time the kernels at each tile shape of SWEEP")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="which expert products (gate_up, down)")
    args = ap.parse_args()
    g, m = args.experts, args.tokens * args.top_k
    key = jax.random.PRNGKey(0)
    choice = jax.vmap(lambda k: jax.random.choice(k, g, (args.top_k,), replace=False))(
        jax.random.split(key, args.tokens)).reshape(-1)
    sizes = jnp.bincount(choice, length=g).astype(jnp.int32)
    print(f"rows {m}, experts {g}, group sizes min {int(sizes.min())} max {int(sizes.max())}", flush=True)
    rows = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        ks = jax.random.split(jax.random.PRNGKey(1), 3)
        x = jax.random.normal(ks[0], (m, k), jnp.float32)
        w = jax.random.normal(ks[1], (g, k, n), jnp.float32) * k ** -0.5
        dy = jax.random.normal(ks[2], (m, n), jnp.float32)

        w_nk = jnp.swapaxes(w, 1, 2)  # the same weights stored [G, N, K], as the MoE's gate/up is

        def fwd_bwd(impl, dtype):  # impl "<name>-nk": w stored [G, N, K] (transpose_w), dw returned so
            base, nk = impl.removesuffix("-nk"), impl.endswith("-nk")

            def f(x, w, dy):
                y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, sizes, impl=base, transpose_w=nk),
                                 x.astype(dtype), w.astype(dtype))
                return (y, *vjp(dy.astype(y.dtype)))
            return jax.jit(f)

        ref = [np.asarray(t, np.float32) for t in fwd_bwd("blocked", jnp.float32)(x, w, dy)]
        flops = 3 * 2 * m * k * n  # y, dx, dw
        a, b = x.astype(jnp.bfloat16), w[0].astype(jnp.bfloat16)
        dense = jax.jit(lambda a, b, d: (a @ b, d @ b.T, a.T @ d))
        t_dense = median_seconds(dense, a, b, dy.astype(jnp.bfloat16))
        row = {"shape": name, "K": k, "N": n, "dense_ms": t_dense * 1e3, "dense_tflops": flops / t_dense / 1e12}
        for impl in args.impls.split(","):
            try:
                fn, wi = fwd_bwd(impl, jnp.bfloat16), (w_nk if impl.endswith("-nk") else w)
                got = fn(x, wi, dy)
                if impl.endswith("-nk"):
                    got = (got[0], got[1], jnp.swapaxes(got[2], 1, 2))
                err = {f"err_{t}": _rel(gv, rv) for t, gv, rv in zip(("y", "dx", "dw"), got, ref)}
                t = median_seconds(fn, x, wi, dy)
                row[impl] = {"ms": t * 1e3, "tflops": flops / t / 1e12, **err}
            except Exception as e:  # noqa: BLE001 — report and go on to the next implementation
                row[impl] = {"error": repr(e)[:400]}
            print(name, impl, row[impl], flush=True)
        if args.sweep:
            row["sweep"] = _sweep(x, w, dy, sizes, ref, flops)
        print(f"{name}: dense GEMMs of the same FLOPs {t_dense * 1e3:.2f} ms ({row['dense_tflops']:.0f} TFLOP/s)",
              flush=True)
        rows.append(row)
    print("JSON " + json.dumps({"device": jax.devices()[0].device_kind, "rows": rows}))


if __name__ == "__main__":
    main()
