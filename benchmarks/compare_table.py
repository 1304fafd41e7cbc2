"""The table of one `compare_peer.sh` run: ours (lean step, and the pipeline's step) beside the compiled and
eager peer, with the ratios of tokens/s. Reads OUT/ours.txt, OUT/ours-pipeline.txt (`JSON [...]` lines of
bench_step.py) and OUT/peer-compiled.txt, OUT/peer-eager.txt (the peer's `PEER config kind {...}` line).

    python benchmarks/compare_table.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODES = ("plain", "qat", "qat+teacher")


def ours(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line[5:]) for line in path.read_text().splitlines() if line.startswith("JSON ")]
    return {r["mode"]: r for r in (rows[-1] if rows else [])}


def peer(path: Path) -> dict[str, dict]:
    """Each mode's line (`plain {...}`), so a mode that finished counts even when a later one ran out of time
    before the closing `PEER` line."""
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        mode, _, body = line.partition(" ")
        if mode in MODES and body.startswith("{"):
            rows[mode] = json.loads(body)
    return {mode: r for mode, r in rows.items() if "tokens_per_s" in r}


def _tok(r: dict | None) -> str:
    return "–" if not r else f"{r['tokens_per_s']:,.0f} ({100 * r['mfu']:.1f}%)"


def _ratio(a: dict | None, b: dict | None) -> str:
    return "–" if not a or not b else f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}×"


def table(out: Path) -> str:
    lean, pipe = ours(out / "ours.txt"), ours(out / "ours-pipeline.txt")
    comp, eager = peer(out / "peer-compiled.txt"), peer(out / "peer-eager.txt")
    device = next((r["device"] for r in [*lean.values(), *pipe.values()]), "?")
    lines = [f"device: {device}", "",
             "| mode | ours step | ours tok/s (MFU) | peer compiled tok/s (MFU) | peer eager tok/s | "
             "ours / compiled | ours / eager |", "|---|---|---|---|---|---|---|"]
    rows = [(m, lean[m], m) for m in lean] + [("qat+teacher, pipeline step", pipe[m], m) for m in pipe]
    for label, r, mode in rows:
        lines.append(f"| {label} | {1e3 * r['step_s']:.1f} ms | {_tok(r)} | {_tok(comp.get(mode))} | "
                     f"{_tok(eager.get(mode))} | {_ratio(r, comp.get(mode))} | {_ratio(r, eager.get(mode))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
