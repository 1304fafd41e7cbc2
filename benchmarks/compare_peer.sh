#!/usr/bin/env bash
# The headline comparison of BENCHMARKS.md in one device call: ours (bench_step.py, the lean step and the
# training pipeline's own step) beside the PyTorch peer compiled (torch.compile) and eager, same GPU, same
# process order every time. Ratios are taken only within one run of this script.
#
#   bash benchmarks/compare_peer.sh OUT PEER_SCRIPT [MODES] [CONFIG]   # MODES default plain,qat,qat+teacher
#
# MODES picks what both sides run (ours: bench_step.py's modes; the peer: the same names). The pipeline step
# runs when qat+teacher is among them. PEER_EAGER=0 skips the eager peer (its ratios are in earlier runs).
# Each process has its own time limit (STEP_TIMEOUT, default 480 s); XLA's autotuning results go to
# AUTOTUNE_CACHE (default OUT/autotune), torch inductor's to OUT/inductor, so a second run compiles fast.
set -uo pipefail
out=${1:?usage: compare_peer.sh OUT PEER_SCRIPT [MODES] [CONFIG]}
peer=${2:?give the peer script (shared/bench/peer_torchao_qat.py)}
modes=${3:-plain,qat,qat+teacher}
config=${4:-bench-1b}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
limit=${STEP_TIMEOUT:-480}
mkdir -p "$out" "${AUTOTUNE_CACHE:=$out/autotune}"
export PYTHONUNBUFFERED=1 XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=$AUTOTUNE_CACHE"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$out/inductor}
shape=(--config "$config" --batch 2 --seq 2048)

echo "== ours: $modes"
timeout "$limit" "$py" "$here/bench_step.py" "${shape[@]}" --steps 8 --modes "$modes" 2>&1 | tee "$out/ours.txt" \
  | grep -v '^  '
if [[ ",$modes," == *,qat+teacher,* ]]; then
  echo "== ours: the pipeline's step"
  timeout "$limit" "$py" "$here/bench_step.py" "${shape[@]}" --steps 8 --modes qat+teacher --pipeline 2>&1 \
    | tee "$out/ours-pipeline.txt" | grep -v '^  '
fi
peer_run() {  # name, then extra peer arguments
  local name=$1; shift
  echo "== peer $name: $modes"
  if [ "$config" = bench-1b ]; then
    timeout "$limit" "$py" "$peer" "${shape[@]}" --steps 6 --modes "$modes" "$@" 2>&1 | tee "$out/peer-$name.txt" \
      | grep -E '^(plain|qat|PEER)'
  else  # configs the peer script lacks, through our HF config mapping
    timeout "$limit" "$py" "$here/bench_peer.py" "$peer" "${shape[@]}" --steps 6 --modes "$modes" "$@" 2>&1 \
      | tee "$out/peer-$name.txt" | grep -E '^(plain|qat|PEER)'
  fi
}
peer_run compiled --compile
[ "${PEER_EAGER:-1}" = 0 ] || peer_run eager
"$py" "$here/compare_table.py" "$out" | tee "$out/table.md"
