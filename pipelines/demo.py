"""The embedded default: runs on any CPU machine with no weights and no internet.

Until the distillation pipeline lands, the demo shows the model family: official parameter counts of
every variant (computed without memory), then a tiny Gemma-4-shaped E2B sibling that is created,
checkpointed with Orbax, restored and run. Finished steps are reused on a re-run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import numpy as np

from gemma_qat.checkpoint import load_model, save_model
from gemma_qat.inference import forward_logits
from gemma_qat.model.config import get_config
from gemma_qat.model.params import count_params, init_params

FAMILY = ["e2b", "e4b", "12b", "26b-a4b", "31b"]


def _step(title: str):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_demo(workdir: Path, *, fresh: bool = False) -> int:
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    t0 = _step("Gemma 4 family (text decoders, counted through jax.eval_shape)")
    print(f"{'model':10s} {'total':>16s} {'embedding':>14s} {'per-layer emb':>14s} {'active':>16s}")
    for name in FAMILY:
        c = count_params(get_config(name))
        print(f"{name:10s} {c['total_params']:>16,d} {c['embedding_params']:>14,d} "
              f"{c['per_layer_embedding_params']:>14,d} {c.get('active_params', c['total_params']):>16,d}")
    print(f"({time.perf_counter() - t0:.1f}s)")

    ckpt = workdir / "tiny-e2b-init"
    t0 = _step(f"tiny-e2b: random init → Orbax checkpoint at {ckpt}")
    cfg = get_config("tiny-e2b")
    if (ckpt / "model_config.json").is_file():
        print("reusing the finished checkpoint")
    else:
        save_model(ckpt, init_params(cfg, jax.random.PRNGKey(0)), cfg, meta={"param_dtype": "float32"})
    config, params = load_model(ckpt)
    print(f"restored {config.name}: {config.num_layers} layers, PLE {config.ple_dim}, "
          f"KV-shared layers {config.num_kv_shared_layers} ({time.perf_counter() - t0:.1f}s)")

    t0 = _step("forward pass on 24 tokens (longer than the 8-token sliding window)")
    tokens = list(range(2, 26))
    logits = forward_logits(config, params, tokens)
    print(f"logits {logits.shape} float32, finite={bool(np.isfinite(logits).all())}, "
          f"argmax of the last position: {int(logits[-1].argmax())} ({time.perf_counter() - t0:.1f}s)")
    print("\ndone: see README.md for import-hf, logits and the test suite")
    return 0
