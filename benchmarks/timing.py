"""Wall time of a jitted call on the device: one warm-up call (compile), then the median of `reps`."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, reps: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
