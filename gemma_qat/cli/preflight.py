"""`gemma-qat preflight --config FILE [key=value ...] --topology NAME [--json]`: will this run fit
that topology? Per-device memory, shardings and the Q4_0 block check, from a CPU host, reading no
weights or data. Intentionally kept short; logic lives in gemma_qat.preflight.

Exit status: 0 fits and every check passed, 1 it does not fit or a check failed, 2 the config
cannot run there at all (mesh vs chips, a dimension the mesh does not divide, ...).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path
from typing import Sequence


def _topology_name(args) -> str:
    if args.topology:
        return args.topology
    from gemma_qat.preflight.topologies import from_config_comment
    name = from_config_comment(Path(args.config).read_text()) if args.config else None
    if name is None:
        raise ValueError("give --topology NAME (e.g. v5p-64, 8xH100), or a config whose first lines "
                         "say `# topology: NAME`")
    return name


def _fake_devices(chips: int) -> None:
    # XLA reads this when its CPU client starts, i.e. at the first device query, so it must be set
    # before anything asks jax for devices (nothing in the CLI has by now).
    flag = f"--xla_force_host_platform_device_count={chips}"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run(args) -> int:
    if args.print_config:  # no topology needed: the config as preflight would check it
        from gemma_qat.train.config import resolved_toml
        print(resolved_toml(args.config, args.overrides), end="")
        return 0
    from gemma_qat.preflight.topologies import parse
    topo = parse(_topology_name(args))
    if args.cpu_compile:
        _fake_devices(topo.chips)
    if topo.platform == "tpu":
        # Before jax loads: a deviceless TPU compile needs neither the metadata server nor a TPU backend.
        from gemma_qat.preflight.compilers import prepare_libtpu
        prepare_libtpu(topo)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from gemma_qat.preflight.check import run_preflight
    from gemma_qat.train.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    report = run_preflight(cfg, topo, lower=not args.no_lower, cpu_compile=args.cpu_compile,
                           teacher_model=args.teacher_model)
    if args.hlo_out and report.compiled_program is not None:
        text = report.compiled_program.as_text()
        opener = gzip.open if args.hlo_out.endswith(".gz") else open
        with opener(args.hlo_out, "wt") as f:
            f.write(text)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML run config (e.g. configs/e2b-q4_0.toml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. mesh.fsdp=8 model.name=e2b (a "
                   "checkpoint folder that is not on this host is sized by naming its variant)")
    p.add_argument("--topology", help="v5p-N, v6e-N, v5e-N, 8xH100, 4x8xH100, 8xH200 ...; default: the "
                   "config's `# topology:` comment")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved run config (bases, defaults, overrides) as TOML and exit")
    p.add_argument("--no-lower", action="store_true", help="shapes and shardings only; skip tracing the step")
    p.add_argument("--cpu-compile", action="store_true",
                   help="also compile the step on XLA:CPU over one fake device per chip (slow for big "
                        "models; its memory numbers are indicative, not the target's)")
    p.add_argument("--teacher-model", help="variant to size the teacher as when its checkpoint is not here")
    p.add_argument("--hlo-out", help="write the compiled step's HLO text here (.gz: gzipped), when it was compiled")


def register(subparsers) -> None:
    """The `gemma-qat preflight` subcommand."""
    s = subparsers.add_parser("preflight", help="per-device memory and sharding of a run config on a "
                              "topology, AOT from a CPU host")
    _add_arguments(s)
    s.set_defaults(fn=run)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gemma_qat.cli.preflight ...`: this one command, without the subcommand word."""
    p = argparse.ArgumentParser(prog="python -m gemma_qat.cli.preflight", description=__doc__)
    _add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:  # as gemma_qat.cli.main: one line, exit 2
        print(f"preflight: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
