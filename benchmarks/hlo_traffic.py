"""Where a compiled step's memory traffic goes: for every kernel-level instruction of the compiled HLO (each
fusion, custom call, copy, dot ... that is not a fusion's insides), the bytes of its operands and its result
times how often it runs, grouped by jax op_name with the layer number folded, largest first, and summed by
the part of the step it belongs to (`kind`).

    python benchmarks/hlo_traffic.py runs/pod/hlo/26b-a4b-q4_0-v5p-128.hlo.gz --top 25

Operand + result bytes is the upper bound that XLA's cost analysis also counts ("bytes accessed"): an
operand a fusion reads only in part (a slice, a dynamic-slice) counts whole, and nothing that stays in
VMEM/registers across kernels is subtracted. It tells which parts of the program move the bytes, which is
what an HBM-bound prediction (preflight/step_model.py) needs to act on.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma_qat.preflight import hlo  # noqa: E402

# No traffic of their own: they name, alias or schedule buffers.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
         "optimization-barrier", "after-all", "partition-id", "replica-id", "iota"}


def kind(op_name: str, opcode: str) -> str:
    """The part of the distillation step an instruction belongs to, from its jax op_name."""
    if opcode.startswith(("all-", "reduce-scatter", "collective-permute", "send", "recv")):
        return "collectives"
    if "/while/body/" in op_name or "loss" in op_name:
        return "loss (chunk loop)"
    if "transpose(jvp" in op_name:
        return "student backward: recompute" if "rematted_computation" in op_name else "student backward"
    if "jvp(Transformer)" in op_name:
        return "student forward"
    if "/Transformer/" in op_name:
        return "teacher forward"
    return "other: optimizer, embeddings, copies"


def traffic(text: str) -> dict:
    module = hlo.parse(text)
    runs = module.runs()
    # Fusion bodies and reducers run inside the kernel that calls them: no traffic of their own.
    inside = {c for ins in module.instructions() if ins.opcode != "call"
              for key in ("calls", "to_apply") for c in ins.called().get(key, [])}
    groups: dict[tuple, list] = {}
    by_kind = collections.Counter()
    total = 0.0
    for comp in module.computations.values():
        if comp.name in inside:
            continue
        n = (runs.get(comp.name) or (1,))[0] or 1
        for ins in comp.instructions:
            if ins.opcode in _FREE or ins.opcode.endswith("-done"):
                continue
            b = n * (hlo.nbytes(ins.shape) + sum(hlo.nbytes(comp.shapes.get(o, "")) for o in ins.operands))
            name = re.sub(r"layer_\d+", "layer_N", ins.op_name or ins.opcode)
            g = groups.setdefault((name, ins.opcode), [0.0, 0])
            g[0] += b
            g[1] += n
            by_kind[kind(name, ins.opcode)] += b
            total += b
    rows = sorted(((b, c, name, op) for (name, op), (b, c) in groups.items()), reverse=True)
    return {"total_bytes": total, "by_kind": dict(by_kind.most_common()), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hlo", help="compiled HLO text (.gz or plain)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    opener = gzip.open if args.hlo.endswith(".gz") else open
    with opener(args.hlo, "rt") as f:
        res = traffic(f.read())
    gb = 1e9
    print(f"operand + result bytes of every kernel, per step per device: {res['total_bytes'] / gb:,.1f} GB")
    for k, b in res["by_kind"].items():
        print(f"  {k:28s} {b / gb:10,.1f} GB  {100 * b / res['total_bytes']:5.1f}%")
    for b, c, name, op in res["rows"][:args.top]:
        print(f"{b / gb:9.1f} GB {c:6d} × {op:18s} {name[-120:]}")
    print("JSON " + json.dumps({"total_bytes": res["total_bytes"], "by_kind": res["by_kind"],
                                "top": [{"bytes": b, "runs": c, "op_name": n, "opcode": o}
                                        for b, c, n, o in res["rows"][:args.top]]}))


if __name__ == "__main__":
    main()
