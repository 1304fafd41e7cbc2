"""Which buffers a compiled step keeps live at its peak: a liveness pass over the scheduled entry
computation of an HLO text (`preflight --hlo-out`, `pod_compile.py --hlo`), grouped by shape and
jax op_name with the layer number folded, largest first.

    python benchmarks/hlo_liveness.py runs/pod/hlo/e2b-q4_0-8xH100.hlo.gz --top 25
    python benchmarks/hlo_liveness.py STEP.hlo.gz --shape "f32[4,1,4096,4096,4]"   # each such buffer

A diagnostic, not a memory number: it counts every non-aliasing instruction's result (each element of
a multi-output fusion's tuple on its own) from its definition to its last use in schedule order, and
ignores buffer reuse inside fusions, in-place updates, loop bodies and the allocator's padding and
fragmentation, so it differs from the compiler's figure both ways (E2B on v5p-16: 6.93 GiB here against
libtpu's 8.98 GiB temp). What it is for is finding buffers that live far longer than their layer: it is
how the deferred gradient matmuls behind `layers.tie_gradients` were found (launch/README.md).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import math
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma_qat.preflight import hlo  # noqa: E402

# Results that share their operands' buffers (or only name them): no new allocation.
_BARRIERS = {"opt-barrier", "optimization-barrier"}  # HLO text prints the first
_ALIASING = {"get-tuple-element", "tuple", "bitcast", "all-gather-done", "all-reduce-done",
             "collective-permute-done", "reduce-scatter-done", "async-done", "copy-done",
             "while", "conditional", "parameter"} | _BARRIERS


def liveness(text: str) -> dict:
    """{'peak_bytes', 'at', 'instructions', 'live': [(bytes, name, shape, opcode, op_name)]} for the entry.
    A multi-output fusion's tuple counts per element (`name#k`): its outputs are separate buffers, and a
    small one kept to the end of the step (a norm scale's gradient) does not keep its large siblings."""
    module = hlo.parse(text)
    insts = module.computations[module.entry].instructions
    roots: dict[str, set[str]] = {}
    elements: dict[str, list[str]] = {}  # a tuple-shaped result's element buffers, in order
    size: dict[str, float] = {}
    shape: dict[str, str] = {}
    defined: dict[str, int] = {}
    # An aliasing tuple's (a `tuple`, or an optimization barrier over one) buffers per element: a
    # get-tuple-element of it names that element's buffers only. Without this, a tuple of a layer's input
    # gradient and its weight gradient (layers.tie_gradients; the compiled GPU program keeps the tuple,
    # not the barrier) made the input gradient live as long as the weight gradient, to the end of the step
    # (31B on 4x8xH100: 59 GiB at a "peak" where the compiler's temp is 31 GiB).
    parts_of: dict[str, list[set[str]]] = {}
    for i, ins in enumerate(insts):
        if ins.opcode == "get-tuple-element" and ins.operands[0] in elements:
            roots[ins.name] = {elements[ins.operands[0]][int(ins.attr("index"))]}
            continue
        if ins.opcode == "get-tuple-element" and ins.operands[0] in parts_of:
            roots[ins.name] = set(parts_of[ins.operands[0]][int(ins.attr("index"))])
            continue
        if ins.opcode == "tuple":
            parts_of[ins.name] = [roots.get(o, set()) for o in ins.operands]
        elif ins.opcode in _BARRIERS and ins.operands:
            src = ins.operands[0]
            if src in parts_of:
                parts_of[ins.name] = parts_of[src]
            elif src in elements:
                parts_of[ins.name] = [{e} for e in elements[src]]
        if ins.opcode in _ALIASING:
            roots[ins.name] = set().union(*(roots.get(o, set()) for o in ins.operands))
            continue
        arrays = hlo.arrays(ins.shape)
        if ins.opcode.endswith("-start") and len(arrays) > 1:  # async start: (operands, result) tuple
            parts = [(ins.name, arrays[-1])]
        elif ins.shape.startswith("(") and len(arrays) > 1:
            parts = [(f"{ins.name}#{k}", a) for k, a in enumerate(arrays)]
            elements[ins.name] = [n for n, _ in parts]
        else:
            parts = [(ins.name, None)]
        for n, a in parts:
            size[n] = hlo.nbytes(ins.shape) if a is None else hlo.dtype_bytes(a[0]) * math.prod(a[1])
            shape[n] = ins.shape.split("{")[0] if a is None else f"{a[0]}[{','.join(map(str, a[1]))}]"
            defined[n] = i
        roots[ins.name] = {n for n, _ in parts}
    last = {n: defined[n] for n in size}
    for i, ins in enumerate(insts):
        if ins.opcode == "get-tuple-element" and (ins.operands[0] in elements or ins.operands[0] in parts_of):
            continue  # picks one element; its own users extend that element's life
        for o in ins.operands:
            for r in roots.get(o, ()):
                last[r] = max(last[r], i)
    for r in roots.get(insts[-1].name, ()):  # the step's outputs live to the end
        last[r] = len(insts)
    delta = collections.Counter()
    for n, b in size.items():
        delta[defined[n]] += b
        delta[last[n] + 1] -= b
    current = peak = 0.0
    at = 0
    for i in range(len(insts) + 2):
        current += delta.get(i, 0)
        if current > peak:
            peak, at = current, i
    by_name = {ins.name: ins for ins in insts}
    live = []
    for n in size:
        if defined[n] <= at <= last[n]:
            ins = by_name[n.split("#")[0]]
            live.append((size[n], n, shape[n], ins.opcode, ins.op_name))
    live.sort(reverse=True)
    return {"peak_bytes": peak, "at": insts[min(at, len(insts) - 1)].name, "instructions": len(insts), "live": live}


def grouped(live: list) -> list[tuple[float, int, str, str, str]]:
    """(bytes, count, shape, opcode, op_name with layer_N) over buffers of one shape and origin."""
    groups: dict[tuple, list] = {}
    for b, _, shape, opcode, op_name in live:
        key = (shape[:80], opcode, re.sub(r"layer_\d+", "layer_N", op_name))
        g = groups.setdefault(key, [0.0, 0])
        g[0] += b
        g[1] += 1
    return sorted(((b, n, *key) for key, (b, n) in groups.items()), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hlo", help="compiled HLO text (.gz or plain)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--shape", help="list each live buffer whose shape starts with this, e.g. f32[4,1,4096")
    args = ap.parse_args()
    opener = gzip.open if args.hlo.endswith(".gz") else open
    with opener(args.hlo, "rt") as f:
        res = liveness(f.read())
    gib = 1024**3
    print(f"{res['instructions']} instructions; live at the peak (entry computation, parameters excluded): "
          f"{res['peak_bytes'] / gib:.2f} GiB at {res['at']}")
    rows = grouped(res["live"])
    for b, n, shape, opcode, op_name in rows[:args.top]:
        print(f"{b / gib:9.3f} GiB  {n:4d} × {shape:40s} {opcode:18s} {op_name[-110:]}")
    if args.shape:
        for b, name, shape, opcode, op_name in res["live"]:
            if shape.startswith(args.shape):
                print(f"  {name} {shape} {b / gib:.3f} GiB {op_name[-100:]}")
    print("JSON " + json.dumps({"peak_bytes": res["peak_bytes"], "at": res["at"],
                                "top": [{"bytes": b, "count": n, "shape": s, "opcode": o, "op_name": on}
                                        for b, n, s, o, on in rows[:args.top]]}))


if __name__ == "__main__":
    main()
