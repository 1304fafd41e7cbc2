#!/usr/bin/env bash
# The quantization backends side by side on one GPU (issue: AQT in the training path), one device call:
# the QAT + teacher step with the fake-quant computed by formats.py under XLA, by the one-pass Pallas Q4_0
# kernel (formats backend, q4_0_impl pallas), and by AQT (quant.backend = aqt); bench-1b and E2B in Q4_0,
# and E2B's mobile recipe (no kernel: formats or AQT). Same process order every run; ratios within one run.
#
#   bash benchmarks/compare_backends.sh OUT [CONFIGS]   # CONFIGS default bench-1b,e2b
#
# STEP_TIMEOUT bounds each process (default 240 s); AUTOTUNE_CACHE keeps XLA's autotuning (default OUT/autotune;
# a device call brings back only a few files, so keep it outside OUT there and pack it).
set -uo pipefail
out=${1:?usage: compare_backends.sh OUT [CONFIGS]}
configs=${2:-bench-1b,e2b}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
limit=${STEP_TIMEOUT:-240}
mkdir -p "$out" "${AUTOTUNE_CACHE:=$out/autotune}"
export PYTHONUNBUFFERED=1 XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=$AUTOTUNE_CACHE"
run() {  # config, recipe, backend, q4_0_impl
  local remat=none; [ "$1" = bench-1b ] || remat=weights  # what each needs on one GPU (BENCHMARKS.md)
  echo "== $1 $2 $3 q4_0_impl=$4"
  timeout "$limit" "$py" "$here/bench_step.py" --config "$1" --batch 2 --seq 2048 --steps 8 --modes qat+teacher \
    --remat "$remat" --recipe "$2" --backend "$3" --q4-0-impl "$4" 2>&1 | tee "$out/$1-$2-$3-$4.txt" | grep -v '^  '
}
for c in ${configs//,/ }; do
  run "$c" q4_0 formats pallas
  run "$c" q4_0 aqt xla
  if [ "$c" != bench-1b ]; then  # the mobile recipe is defined for E-type models
    run "$c" mobile formats xla
    run "$c" mobile aqt xla
  fi
  run "$c" q4_0 formats xla
done
grep -h '^[a-z0-9-]* *qat+teacher  step' "$out"/*.txt | tee "$out/summary.txt"
