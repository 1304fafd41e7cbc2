"""`gemma-qat quantize --checkpoint DIR --recipe NAME --out DIR [--backend auto|formats|aqt] [--force]`:
post-training quantization of a float checkpoint (quant/ptq.py), the baseline QAT is measured against."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    s = subparsers.add_parser("quantize", help="post-training quantization of a float checkpoint (the PTQ baseline)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--recipe", required=True, help="q4_0, mobile, mobile-e2b or mobile-e4b")
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.add_argument("--backend", choices=("auto", "formats", "aqt"), default="auto",
                   help="who computes the fake-quant: formats.py, AQT (aqtp), or auto (AQT where the recipe "
                        "has no Q4_0 weight: quant/policy.py choose_backend); the same bytes either way")
    s.set_defaults(fn=run)


def run(args) -> int:
    import dataclasses

    from gemma_qat.model.checkpoint import load_model, read_meta, save_model
    from gemma_qat.quant.ptq import dequantized_params
    from gemma_qat.quant.recipe import resolve_recipe

    config, params = load_model(args.checkpoint)
    resolution = resolve_recipe(args.recipe, config)
    print(resolution.report())
    meta = dataclasses.replace(read_meta(args.checkpoint), kind="ptq", recipe=resolution.recipe.to_dict(),
                               source=str(Path(args.checkpoint).absolute()))
    save_model(args.out, dequantized_params(config, params, resolution, args.backend), config, meta=meta,
               force=args.force)
    print(f"PTQ ({args.recipe}) of {args.checkpoint} → {args.out}")
    return 0
