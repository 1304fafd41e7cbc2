"""`gemma-qat logits --checkpoint DIR --tokens 2,651,1234 [--out FILE.npy]`: a float32 forward pass
(model/inference.py) on given token ids."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    s = subparsers.add_parser("logits", help="forward pass on given token ids, float32 logits [T, V]")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--tokens", required=True, help="comma-separated token ids, e.g. 2,651,1234")
    s.add_argument("--out", help="write logits to this .npy file")
    s.set_defaults(fn=run)


def run(args) -> int:
    import numpy as np

    from gemma_qat.model.checkpoint import load_model
    from gemma_qat.model.inference import forward_logits

    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    config, params = load_model(args.checkpoint)
    logits = forward_logits(config, params, tokens)  # [T, V] float32
    if args.out:
        np.save(args.out, logits)
        print(f"saved logits {logits.shape} float32 → {args.out}")
    else:
        top = np.argmax(logits, axis=-1)
        print(json.dumps({"shape": list(logits.shape), "argmax": top.tolist()}))
    return 0
