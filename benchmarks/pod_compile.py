"""Every preset compiled for the chips it is meant for, by the target's own compiler: per-chip memory
(compiled arguments / temp / peak beside the exact rows and the estimate), fit, compile time,
communication counted from the compiled program, and the step-time prediction.

    python benchmarks/pod_compile.py --out runs/pod                              # the TPU matrix (libtpu)
    python benchmarks/pod_compile.py --gpu --out $OUT                            # on a GPU host: 8xH200, 8xH100, 4x8xH100
    python benchmarks/pod_compile.py --case e2b-q4_0:v5p-16 --case 31b-q4_0:4x8xH100 mesh.fsdp=32
    python benchmarks/pod_compile.py --render runs/*/pod.jsonl                   # launch/README.md's matrix rows

Each case runs `gemma-qat preflight --json` in its own process (a time limit each, memory returned),
so one slow or failing compile does not stop the others. Rows go to OUT/pod.jsonl as they finish and
a Markdown table to OUT/pod.md. Not part of CI: a full-size compile takes minutes of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3

# (preset, topology, overrides). Presets at their own topology first, then every variant × format on a
# v5p and a v6e slice. `mobile` is defined for the E-type models only (quant/recipe.py).
PRESET_CASES = [
    ("e2b-q4_0", None, []), ("e2b-mobile", None, []), ("e4b-q4_0", None, []), ("e4b-mobile", None, []),
    ("12b-q4_0", None, []), ("26b-a4b-q4_0", None, []), ("31b-q4_0", None, []),
]
TPU_MATRIX = [  # a preset's mesh where its product is the slice's chips; otherwise data parallel takes the rest
    ("e2b-q4_0", "v5p-16", []), ("e2b-mobile", "v5p-16", ["mesh.tensor=4"]),
    ("e2b-q4_0", "v6e-16", ["mesh.data=-1"]), ("e2b-mobile", "v6e-16", []),
    ("e4b-q4_0", "v5p-32", []), ("e4b-mobile", "v5p-32", ["mesh.data=-1"]),
    ("e4b-q4_0", "v6e-16", []), ("e4b-mobile", "v6e-16", ["mesh.data=-1"]),
    ("12b-q4_0", "v5p-64", []), ("12b-q4_0", "v6e-64", ["mesh.data=-1"]),
    ("26b-a4b-q4_0", "v5p-128", []), ("26b-a4b-q4_0", "v6e-128", ["mesh.data=-1"]),
    ("31b-q4_0", "v5p-128", ["mesh.data=-1"]), ("31b-q4_0", "v6e-128", ["mesh.data=-1"]),
]
GPU_MATRIX = [  # the presets whose topology is a GPU cluster, then more sizes
    ("e2b-q4_0", "8xH100", []), ("e4b-mobile", "8xH200", []), ("31b-q4_0", "4x8xH100", []),
    ("e2b-q4_0", "8xH200", []), ("e4b-q4_0", "8xH100", []), ("12b-q4_0", "8xH200", []),
]


def _variant(preset: str) -> str:
    return preset.rsplit("-", 1)[0]


def _sizing(preset: str) -> list[str]:
    """Presets name a checkpoint folder that is not here: size it as the variant it was imported from."""
    return [f"model.name={_variant(preset)}"] if preset.endswith(("-q4_0", "-mobile")) else []


def run_case(preset: str, topology: str | None, overrides: list[str], timeout: int,
             hlo_dir: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "gemma_qat.cli", "preflight", "--config", str(ROOT / "configs" / f"{preset}.toml"),
           *_sizing(preset), *overrides, "--json"] + (["--topology", topology] if topology else [])
    if hlo_dir is not None:  # the compiled program, to read its collectives and fusions afterwards
        hlo_dir.mkdir(parents=True, exist_ok=True)
        cmd += ["--hlo-out", str(hlo_dir / f"{preset}-{topology or 'own'}.hlo.gz")]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"preset": preset, "topology": topology, "overrides": overrides, "error": f"timeout after {timeout} s"}
    row = {"preset": preset, "topology": topology, "overrides": overrides, "wall_s": time.perf_counter() - t0}
    try:
        row["report"] = json.loads(out.stdout)
    except json.JSONDecodeError:
        lines = [l for l in out.stderr.strip().splitlines() if l.strip() and "frozen runpy" not in l]
        row["error"] = (lines or ["no output"])[-1][:400]
        if out.returncode < 0:  # a signal: SIGKILL with nothing on stderr is most often the kernel's OOM killer
            oom = " (out of host memory? a full-size compile holds 10-15 GiB: run fewer at once)" if out.returncode == -9 else ""
            row["error"] = f"killed by signal {-out.returncode}{oom}; last stderr: {row['error']}"
        row["stderr_tail"] = out.stderr[-4000:]
    return row


def _mib_or_gib(b) -> str:
    return "–" if b is None else f"{b / GIB:.1f}" if abs(b) >= GIB else f"{b / 2**20:.0f} Mi"


def _memory(r: dict) -> tuple[str, str, str, str]:
    """A report's memory columns: exact rows, estimate (GiB), compiled args / temp / peak, estimate ÷ peak."""
    rows_b = {m["what"]: m["bytes"] for m in r["memory_per_device"]}
    exact = sum(b for w, b in rows_b.items() if w != "activations + temporaries")
    estimate = exact + rows_b.get("activations + temporaries", 0)
    c = r.get("compiled") or {}
    compiled = f"{_mib_or_gib(c.get('argument_size'))} / {_mib_or_gib(c.get('temp_size'))} / {_mib_or_gib(c.get('peak'))}"
    ratio = f"{estimate / c['peak']:.2f}" if c.get("peak") else "–"
    return f"{exact / GIB:.1f}", f"{estimate / GIB:.1f}", compiled, ratio


