"""`python -m gemma_qat.cli ...`: the `gemma-qat` script without the installed entry point (launch scripts,
benchmarks/pod_compile.py, subprocess tests)."""

import sys

from gemma_qat.cli import main

if __name__ == "__main__":  # a spawned worker (the demo's parallel stages) imports, never runs, this
    sys.exit(main())
