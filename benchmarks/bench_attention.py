"""Attention kernels on one GPU: forward + backward time and error of each implementation against the
model's own einsum attention (fp32 reference on upcast inputs), at Gemma 4 layer shapes.

    python benchmarks/bench_attention.py --batch 2 --seq 2048

Shapes (bench-1b): sliding layers 8 query heads, 4 KV heads, head dim 256, window 1024; global layers
8 query heads, 1 KV head (K=V), head dim 512. Inputs are random normal (never zeros) and documents are
packed (two segments per row) so the segment rule is exercised too.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from gemma_qat.model.attention import attention_mask, attend
from timing import median_seconds  # benchmarks/timing.py (this folder is on sys.path)

SHAPES = {"sliding": dict(n=8, k=4, h=256, window=1024), "global": dict(n=8, k=1, h=512, window=None)}


def _inputs(b, t, n, k, h, packed: bool, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16)
    kk = jax.random.normal(ks[1], (b, t, k, h), jnp.bfloat16) / 4  # post-norm scale ~1 logits
    v = jax.random.normal(ks[2], (b, t, k, h), jnp.bfloat16)
    seg = jnp.where(jnp.arange(t)[None] < t * 5 // 8, 1, 2) * jnp.ones((b, 1), jnp.int32)  # 2 docs / row
    seg = seg if packed else None
    return q, kk, v, seg


def pallas_attend(q, key, value, segment_ids, block: tuple[int, int]):
    """Pallas (Triton) flash attention, causal + segments, no window: a candidate for the 512-wide
    global heads, which cuDNN does not take. It wants equal head counts, so K/V heads are repeated."""
    from jax.experimental.pallas.ops.gpu import attention as pa
    g = q.shape[2] // key.shape[2]
    key, value = (jnp.repeat(a, g, axis=2) for a in (key, value))
    bq, bk = block
    sizes = pa.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bk, block_kv_dkv=bk, block_q_dq=bk, block_kv_dq=bk)
    return pa.mha(q, key, value, segment_ids, sm_scale=1.0, causal=True, block_sizes=sizes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--impls", default="xla,cudnn")
    args = ap.parse_args()
    b, t = args.batch, args.seq
    for layer, packed in [(l, p) for l in SHAPES for p in (False, True)]:
        s = SHAPES[layer]
        q, k, v, seg = _inputs(b, t, s["n"], s["k"], s["h"], packed)
        mask = attention_mask(jnp.ones((b, t), jnp.int32) if seg is None else seg, s["window"])
        layer = f"{layer}{'/packed' if packed else ''}"
        ref_fn = lambda q, k, v: attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                        mask, seg, s["window"], impl="xla")
        do = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32)
        ref_out, ref_vjp = jax.vjp(ref_fn, q, k, v)
        ref_grads = ref_vjp(do)
        flops = 4 * b * t * s["n"] * s["h"] * (min(t / 2, s["window"]) if s["window"] else t / 2) * 3.5  # fwd+bwd
        for impl in args.impls.split(","):
            if impl.startswith("pallas"):  # pallas-<block_q>-<block_k>
                if s["window"] is not None:
                    continue
                blk = tuple(int(x) for x in impl.split("-")[1:3])
                fn = lambda q, k, v: pallas_attend(q, k, v, seg, blk)
            else:
                fn = lambda q, k, v: attend(q, k, v, mask, seg, s["window"], impl=impl)

            @jax.jit
            def fwd_bwd(q, k, v):
                out, vjp = jax.vjp(fn, q, k, v)
                return out, vjp(do.astype(out.dtype))

            try:
                out, grads = fwd_bwd(q, k, v)
                dt = median_seconds(fwd_bwd, q, k, v)
            except Exception as e:  # an unsupported shape is a finding, not a crash
                print(f"{layer:15s} {impl:14s} unsupported: {str(e).splitlines()[0][:160]}", flush=True)
                continue
            rel = lambda a, r: float(jnp.linalg.norm((a.astype(jnp.float32) - r).ravel()) / jnp.linalg.norm(r.ravel()))
            errs = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
            print(f"{layer:15s} {impl:14s} fwd+bwd {dt*1e3:7.2f} ms  {flops/dt/1e12:6.1f} TFLOP/s  "
                  f"rel err out/dq/dk/dv {' '.join(f'{e:.1e}' for e in errs)}  finite {bool(np.isfinite(errs).all())}",
                  flush=True)


if __name__ == "__main__":
    main()
