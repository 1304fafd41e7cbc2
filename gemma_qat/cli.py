"""`gemma-qat` command line: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


PIPELINE_COMMANDS = ("pipelines.train", "pipelines.export", "pipelines.evaluate", "pipelines.preflight",
                     "pipelines.teacher_cache")  # each module: register(subparsers)


def _cmd_info(args) -> int:
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


def _cmd_import_hf(args) -> int:
    import jax
    import jax.numpy as jnp

    from gemma_qat.checkpoint import CheckpointMeta, save_model
    from gemma_qat.hf import load_hf

    dtype = {"keep": None, "bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    config, params = load_hf(args.hf_dir, dtype=dtype)
    stored = str(jax.tree.leaves(params)[0].dtype)
    save_model(args.out_dir, params, config, force=args.force,
               meta=CheckpointMeta(kind="float", param_dtype=stored, source=str(Path(args.hf_dir).absolute())))
    print(f"imported {config.name} ({config.num_layers} layers, {stored}) → {args.out_dir}")
    return 0


def _cmd_logits(args) -> int:
    import numpy as np

    from gemma_qat.inference import forward_logits
    from gemma_qat.checkpoint import load_model

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


def _cmd_quantize(args) -> int:
    import dataclasses

    from gemma_qat.checkpoint import load_model, read_meta, save_model
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


def _cmd_demo(args) -> int:
    from pipelines.demo import run_demo
    return run_demo(Path(args.workdir), fresh=args.fresh)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemma-qat", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameter counts of a model variant (no memory used)")
    s.add_argument("--model", required=True, help="e2b, e4b, 12b, 26b-a4b, 31b, bench-1b or tiny-*")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("import-hf", help="Hugging Face Gemma 4 folder → gemma-qat Orbax checkpoint")
    s.add_argument("hf_dir")
    s.add_argument("out_dir")
    s.add_argument("--dtype", choices=["keep", "bfloat16", "float32"], default="keep")
    s.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    s.set_defaults(fn=_cmd_import_hf)

    s = sub.add_parser("logits", help="forward pass on given token ids, float32 logits [T, V]")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--tokens", required=True, help="comma-separated token ids, e.g. 2,651,1234")
    s.add_argument("--out", help="write logits to this .npy file")
    s.set_defaults(fn=_cmd_logits)

    s = sub.add_parser("quantize", help="post-training quantization of a float checkpoint (the PTQ baseline)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--recipe", required=True, help="q4_0, mobile, mobile-e2b or mobile-e4b")
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.add_argument("--backend", choices=("formats", "aqt"), default="formats",
                   help="who computes the fake-quant: formats.py or AQT (aqtp); the same bytes either way")
    s.set_defaults(fn=_cmd_quantize)

    s = sub.add_parser("demo", help="the embedded default: runs on CPU with no downloads")
    s.add_argument("--workdir", default="runs/demo")
    s.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    s.set_defaults(fn=_cmd_demo)

    # Pipelines that own their subcommands: each module has `register(subparsers)`.
    for name in PIPELINE_COMMANDS:
        importlib.import_module(name).register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # User errors: one clear line, no traceback.
        print(f"gemma-qat {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
