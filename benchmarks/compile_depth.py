"""Compile time against depth, unrolled and with `scan_layers`, for a model of 31B's layer pattern at a width
a 2-core host compiles in minutes (D=1024, F=4096, vocab 4096; Q4_0, remat full, seq 256), by the target's
compiler through `run_preflight` (libtpu for a TPU slice: `bash tools/bootstrap.sh --tpu`).

    python benchmarks/compile_depth.py --topology v5p-8 6:false 6:true 12:false 12:true 24:false 24:true

One JSON line per case: wall seconds to lower and compile, CPU seconds of the process over the case
(tracing included), compiled temp and peak bytes per chip. Not part of CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="v5p-8")
    ap.add_argument("cases", nargs="+", metavar="LAYERS:SCAN", help="e.g. 12:true")
    args = ap.parse_args()
    from gemma_qat.preflight import compilers, topologies
    topo = topologies.parse(args.topology)
    if topo.platform == "tpu":
        compilers.prepare_libtpu(topo)  # before jax starts a backend
    from gemma_qat.model import config as model_config
    from gemma_qat.preflight.check import run_preflight
    from gemma_qat.train.config import load_run_config
    base = model_config.get_config("tiny-31b")
    for case in args.cases:
        layers, scan = case.split(":")
        name = f"mid-31b-{layers}l"
        model_config.VARIANTS[name] = dataclasses.replace(
            base, name=name, d_model=1024, ffn_dim=4096, num_heads=8, head_dim=128, global_head_dim=256,
            vocab_size=4096, layer_types=model_config.interleave(int(layers), 3))
        cfg = load_run_config(ROOT / "configs" / "tiny.toml", [
            f"model.name={name}", "remat=full", "quant.recipe=q4_0", "optimizer.compute_dtype=bfloat16",
            "data.seq_len=256", "distill.chunk_size=256", f"scan_layers={scan}"])
        cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        r = run_preflight(cfg, topo)
        c = r.compiled or {}
        print(json.dumps({"layers": int(layers), "scan": scan == "true", "topology": args.topology,
                          "compile_s": r.compile_seconds, "cpu_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0,
                          "temp": c.get("temp_size"), "peak": c.get("peak"), "step": r.step_check}), flush=True)


if __name__ == "__main__":
    main()
