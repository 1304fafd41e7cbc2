"""`gemma-qat train --config FILE [key=value ...]`: load the run config, join the other hosts if
this is a multi-host job, run the library loop. Everything else lives in gemma_qat.train."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence


def run(config_path: str | None, overrides: Sequence[str] = ()) -> int:
    # jax.distributed must be initialised before anything touches a device, so the heavy imports
    # wait until after it.
    from gemma_qat.train import distributed
    distributed.initialize()

    from gemma_qat.train.config import load_run_config
    from gemma_qat.train.guard import Diverged
    from gemma_qat.train.loop import train

    cfg = load_run_config(config_path, overrides)
    try:
        result = train(cfg)
    except Diverged as e:  # a report, not a traceback: the last good checkpoint is intact
        print(f"gemma-qat train: {e}", file=sys.stderr)
        return 3
    status = "stopped early (preempted)" if result.stopped_early else "finished"
    print(f"{status} at step {int(result.state.step)}; run dir {result.run_dir}")
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML run config (see configs/tiny.toml); omitted = all defaults")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optimizer.lr=3e-4 mesh.fsdp=4")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved run config (bases, defaults, overrides) as TOML and exit")


def _run_args(args) -> int:
    if args.print_config:  # before any host joins: printing is a local, device-free step
        from gemma_qat.train.config import resolved_toml
        print(resolved_toml(args.config, args.overrides), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax"):  # Orbax logs every file it renames; jax every backend it probes
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run(args.config, args.overrides)


def register(subparsers) -> None:
    """The `gemma-qat train` subcommand."""
    s = subparsers.add_parser("train", help="QAT distillation run from a TOML config plus key=value overrides")
    _add_arguments(s)
    s.set_defaults(fn=_run_args)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gemma_qat.cli.train ...`: this one command, without the subcommand word."""
    p = argparse.ArgumentParser(prog="python -m gemma_qat.cli.train", description=__doc__)
    _add_arguments(p)
    return _run_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
