"""`gemma-qat inspect PATH [--json]`: format, tensors and sizes of an exported file or folder
(export/inspect.py)."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    s = subparsers.add_parser("inspect", help="format, tensors and sizes of an exported file or folder")
    s.add_argument("path")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(fn=run)


def run(args) -> int:
    from gemma_qat.export.inspect import format_inspect, inspect

    info = inspect(args.path)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0
