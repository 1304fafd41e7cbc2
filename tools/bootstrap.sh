#!/usr/bin/env bash
# Creates .venv in the checkout and installs gemma-qat into it (editable).
#   tools/bootstrap.sh          runtime dependencies only
#   tools/bootstrap.sh --test   plus the test extras (CPU torch, transformers, gguf, pytest) and the TPU compiler
#   tools/bootstrap.sh --tpu    runtime dependencies plus the TPU compiler (the libtpu jax's `tpu` extra pins),
#                               for `gemma-qat preflight` on TPU topologies from any host. It goes to
#                               .venv/tpu-compiler, not site-packages: jax would otherwise start a TPU backend
#                               (warnings, seconds of start-up) in every command on a host without TPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if [ "${1:-}" = "--test" ]; then
  # The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
  # On this kind of machine pip finds torch 2.13.0 (CPU) on local disk; elsewhere it comes from PyPI.
  .venv/bin/python -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
  # llama-cpp-python compiles llama.cpp; portable flags so the build runs on any x86-64 CPU.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" pip_install -e ".[test]"
else
  pip_install -e .
fi
if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--tpu" ]; then
  spec=$(.venv/bin/python -c "from gemma_qat.preflight.compilers import expected_libtpu; print(expected_libtpu() or '')")
  .venv/bin/python -c "import sys; sys.path.insert(0, '.venv/tpu-compiler'); import importlib.metadata as m; \
    v = m.version('libtpu'); spec = '$spec'.lstrip('='); sys.exit(0 if v.startswith(spec.rstrip('*')) else 1)" \
    2>/dev/null || pip_install --no-deps --upgrade --target .venv/tpu-compiler "libtpu$spec"
fi
