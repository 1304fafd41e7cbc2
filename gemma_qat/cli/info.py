"""`gemma-qat info --model NAME [--json]`: parameter counts of a model variant (no memory used)."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    s = subparsers.add_parser("info", help="parameter counts of a model variant (no memory used)")
    s.add_argument("--model", required=True, help="e2b, e4b, 12b, 26b-a4b, 31b, bench-1b or tiny-*")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=run)


def run(args) -> int:
    from gemma_qat.model.config import get_config
    from gemma_qat.model.params import count_params

    cfg = get_config(args.model)
    counts = count_params(cfg)
    info = {"model": cfg.name, **counts, "config": cfg.to_dict()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{cfg.name}: {cfg.num_layers} layers ({cfg.layer_types.count('global')} global), d_model {cfg.d_model}, "
          f"vocab {cfg.vocab_size}")
    for k, v in counts.items():
        print(f"  {k:28s} {v:>16,d}")
    return 0
