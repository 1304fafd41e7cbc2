"""`gemma-qat eval`: thin wiring from the command line to gemma_qat.eval.compare.

  gemma-qat eval --teacher DIR --candidates qat=runs/q4/model gguf=out/s.gguf --ptq --data SPEC \\
      --tokenizer tok.model [--recipe q4_0] [--report DIR] [--curves qat=runs/q4/metrics.jsonl] [--json]
"""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    s = subparsers.add_parser("eval", help="perplexity, KL and top-1 agreement of candidates vs the teacher; "
                              "PTQ-gap recovery; optional report folder with plots")
    s.add_argument("--teacher", required=True, help="float teacher checkpoint folder (the reference row)")
    s.add_argument("--candidates", nargs="*", action="extend", default=[], metavar="NAME=PATH",
                   help="checkpoint folder (float / ptq / QAT student), q4_0 or mobile export folder, or .gguf file")
    s.add_argument("--data", required=True, help="held-out data spec, e.g. jsonl:/data/val.jsonl")
    s.add_argument("--tokenizer", required=True, help="tokenizer.model or tokenizer.json")
    s.add_argument("--recipe", default="q4_0", help="recipe of the PTQ baseline and of the per-tensor error table")
    s.add_argument("--ptq", action="store_true", help="add the teacher's PTQ baseline under --recipe as a candidate")
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--batches", type=int, default=None, help="evaluate at most this many batches (default: all)")
    s.add_argument("--chunk-size", type=int, default=256, help="positions per logits chunk (memory bound)")
    s.add_argument("--report", help="write results.json, report.md and PNG plots into this folder")
    s.add_argument("--curves", nargs="*", action="extend", default=[], metavar="LABEL=PATH",
                   help="training curves for the report: a run's metrics.jsonl (or its run folder)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.set_defaults(fn=run)


def _pairs(specs: list[str], what: str) -> dict[str, str]:
    from gemma_qat.eval.candidates import parse_candidate_spec

    out = {}
    for spec in specs:
        name, path = parse_candidate_spec(spec)
        if name in out:
            raise ValueError(f"{what} name {name!r} is given twice")
        out[name] = path
    return out


def run(args) -> int:
    from gemma_qat.eval.compare import compare
    from gemma_qat.eval.report import format_table

    specs = _pairs(args.candidates, "candidate")  # check every argument before loading anything
    curves = _pairs(args.curves, "curve")
    progress = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    results, errors = compare(args.teacher, specs, data=args.data, tokenizer=args.tokenizer, recipe=args.recipe,
                              ptq=args.ptq, seq_len=args.seq_len, batch_size=args.batch_size,
                              batches=args.batches, chunk_size=args.chunk_size, report=args.report,
                              curves=curves, progress=progress)
    if args.json:
        print(json.dumps({**results, "quant_errors": errors[:10]}, indent=1))
    else:
        print(format_table(results))
        if args.report:
            print(f"report → {args.report}/report.md")
    return 0
