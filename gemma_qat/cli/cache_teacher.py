"""`gemma-qat cache-teacher`: run the teacher once over the training rows and cache its top-k
log-probs (gemma_qat/train/teacher_cache.py); a run with `teacher.cache = OUT` then distills from the
cache with no teacher forward.

    gemma-qat cache-teacher --teacher ckpt/31b --data "jsonl:/data/*.jsonl" --tokenizer tok.model \\
        --out cache/31b-k64 --seq-len 4096 --batch 64 --num-batches 2000 [--k 64 --temperature 1.0]

--seq-len and --temperature must equal the run's data.seq_len and distill.temperature (checked when
training starts); --seed is data.seed, so the cached rows are the rows that run would have read.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher model checkpoint folder")
    p.add_argument("--data", required=True, help="data spec, as data.spec (e.g. jsonl:/data/*.jsonl)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model / tokenizer.json, as data.tokenizer")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--batch", type=int, required=True, help="rows per teacher forward")
    p.add_argument("--num-batches", type=int, required=True, help="rows cached = batch × num-batches")
    p.add_argument("--k", type=int, default=64, help="top-k log-probs kept per token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="data shuffle seed (the run's data.seed)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="storage of the log-probs (float16 halves the cache)")
    p.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per logits chunk (memory B·chunk·V)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _run_args(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from gemma_qat.train.teacher_cache import build_teacher_cache

    meta = build_teacher_cache(
        args.teacher, args.data, args.tokenizer, args.out, k=args.k, seq_len=args.seq_len, batch=args.batch,
        num_batches=args.num_batches, temperature=args.temperature, seed=args.seed, dtype=args.dtype,
        compute_dtype=args.compute_dtype, chunk_size=args.chunk_size, force=args.force)
    print(f"cached {meta['rows']} rows × {meta['seq_len']} tokens, top-{meta['k']} {meta['dtype']} log-probs "
          f"at T={meta['temperature']} → {args.out}")
    return 0


def register(subparsers) -> None:
    """The `gemma-qat cache-teacher` subcommand."""
    s = subparsers.add_parser("cache-teacher", help="cache the teacher's top-k log-probs for offline distillation")
    _add_arguments(s)
    s.set_defaults(fn=_run_args)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gemma_qat.cli.cache_teacher ...`: this one command, without the subcommand word."""
    p = argparse.ArgumentParser(prog="python -m gemma_qat.cli.cache_teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return _run_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
