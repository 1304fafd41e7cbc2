"""Summarise a JAX profiler trace (perfetto_trace.json.gz) by GPU kernel: where a step's device time goes.

    python benchmarks/trace_summary.py PROFILE_DIR [--steps N]

Kernels are grouped into coarse classes by name (GEMMs, attention, loss, fake-quant-looking
elementwise fusions, ...) and listed by total time, divided by the number of profiled steps.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

CLASSES = [  # first match wins; names are XLA fusion / library kernel names
    ("cudnn attention", r"cudnn|fmha|flash|sdpa|mha"),
    ("gemm (cuBLAS/cutlass)", r"gemm|xmma|cutlass|sm90_|nvjet|cublas|matmul|dot"),
    ("triton fusion", r"triton"),
    ("reduction fusion", r"reduce|reduction"),
    ("transpose/copy", r"transpose|copy|concatenate|dynamic.update|slice"),
    ("elementwise fusion", r"fusion|loop_|input_"),
    ("memset/memcpy", r"memset|memcpy"),
]


def load_events(profile_dir: str) -> list[dict]:
    paths = sorted(pathlib.Path(profile_dir).rglob("perfetto_trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {profile_dir}")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    threads = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu_pids}
    # Kernels sit on the "Stream #n" lines; the "XLA Ops" / "XLA Modules" lines repeat the same time.
    streams = {k for k, n in threads.items() if n.startswith("Stream")} or set(threads)
    return [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams and "dur" in e]


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """Optimised-HLO instruction name → its jax op_name metadata (kernel names are instruction names
    with '.' → '_'; library calls are found through the event's hlo_op)."""
    out = {}
    for m in re.finditer(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]+)"', hlo_text, re.M):
        out[m.group(1)] = out[m.group(1).replace(".", "_").replace("-", "_")] = m.group(2)
    return out


def source_label(op_name: str | None) -> str:
    """'jit(step)/jvp(Transformer)/layer_3/attn/q_einsum/...' → 'fwd layer_*/attn/q_einsum' (or bwd)."""
    if not op_name:
        return "(unmapped)"
    bwd = "transpose(" in op_name
    parts = [re.sub(r"^(\w+\()+|\)+$", "", p) for p in op_name.split("/")]
    parts = [re.sub(r"layer_\d+", "layer_*", p) for p in parts if p and not p.startswith(("jit", "pjit", "main"))]
    return ("bwd " if bwd else "fwd ") + "/".join(parts[-4:])


def summarise(profile_dir: str, steps: int = 1, top: int = 30, hlo_text: str | None = None) -> str:
    events = load_events(profile_dir)
    sources = hlo_sources(hlo_text) if hlo_text else {}
    by_source: dict[str, float] = collections.Counter()
    by_name: dict[str, float] = collections.Counter()
    by_class: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    for e in events:
        name = e["name"]
        by_name[name] += e["dur"] / 1e3 / steps  # µs → ms per step
        count[name] += 1
        cls = next((c for c, pat in CLASSES if re.search(pat, name, re.I)), "other")
        by_class[cls] += e["dur"] / 1e3 / steps
        if sources:
            op = e.get("args", {}).get("hlo_op")
            by_source[source_label(sources.get(op) or sources.get(name))] += e["dur"] / 1e3 / steps
    total = sum(by_class.values())
    lines = [f"GPU kernel time per step: {total:.1f} ms over {len(events)} kernel launches / {steps} steps"]
    for c, ms in sorted(by_class.items(), key=lambda x: -x[1]):
        lines.append(f"  {c:24s} {ms:8.2f} ms  {100*ms/total:5.1f}%")
    if by_source:
        lines.append(f"by source op (top {top}):")
        for src, ms in sorted(by_source.items(), key=lambda x: -x[1])[:top]:
            lines.append(f"  {ms:8.2f} ms  {src[:150]}")
    lines.append(f"top {top} kernels (ms per step, launches per step):")
    for n, ms in sorted(by_name.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"  {ms:8.2f}  {count[n]/steps:6.1f}  {n[:140]}")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("profile_dir")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    print(summarise(a.profile_dir, a.steps, a.top))
