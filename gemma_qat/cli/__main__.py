"""`python -m gemma_qat.cli ...`: the `gemma-qat` script without the installed entry point (launch scripts,
benchmarks/pod_compile.py, subprocess tests)."""

import sys

from gemma_qat.cli import main

sys.exit(main())
