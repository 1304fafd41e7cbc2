"""`gemma-qat eval` and `gemma-qat generate`: thin wiring from the command line to gemma_qat.eval.

  gemma-qat eval --teacher DIR --candidates qat=runs/q4/model gguf=out/s.gguf --ptq --data SPEC \\
      --tokenizer tok.model [--recipe q4_0] [--report DIR] [--curves qat=runs/q4/metrics.jsonl] [--json]
  gemma-qat generate --checkpoint DIR --tokenizer tok.model --prompt "def f(" [--chat] [--temperature 0.7]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    s.set_defaults(fn=run_eval)

    s = subparsers.add_parser("generate", help="sample text from a checkpoint or export (KV-cache decoding)")
    s.add_argument("--checkpoint", required=True, help="checkpoint folder or q4_0/mobile export folder")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--prompt", required=True)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's user/model turn template")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=run_generate)


def _pairs(specs: list[str], what: str) -> dict[str, str]:
    from gemma_qat.eval.candidates import parse_candidate_spec

    out = {}
    for spec in specs:
        name, path = parse_candidate_spec(spec)
        if name in out:
            raise ValueError(f"{what} name {name!r} is given twice")
        out[name] = path
    return out


def run_eval(args) -> int:
    from gemma_qat.data import Tokenizer, check_vocab, make_eval_batches
    from gemma_qat.eval.candidates import from_checkpoint, load_candidate, ptq_candidate
    from gemma_qat.eval.metrics import evaluate, quant_errors
    from gemma_qat.quant.recipe import resolve_recipe

    specs = _pairs(args.candidates, "candidate")  # check every argument before loading anything
    curves = _pairs(args.curves, "curve")
    if not specs and not args.ptq:
        raise ValueError("nothing to compare: give --candidates NAME=PATH ... and/or --ptq")
    for name, path in specs.items():  # fail before the (slow) teacher load
        if not Path(path).exists():
            raise FileNotFoundError(f"candidate {name!r}: {path} does not exist")
    teacher = from_checkpoint("teacher", args.teacher)
    if teacher.kind != "float":
        raise ValueError(f"--teacher {args.teacher} is a {teacher.kind} checkpoint; give the float teacher")
    if "teacher" in specs:
        raise ValueError("the name 'teacher' is the reference row; choose another candidate name")
    tok = Tokenizer.load(args.tokenizer)
    check_vocab(tok, teacher.config.vocab_size)
    cands = []
    resolution = resolve_recipe(args.recipe, teacher.config)
    if args.ptq:
        name = f"ptq-{resolution.recipe.name}"
        cands.append(ptq_candidate(name, teacher.config, teacher.variables["params"], resolution,
                                   source=f"PTQ {resolution.recipe.name} of {args.teacher}"))
    for name, path in specs.items():
        cands.append(load_candidate(name, path))
    batches = make_eval_batches(args.data, tok, seq_len=args.seq_len, global_batch_size=args.batch_size,
                                shard_index=0, shard_count=1, num_batches=args.batches)
    batches = [b for b in batches if b["loss_mask"].any()]  # num_batches pads short data with empty batches
    if not batches:
        raise ValueError(f"--data {args.data} yields no evaluation batches")
    progress = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        results = evaluate(teacher, cands, batches, chunk_size=args.chunk_size, progress=progress)
    finally:
        for c in cands:
            if c.close:
                c.close()
    results["data"] = args.data
    errors = quant_errors(teacher.config, teacher.variables["params"], resolution)
    if args.report:
        from gemma_qat.eval.report import write_report
        write_report(args.report, results, quant_errors=errors, curves=curves or None,
                     quant_label=f"teacher weights under {resolution.recipe.name}")
    if args.json:
        print(json.dumps({**results, "quant_errors": errors[:10]}, indent=1))
    else:
        print_table(results)
        if args.report:
            print(f"report → {args.report}/report.md")
    return 0


def print_table(results: dict) -> None:
    from gemma_qat.eval.report import recovery_sentences

    print(f"{'candidate':16s} {'kind':7s} {'PPL':>10s} {'KL mean':>10s} {'± s.e.':>9s} {'top-1':>7s} {'recovery':>9s}")
    for r in results["rows"]:
        rec = "—" if r["recovery"] is None else f"{100 * r['recovery']:.1f}%"
        print(f"{r['name']:16s} {r['kind']:7s} {r['ppl']:10.4f} {r['kl_mean']:10.4g} {r['kl_sem']:9.2g} "
              f"{100 * r['top1']:6.2f}% {rec:>9s}")
    for line in recovery_sentences(results):
        print(line.replace("`", ""))


def run_generate(args) -> int:
    from gemma_qat.data import Tokenizer, check_vocab
    from gemma_qat.eval.candidates import load_candidate
    from gemma_qat.eval.generate import generate_text

    cand = load_candidate("model", args.checkpoint)
    if not cand.is_jax:
        raise ValueError(f"{args.checkpoint} is a {cand.kind} file; run it with llama.cpp (generate runs "
                         "gemma-qat checkpoints and exports)")
    tok = Tokenizer.load(args.tokenizer)
    check_vocab(tok, cand.config.vocab_size)
    out = generate_text(cand, tok, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(json.dumps(out, indent=1) if args.json else out["text"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A parser with only these subcommands (tests, or running this module directly)."""
    p = argparse.ArgumentParser(prog="gemma-qat")
    register(p.add_subparsers(dest="command", required=True))
    return p
