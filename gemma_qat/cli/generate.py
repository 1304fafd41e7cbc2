"""`gemma-qat generate`: sample text from a checkpoint or export (eval/generate.py, KV-cache decoding).

  gemma-qat generate --checkpoint DIR --tokenizer tok.model --prompt "def f(" [--chat] [--temperature 0.7]
"""

from __future__ import annotations

import json


def register(subparsers) -> None:
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
    s.set_defaults(fn=run)


def run(args) -> int:
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
