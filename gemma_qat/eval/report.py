"""The evaluation report folder: results.json, report.md and PNG plots (matplotlib, Agg backend, so it
works on headless machines).

  results.json           everything: metric rows, recovery, per-tensor/per-layer quant error, curves read
  report.md              metrics table per candidate, the recovery statement in words, top-10 tensors
  ptq_vs_qat.png         perplexity and KL(teacher‖candidate) bars per candidate (KL with ±1 std error)
  quant_error_layers.png relative quantization error per layer of the recipe on the teacher weights
  training_curves.png    from <run_dir>/metrics.jsonl files (when given): each student's KL to the teacher
                         (log) beside its PTQ baseline, top-1 agreement; CE of runs without a teacher
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gemma_qat.eval.metrics import layer_errors

TOP_TENSORS = 10


def read_curves(curves: dict[str, str | Path]) -> dict[str, list[dict]]:
    """{label: metrics.jsonl path} -> {label: records}; a folder means its metrics.jsonl."""
    out = {}
    for label, path in curves.items():
        p = Path(path)
        p = p / "metrics.jsonl" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"training curve {label!r}: {p} not found (expected a run's metrics.jsonl)")
        out[label] = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the report's plots need matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # no display needed; must precede the pyplot import
    import matplotlib.pyplot as plt
    return plt


def _fmt(x, spec=".4g") -> str:
    return "—" if x is None else format(x, spec)


def recovery_sentences(results: dict) -> list[str]:
    rows = {r["name"]: r for r in results["rows"]}
    ref = rows[results["reference"]]
    lines = []
    for r in results["rows"]:
        if r["name"] == ref["name"] or r["kind"] == "ptq":
            continue
        if r["recovery"] is None:
            lines.append(f"`{r['name']}`: recovery undefined — {r['recovery_note']}.")
            continue
        ptq = rows[r["recovery_vs"]]
        lines.append(f"`{r['name']}` recovers {100 * r['recovery']:.1f}% of the perplexity gap that PTQ "
                     f"(`{ptq['name']}`) opens against the teacher: PPL teacher {ref['ppl']:.4g} → PTQ "
                     f"{ptq['ppl']:.4g} → {r['name']} {r['ppl']:.4g}; KL to the teacher {ptq['kl_mean']:.4g} "
                     f"(PTQ) vs {r['kl_mean']:.4g}.")
    return lines


def format_table(results: dict) -> str:
    """The results as a console table (one row per candidate) and the recovery sentences."""
    lines = [f"{'candidate':16s} {'kind':7s} {'PPL':>10s} {'KL mean':>10s} {'± s.e.':>9s} {'KL p99':>9s} "
             f"{'top-1':>7s} {'recovery':>9s}"]
    for r in results["rows"]:
        rec = "—" if r["recovery"] is None else f"{100 * r['recovery']:.1f}%"
        lines.append(f"{r['name']:16s} {r['kind']:7s} {r['ppl']:10.4f} {r['kl_mean']:10.4g} {r['kl_sem']:9.2g} "
                     f"{_fmt(r.get('kl_p99'), '9.3g')} {100 * r['top1']:6.2f}% {rec:>9s}")
    lines += [line.replace("`", "") for line in recovery_sentences(results)]
    return "\n".join(lines)


def _markdown(results: dict, errors: list[dict] | None, plots: list[str], title: str, label: str) -> str:
    md = [f"# {title}", "",
          f"Reference: `{results['reference']}` · {results['tokens']:,d} scored tokens in {results['batches']} "
          "batches. KL is KL(teacher ‖ candidate) per token (nats); ± is the standard error over tokens "
          "(a lower bound: tokens of a document are correlated).", "",
          "| candidate | kind | recipe | PPL | NLL | KL mean ± s.e. | KL std | KL p99 / p99.9 | top-1 agree | recovery |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        rec = "—" if r["recovery"] is None else f"{100 * r['recovery']:.1f}%"
        md.append(f"| {r['name']} | {r['kind']} | {r['recipe'] or '—'} | {r['ppl']:.4f} | {r['nll']:.4f} | "
                  f"{r['kl_mean']:.4g} ± {r['kl_sem']:.2g} | {r['kl_std']:.4g} | {_fmt(r.get('kl_p99'))} / "
                  f"{_fmt(r.get('kl_p999'))} | {100 * r['top1']:.2f}% | {rec} |")
    md += ["", "## Recovery of the PTQ gap", "",
           "recovery = (PPL_PTQ − PPL_candidate) / (PPL_PTQ − PPL_teacher): 100% = as good as the teacher, "
           "0% = no better than PTQ.", ""]
    md += [f"- {s}" for s in recovery_sentences(results)] or ["- (no quantized candidates besides PTQ)"]
    if errors:
        md += ["", f"## Quantization error per tensor (top {TOP_TENSORS}{', ' + label if label else ''})", "",
               "‖W − fq(W)‖ / ‖W‖ for every quantized tensor, worst first:", "",
               "| tensor | format | elements | rel. error |", "|---|---|---|---|"]
        md += [f"| {e['param']} | {e['format']} | {e['size']:,d} | {e['rel_error']:.4f} |" for e in errors[:TOP_TENSORS]]
    if plots:
        md += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(md) + "\n"


def write_report(out_dir, results: dict, *, quant_errors: list[dict] | None = None,
                 quant_label: str = "", curves: dict[str, str | Path] | None = None,
                 title: str = "gemma-qat evaluation") -> Path:
    """Writes the report folder (created if needed; files inside are overwritten). `quant_errors` are
    metrics.quant_errors rows, `quant_label` says whose weights under which recipe. Returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    curve_data = read_curves(curves) if curves else {}
    plots = [_plot_bars(plt, results, out / "ptq_vs_qat.png")]
    layers = layer_errors(quant_errors) if quant_errors else []
    if layers:
        plots.append(_plot_layers(plt, layers, out / "quant_error_layers.png", quant_label))
    if curve_data:
        plots.append(_plot_curves(plt, curve_data, out / "training_curves.png",
                                  curve_baselines(results, list(curve_data))))
    payload = {**results, "quant_errors": quant_errors or [], "quant_label": quant_label, "layer_errors": layers,
               "curves": {k: str(v) for k, v in (curves or {}).items()}, "plots": plots}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=_json_default))
    (out / "report.md").write_text(_markdown(results, quant_errors, plots, title, quant_label))
    return out


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _plot_bars(plt, results: dict, path: Path) -> str:
    rows = results["rows"]
    names = [r["name"] for r in rows]
    colors = ["tab:gray" if r["name"] == results["reference"] else "tab:red" if r["kind"] == "ptq" else "tab:blue"
              for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4))
    a.bar(names, [r["ppl"] for r in rows], color=colors)
    a.set_title("perplexity (lower is better)")
    lo = min(r["ppl"] for r in rows)
    a.set_ylim(bottom=max(0.0, lo - 0.1 * (max(r["ppl"] for r in rows) - lo + 1e-9) - 0.02 * lo))
    b.bar(names, [r["kl_mean"] for r in rows], yerr=[r["kl_sem"] for r in rows], color=colors, capsize=3)
    b.set_title("KL(teacher ‖ candidate) per token")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_layers(plt, layers: list[dict], path: Path, label: str) -> str:
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 2), 3.5))
    ax.bar([l["group"].replace("layer_", "") for l in layers], [l["rel_error"] for l in layers], color="tab:orange")
    ax.set_xlabel("layer")
    ax.set_ylabel("‖W − fq(W)‖ / ‖W‖")
    ax.set_title(f"quantization error per layer ({label})" if label else "quantization error per layer")
    ax.tick_params(axis="x", rotation=90)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def curve_baselines(results: dict, labels: list[str]) -> dict[str, tuple[str, float]]:
    """A curve labelled like a result row gets that row's PTQ baseline: label -> (PTQ row, its mean KL)."""
    rows = {r["name"]: r for r in results.get("rows", [])}
    vs = {label: rows[label].get("recovery_vs") for label in labels
          if label in rows and label != results.get("reference") and rows[label]["kind"] != "ptq"}
    return {label: (ptq, rows[ptq]["kl_mean"]) for label, ptq in vs.items() if ptq in rows}


