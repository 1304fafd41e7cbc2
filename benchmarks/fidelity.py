"""Fidelity where quantization hurts: the demo's chain (teacher from scratch → PTQ, QAT Q4_0, QAT mobile →
exports → evaluation) at a size where Q4_0 costs a measurable KL, on one GPU.

    python benchmarks/fidelity.py --work /tmp/fid --out $OUT                        # fid-e2b on a GPU
    python benchmarks/fidelity.py --work /tmp/fid --model tiny-e2b --teacher-steps 20 --qat-steps 10 \\
        --batch 8 --seq 128 --corpus-mb 2 --vocab 512 --dtype float32               # the plumbing, on a CPU

The teacher is `fid-e2b` (155 M parameters, E2B's structure: PLE, KV sharing, sliding/global) trained on
Python sources and docstrings (`data.spec = python-corpus`: the installation's standard library, about 30 MB,
then its site-packages, up to --corpus-mb; --stdlib-only stops after the stdlib), with its own SentencePiece
tokenizer. Size the corpus to the teacher's tokens (steps × batch × seq, about 3.3 bytes a token at vocab
8192): a teacher that sees its corpus many times over-fits, and its held-out distributions stop being a
fair target (BENCHMARKS.md, the first run). Both QAT students get the same token
budget (--qat-steps × batch × seq) from the frozen teacher. The rows (gemma_qat.eval: PPL, KL mean ± s.e.,
KL p99 / p99.9, top-1 agreement, recovery of the PTQ gap) and each stage's seconds and tokens/s go to
OUT/fidelity.json and OUT/fidelity.md, the report's plots (KL vs step beside each PTQ baseline) to OUT.
Stages reuse finished outputs in --work, so a run cut by a time limit continues where it stopped.
The GGUF row needs `llama_cpp` importable; on a machine without a compiler or internet, a built
llama-cpp-python package folder (ctypes over its own shared libraries, so not tied to the Python minor
version; built for AVX2 it runs on any recent x86-64) can travel on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from gemma_qat.cli.demo import Chain, run_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="the chain's folder (stages reuse what is there)")
    ap.add_argument("--out", help="where fidelity.json / .md and the plots go (default: WORK/out)")
    ap.add_argument("--model", default="fid-e2b")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--qat-steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--corpus-mb", type=int, default=160, help="the stdlib (about 30 MB), then site-packages")
    ap.add_argument("--stdlib-only", action="store_true", help="no site-packages in the corpus")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (float32 on a CPU)")
    ap.add_argument("--eval-batches", type=int, default=24)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()

    work = Path(args.work)
    out = Path(args.out or work / "out")
    out.mkdir(parents=True, exist_ok=True)
    chain = Chain(
        teacher_steps=args.teacher_steps, qat_steps=args.qat_steps, qat_lr=args.qat_lr, qat_batch=None,
        overrides=(f"model.name={args.model}", f"data.seq_len={args.seq}", f"data.global_batch_size={args.batch}",
                   f"data.corpus_bytes={args.corpus_mb << 20}", f"data.corpus_site_packages={not args.stdlib_only}",
                   f"data.tokenizer_vocab={args.vocab}",
                   f"optimizer.compute_dtype={args.dtype}", f"optimizer.lr={args.teacher_lr}",
                   f"distill.chunk_size={min(args.seq, 512)}", "checkpoint.every_steps=1000",
                   "logging.every_steps=25"),
        eval_seq=args.seq, eval_batch=8, eval_batches=args.eval_batches)
    t0 = time.perf_counter()
    run_demo(work, fresh=args.fresh, chain=chain)
    wall = time.perf_counter() - t0

    results = json.loads((work / "report" / "results.json").read_text())
    stages = json.loads((work / "stages.json").read_text()) if (work / "stages.json").exists() else {}
    tokens = {"teacher": args.teacher_steps * args.batch * args.seq,
              "qat-q4_0": args.qat_steps * args.batch * args.seq, "qat-mobile": args.qat_steps * args.batch * args.seq}
    speed = {k: {"seconds": stages[k], "tokens": n, "tokens_per_s": n / stages[k]} for k, n in tokens.items() if k in stages}
    payload = {"args": vars(args), "wall_s": wall, "stages_s": stages, "training": speed, "results": results}
    (out / "fidelity.json").write_text(json.dumps(payload, indent=1))
    (out / "fidelity.md").write_text(_markdown(payload))
    for png in (work / "report").glob("*.png"):
        shutil.copy(png, out / png.name)
    print((out / "fidelity.md").read_text())


def _markdown(p: dict) -> str:
    r, a = p["results"], p["args"]
    md = [f"model {a['model']}, teacher {a['teacher_steps']} steps, QAT {a['qat_steps']} steps each, "
          f"batch {a['batch']} × {a['seq']}, corpus {a['corpus_mb']} MB, vocab {a['vocab']}; "
          f"{r['tokens']:,d} held-out tokens", "",
          "| candidate | PPL | KL mean ± s.e. | KL p99 / p99.9 | top-1 | recovery of the PPL gap | KL vs its PTQ |",
          "|---|---|---|---|---|---|---|"]
    rows = {x["name"]: x for x in r["rows"]}
    for x in r["rows"]:
        ptq = rows.get(x.get("recovery_vs") or "")
        own = x["name"] == r["reference"] or x["kind"] == "ptq"  # the teacher and the baselines themselves
        cut = f"{x['kl_mean'] / ptq['kl_mean']:.2f}×" if ptq and not own and ptq["kl_mean"] > 0 else "–"
        rec = "–" if own or x["recovery"] is None else f"{100 * x['recovery']:.0f}%"
        md.append(f"| {x['name']} | {x['ppl']:.3f} | {x['kl_mean']:.4g} ± {x['kl_sem']:.1g} | "
                  f"{x['kl_p99']:.3g} / {x['kl_p999']:.3g} | {100 * x['top1']:.1f}% | {rec} | {cut} |")
    md += ["", "| stage | seconds | tokens | tokens/s |", "|---|---|---|---|"]
    for k, v in p["stages_s"].items():
        t = p["training"].get(k)
        md.append(f"| {k} | {v:.0f} | {t['tokens']:,d} | {t['tokens_per_s']:,.0f} |" if t else f"| {k} | {v:.0f} | | |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
