"""`gemma-qat` command line: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    # One module per command, each with `register(subparsers)`. Imported here rather than at the top:
    # `python -m gemma_qat.cli.train` imports this package first, and a command module it had already
    # imported would then run a second time. The modules themselves are light (argparse only; the library,
    # and jax with it, loads when a command runs: train must join the other hosts and preflight set up
    # libtpu before that).
    from gemma_qat.cli import (cache_teacher, demo, evaluate, export, generate, import_hf, info, inspect, logits,
                               preflight, quantize, train)

    p = argparse.ArgumentParser(prog="gemma-qat", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for command in (info, import_hf, logits, quantize, demo, train, export, inspect, evaluate, generate, preflight,
                    cache_teacher):
        command.register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # User errors: one clear line, no traceback.
        print(f"gemma-qat {args.command}: error: {e}", file=sys.stderr)
        return 2