def _series(recs: list[dict], key: str) -> list[tuple]:
    return [(r["step"], r[key]) for r in recs if key in r and "step" in r and math.isfinite(r[key])]


def _plot_curves(plt, data: dict[str, list[dict]], path: Path, baselines: dict[str, tuple[str, float]]) -> str:
    """Students (runs that distil: some kl > 0) get their KL to the teacher on a log axis, each with its
    PTQ baseline's held-out KL as a dashed line of the same colour (`baselines`: label -> (row, kl)),
    and their top-1 agreement; runs trained on cross-entropy alone (the teacher) get their own CE panel."""
    students = {k: v for k, v in data.items() if any(r.get("kl", 0) > 0 for r in v)}
    ce_runs = {k: v for k, v in data.items() if k not in students}
    panels = (["ce"] if ce_runs else []) + (["kl", "top1_agree"] if students else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "ce":
            for label, recs in ce_runs.items():
                pts = _series(recs, "ce") or _series(recs, "loss")
                if pts:
                    ax.plot(*zip(*pts), label=label)
            ax.set_title("cross-entropy (trained without a teacher)")
        else:
            for label, recs in students.items():
                pts = _series(recs, panel)
                if not pts:
                    continue
                line, = ax.plot(*zip(*pts), label=label)
                if panel == "kl" and label in baselines and baselines[label][1] > 0:
                    row, kl = baselines[label]
                    ax.axhline(kl, ls="--", lw=1, color=line.get_color(), label=f"{row} (held-out)")
            if panel == "kl":
                ax.set_yscale("log")
                ax.set_title("KL to the teacher (nats per token)")
            else:
                ax.set_title("top-1 agreement with the teacher")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
