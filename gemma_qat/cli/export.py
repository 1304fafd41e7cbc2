"""`gemma-qat export`: thin wiring from the command line to gemma_qat.export.

Every writer is atomic (a temporary sibling renamed into place, or temp file + os.replace for GGUF)
and refuses to replace an existing output unless --force.
"""

from __future__ import annotations

from pathlib import Path

FORMATS = ("q4_0", "mobile", "safetensors", "gguf")


def register(subparsers) -> None:
    s = subparsers.add_parser("export", help="trained student checkpoint → q4_0 / mobile Orbax, HF safetensors or GGUF")
    s.add_argument("--checkpoint", required=True, help="student model checkpoint folder (params/, model_config.json, "
                   "meta.json with the recipe)")
    s.add_argument("--format", required=True, choices=FORMATS)
    s.add_argument("--out", required=True, help="output folder (GGUF: output file)")
    s.add_argument("--recipe", help="recipe preset, only for checkpoints whose meta.json names none")
    s.add_argument("--tokenizer", help="tokenizer file to copy into the export (GGUF: its vocabulary)")
    s.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="safetensors only: dtype of the written weights")
    s.add_argument("--max-shard-bytes", type=int, default=None, help="safetensors only: shard size limit")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(fn=run)


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:  # before loading anything
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    kw = dict(recipe=args.recipe, tokenizer=args.tokenizer, force=args.force)
    if args.format == "q4_0":
        from gemma_qat.export.orbax_q4_0 import export_q4_0
        export_q4_0(args.checkpoint, out, **kw)
    elif args.format == "mobile":
        from gemma_qat.export.mobile import export_byte_report, export_mobile, format_byte_report
        export_mobile(args.checkpoint, out, **kw)
        print(format_byte_report(export_byte_report(out)))
    elif args.format == "safetensors":
        from gemma_qat.export.safetensors_hf import DEFAULT_MAX_SHARD_BYTES, export_safetensors
        export_safetensors(args.checkpoint, out, dtype=args.dtype,
                           max_shard_bytes=args.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, **kw)
    else:
        _export_gguf(args)
    print(f"exported {args.checkpoint} as {args.format} → {out}")
    return 0


def _export_gguf(args) -> None:
    try:  # written separately; its absence must be a clear message, not a traceback
        from gemma_qat.export.gguf import export_gguf
    except ModuleNotFoundError as e:
        if e.name == "gemma_qat.export.gguf":
            raise ValueError("GGUF export is not available in this installation (gemma_qat.export.gguf is missing)") \
                from None
        if e.name == "gguf":
            raise ValueError("GGUF export needs the `gguf` package (pip install gguf)") from None
        raise
    from gemma_qat.export.common import load_student

    config, params, resolution, _ = load_student(args.checkpoint, args.recipe)
    if resolution is None:
        raise ValueError("the checkpoint's meta.json has no recipe; pass --recipe q4_0 (or another preset)")
    export_gguf(config, params, resolution, args.out, tokenizer=args.tokenizer, force=args.force)
