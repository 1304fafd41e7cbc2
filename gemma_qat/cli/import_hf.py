"""`gemma-qat import-hf HF_DIR OUT_DIR [--dtype ...] [--force]`: a Hugging Face Gemma 4 folder → a gemma-qat
model checkpoint (hf/importer.py, model/checkpoint.py)."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    s = subparsers.add_parser("import-hf", help="Hugging Face Gemma 4 folder → gemma-qat Orbax checkpoint")
    s.add_argument("hf_dir")
    s.add_argument("out_dir")
    s.add_argument("--dtype", choices=["keep", "bfloat16", "float32"], default="keep")
    s.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    s.set_defaults(fn=run)


def run(args) -> int:
    import jax
    import jax.numpy as jnp

    from gemma_qat.hf.importer import load_hf
    from gemma_qat.model.checkpoint import CheckpointMeta, save_model

    dtype = {"keep": None, "bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    config, params = load_hf(args.hf_dir, dtype=dtype)
    stored = str(jax.tree.leaves(params)[0].dtype)
    save_model(args.out_dir, params, config, force=args.force,
               meta=CheckpointMeta(kind="float", param_dtype=stored, source=str(Path(args.hf_dir).absolute())))
    print(f"imported {config.name} ({config.num_layers} layers, {stored}) → {args.out_dir}")
    return 0
