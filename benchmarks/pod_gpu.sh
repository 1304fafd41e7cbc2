#!/usr/bin/env bash
# The GPU half of the pod checks on one GPU host (not CI): the GPU-cluster presets compiled by the real GPU
# compiler for 8xH100 / 8xH200 / 4x8xH100 (benchmarks/pod_compile.py --gpu), and the single-GPU steps that
# calibrate the step-time model (bench_step.py --pipeline: the training pipeline's own step, with the
# compiler's cost analysis), all written under OUT.
#
#   bash benchmarks/pod_gpu.sh OUT [compile|calibrate|all] [CONFIGS]   # CONFIGS: bench-1b,e2b,26b-a4b-4l
#   POD_ARGS="--hlo --case 31b-q4_0:4x8xH100" bash benchmarks/pod_gpu.sh OUT compile   # chosen cases, HLO kept
#
# The topology compiles run with XLA's GPU autotuning off (--xla_gpu_autotune_level=0): it would time
# kernels on the one attached GPU and changes kernel choices, not buffer sizes or collectives.
set -uo pipefail
out=${1:?usage: pod_gpu.sh OUT [compile|calibrate|all] [CONFIGS]}
what=${2:-all}
configs=${3:-bench-1b,e2b,26b-a4b-4l}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
limit=${STEP_TIMEOUT:-300}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "$what" != calibrate ]; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" "$py" "$here/pod_compile.py" --gpu --out "$out/pod" \
    --timeout "$limit" ${POD_ARGS:-} 2>&1 | tee "$out/pod.log"
fi
if [ "$what" != compile ]; then
  for c in ${configs//,/ }; do
    remat=none; [ "$c" = bench-1b ] || remat=weights  # what each needs on one GPU (BENCHMARKS.md)
    echo "== calibrate $c (remat $remat)"
    timeout "$limit" "$py" "$here/bench_step.py" --config "$c" --modes qat+teacher --pipeline --remat "$remat" \
      --steps 6 2>&1 | tee "$out/calibrate-$c.log" | grep -v '^  '
  done
fi