def table(rows: list[dict]) -> str:
    head = ("| preset | topology | mesh | compile s | exact rows GiB | estimate GiB | compiled args / temp / peak GiB "
            "| est. vs compiled | fits | comm GB/step/chip | predicted MFU (overlap…serial) |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        r = row.get("report")
        if r is None:
            out.append(f"| {row['preset']} | {row['topology'] or 'own'} | | | | | {row.get('error', '')} | | | | |")
            continue
        exact, estimate, compiled, ratio = _memory(r)
        mesh = "×".join(f"{k[0]}{v}" for k, v in r["mesh"].items() if v > 1)
        comm = r.get("collectives", {}).get("bytes")
        pred = r.get("prediction") or {}
        mfu = (f"{100 * pred['mfu_overlapped']:.0f}…{100 * pred['mfu_serial']:.0f}%" if pred else "–")
        out.append(f"| {row['preset']} | {r['topology']['name']} | {mesh} | {r.get('compile_seconds') or 0:.0f} | "
                   f"{exact} | {estimate} | {compiled} | {ratio} | "
                   f"{'yes' if r['fits'] else 'NO'} | {'–' if comm is None else f'{comm / 1e9:.2f}'} | {mfu} |")
    return "\n".join(out)


def _mesh_words(mesh: dict) -> str:
    return " × ".join(f"{k} {v}" for k, v in mesh.items() if v > 1) or "one device"


def matrix_rows(rows: list[dict]) -> str:
    """launch/README.md's matrix: one line per compiled case, GiB per chip, the prediction's two bounds."""
    head = ("| preset | topology (mesh) | compile | exact rows | estimate | compiled args / temp / peak | "
            "estimate ÷ compiled | fits (usable), margin | comm per step per chip | step (hidden … exposed), MFU, bound |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        r = row.get("report")
        if r is None:
            out.append(f"| {row['preset']} | {row['topology']} | {row.get('error', '')} | | | | | | | |")
            continue
        exact, estimate, compiled, ratio = _memory(r)
        t, p = r["topology"], r.get("prediction") or {}
        col = r.get("collectives") or {}
        inter = (col.get("links") or {}).get("inter_host")
        comm = "–" if col.get("bytes") is None else f"{col['bytes'] / 1e9:.1f} GB" + (
            f" ({inter / 1e9:.1f} between hosts)" if inter and t["platform"] == "gpu" and t["hosts"] > 1 else "")
        usable = t["usable_bytes"] / GIB
        margin = f"{100 * r['margin_bytes'] / t['usable_bytes']:+.0f}%" if r.get("margin_bytes") is not None else ""
        pred = (f"{p['step_s_overlapped']:.2f} … {p['step_s_serial']:.2f} s, {100 * p['mfu_overlapped']:.1f} … "
                f"{100 * p['mfu_serial']:.1f}%, {p['bottleneck']}") if p else "–"
        out.append(f"| {row['preset']} | {t['name']} ({_mesh_words(r['mesh'])}) | {r.get('compile_seconds') or 0:.0f} s | "
                   f"{exact} | {estimate} | {compiled} | {ratio} | "
                   f"{'yes' if r['fits'] else 'NO'} ({usable:.1f}), {margin} | {comm} | {pred} |")
    return "\n".join(out)


def depth_scaling(preset: str, topology: str, depths: list[int], overrides: list[str]) -> list[dict]:
    """Compile time against depth: the preset's model truncated to each depth (same layer pattern and
    widths; E-types keep their KV-shared fraction), compiled in this process for `topology`."""
    import dataclasses

    from gemma_qat.model import config as model_config
    from gemma_qat.preflight import compilers, topologies
    topo = topologies.parse(topology)
    if topo.platform == "tpu":
        compilers.prepare_libtpu(topo)
    from gemma_qat.preflight.check import run_preflight
    from gemma_qat.train.config import load_run_config
    base = model_config.get_config(_variant(preset))
    period = next(i + 1 for i, t in enumerate(base.layer_types) if t == "global")
    rows = []
    for depth in depths:
        shared = round(base.num_kv_shared_layers * depth / base.num_layers)
        name = f"{base.name}-{depth}l"
        model_config.VARIANTS[name] = dataclasses.replace(
            base, name=name, layer_types=model_config.interleave(depth, period), num_kv_shared_layers=shared)
        cfg = load_run_config(ROOT / "configs" / f"{preset}.toml", [f"model.name={name}", *overrides])
        r = run_preflight(cfg, topo)
        rows.append({"preset": preset, "topology": topology, "layers": depth, "compile_s": r.compile_seconds,
                     "step_check": r.step_check, "compiled": r.compiled, "weight_gathers": r.weight_gathers,
                     "collectives": r.collectives, "prediction": r.prediction})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for pod.jsonl / pod.md / hlo (required unless --render)")
    ap.add_argument("--gpu", action="store_true", help="the GPU-cluster matrix (run on a GPU host)")
    ap.add_argument("--presets", action="store_true", help="each preset at its own topology")
    ap.add_argument("--case", action="append", nargs="+", metavar="PRESET:TOPOLOGY [key=value ...]",
                    help="one case (repeatable); overrides follow it")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    ap.add_argument("--hlo", action="store_true", help="keep each compiled step's HLO under OUT/hlo/")
    ap.add_argument("--render", nargs="+", metavar="POD_JSONL",
                    help="print launch/README.md's matrix rows from earlier runs' pod.jsonl files, and stop")
    ap.add_argument("--depths", help="compile time against depth for the one --case given, e.g. 6,12,24")
    args = ap.parse_args()
    if args.render:
        print(matrix_rows([json.loads(l) for f in args.render for l in Path(f).read_text().splitlines() if l.strip()]))
        return
    if not args.out:
        ap.error("--out is required")
    if args.depths:
        (preset, topology), overrides = args.case[0][0].split(":"), args.case[0][1:]
        rows = depth_scaling(preset, topology, [int(d) for d in args.depths.split(",")], overrides)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "depth.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return
    if args.case:
        cases = [(c[0].split(":")[0], c[0].split(":")[1] if ":" in c[0] else None, c[1:]) for c in args.case]
    elif args.presets:
        cases = PRESET_CASES
    else:
        cases = GPU_MATRIX if args.gpu else TPU_MATRIX
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for preset, topology, overrides in cases:
        row = run_case(preset, topology, overrides, args.timeout, out / "hlo" if args.hlo else None)
        rows.append(row)
        with open(out / "pod.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(table([row]).splitlines()[-1], flush=True)
    (out / "pod.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
