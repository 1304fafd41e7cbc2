"""Q4_0 fake-quant of every quantized weight of a config, as one QAT step's forward does it: time and
bit-equality of the XLA path (formats.py) and the one-pass Pallas kernel (quant/q4_0_kernel.py), beside
the bf16 cast the plain step does instead.

    python benchmarks/bench_q4_0.py --config bench-1b        # on the GPU
    python benchmarks/bench_q4_0.py --config bench-1b --sweep   # + the kernel's tile and warp counts
    python benchmarks/bench_q4_0.py --config tiny-e2b     # CPU smoke run (Pallas' interpreter)

Each weight is random fp32 of its real shape, passed along the axis the model quantizes it on. `equal`
compares the two paths' bf16 outputs bit for bit, on these weights and on a tensor of ties, zeros, -0.0,
subnormals and huge values.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from bench_step import bench_config  # benchmarks/ is on sys.path
from gemma_qat.model.params import abstract_params, flat_shapes
from gemma_qat.quant import formats
from gemma_qat.quant.policy import weight_axes, weight_in_axes
from gemma_qat.quant.q4_0_kernel import Launch, q4_0_fake_quant_fused, supported
from gemma_qat.quant.recipe import resolve_recipe
from timing import median_seconds


SWEEP = [Launch(t, w) for t in (128, 256, 512, 1024) for w in (2, 4, 8)]


def _weights(name: str, limit: int):
    cfg = bench_config(name)
    axes, shapes = weight_in_axes(cfg), flat_shapes(abstract_params(cfg))
    res = resolve_recipe("q4_0", cfg)
    items = [(p, shapes[p], weight_axes(f, axes[p])) for p, f in sorted(res.quantized().items()) if f == "q4_0"]
    return items[:limit] if limit else items


def _stress(rng) -> np.ndarray:
    """[64, 256]: blocks (along axis 0) of ties in both signs, zeros, -0.0, subnormals, huge values."""
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[:32, 0] = 0.0
    x[:32, 1] = -0.0
    x[:32, 2] = np.float32(1e-40) * rng.standard_normal(32).astype(np.float32)
    x[:32, 3] = np.float32(3e38) * np.sign(rng.standard_normal(32)).astype(np.float32)
    x[5, 4], x[9, 4] = -2.0, 2.0
    x[5, 5], x[9, 5] = 2.0, -2.0
    x[:32, 6] = np.float32(2.0 ** -20) * rng.integers(-8, 9, 32).astype(np.float32)
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench-1b")
    ap.add_argument("--limit", type=int, default=0, help="only the first N weights (0 = all)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sweep", action="store_true", help="also time the kernel at each launch shape of SWEEP")
    args = ap.parse_args()

    items = _weights(args.config, args.limit)
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02) for _, s, _ in items]
    ax = [a for _, _, a in items]
    fused = [supported(s, a) for _, s, a in items]

    cast = jax.jit(lambda ws: [w.astype(jnp.bfloat16) for w in ws])
    xla = jax.jit(lambda ws: [formats.q4_0_fake_quant(w, in_axis=a).astype(jnp.bfloat16) for w, a in zip(ws, ax)])
    def kernel(launch: Launch):
        return jax.jit(lambda ws: [q4_0_fake_quant_fused(w, in_axis=a, dtype=jnp.bfloat16, launch=launch)
                                   if f else formats.q4_0_fake_quant(w, in_axis=a).astype(jnp.bfloat16)
                                   for w, a, f in zip(ws, ax, fused)])
    kern = kernel(Launch())

    def bits(t):
        return np.asarray(jax.lax.bitcast_convert_type(t, jnp.uint16))

    mismatched = sum(int((bits(a) != bits(b)).sum()) for a, b in zip(xla(ws), kern(ws)))
    s = jnp.asarray(_stress(rng))
    s_xla = formats.q4_0_fake_quant(s, in_axis=0).astype(jnp.bfloat16)
    s_kern = q4_0_fake_quant_fused(s, in_axis=0, dtype=jnp.bfloat16)
    s_mismatched = int((bits(s_xla) != bits(s_kern)).sum())

    gb = sum(w.size for w in ws) * 4 / 1e9  # fp32 read once
    row = {"config": args.config, "device": jax.devices()[0].device_kind, "weights": len(ws),
           "kernel_weights": int(sum(fused)), "params": int(sum(w.size for w in ws)),
           "mismatched": mismatched, "stress_mismatched": s_mismatched}
    for name, fn in (("cast", cast), ("xla", xla), ("pallas", kern)):
        t = median_seconds(fn, ws, reps=args.reps)
        row[f"{name}_ms"] = t * 1e3
        print(f"{name:7s} {t*1e3:8.2f} ms   {gb/t:7.0f} GB/s of fp32 read once", flush=True)
    if args.sweep:
        row["sweep"] = []
        for launch in SWEEP:
            t = median_seconds(kernel(launch), ws, reps=args.reps)
            row["sweep"].append({**launch._asdict(), "ms": t * 1e3})
            print(f"  tile {launch.tile:5d} warps {launch.num_warps}: {t*1e3:7.2f} ms  {gb/t:6.0f} GB/s", flush=True)
    print(f"{row['kernel_weights']}/{row['weights']} weights through the kernel, {row['params']:,} parameters; "
          f"bf16 outputs differing from the XLA path: {mismatched} (stress tensor: {s_mismatched})")
    print("JSON " + json.dumps(row))


if __name__ == "__main__":
    main()
