#!/usr/bin/env bash
# The whole BENCHMARKS.md matrix in one go on one GPU: the MoE grouped-matmul tile sweep, the Q4_0 fake-quant
# micro-benchmark, bench-1b (all modes, profiled; QAT again with the XLA Q4_0 path), E2B full size and 26B-A4B
# at 4 layers (each with the remat it needs on 80 GB), then the PyTorch peer on all three (E2B and
# 26B-A4B-4l through bench_peer.py), bench-1b also under torch.compile, on the same card in the same run.
# Cold, it needs more than one 10-minute device call: with a fresh
# autotune cache each big config compiles in 1.5 to 5 minutes per mode.
#
#   bash benchmarks/run_all.sh OUT_DIR [PEER_SCRIPT]      # PEER_SCRIPT: shared/bench/peer_torchao_qat.py
#
# XLA's autotuning is most of each compile; AUTOTUNE_CACHE (default OUT_DIR/autotune) keeps its results,
# so a second run, or one after a small change, compiles in a fraction of the time. Each step has its own
# time limit (STEP_TIMEOUT seconds, default 600) so one slow compile cannot eat the others; PYTHON picks
# the interpreter (default python3).
set -uo pipefail
out=${1:?usage: run_all.sh OUT_DIR [PEER_SCRIPT]}
peer=${2:-}
mkdir -p "$out"
cache=${AUTOTUNE_CACHE:-$out/autotune}
mkdir -p "$cache"
export PYTHONUNBUFFERED=1 XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=$cache"
limit=${STEP_TIMEOUT:-600}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)

run() {  # name, then bench_step.py arguments
  local name=$1; shift
  echo "== $name: $*"
  timeout "$limit" "$py" "$here/bench_step.py" "$@" 2>&1 | tee "$out/$name.txt" | grep -v '^  '
}

echo "== grouped"
timeout "$limit" "$py" "$here/bench_grouped.py" --sweep 2>&1 | tee "$out/grouped.log" | grep -v '^JSON'
echo "== loss"
timeout "$limit" "$py" "$here/bench_loss.py" --config bench-1b 2>&1 | tee "$out/loss.log" | grep -v '^JSON'
echo "== q4_0"
timeout "$limit" "$py" "$here/bench_q4_0.py" --config bench-1b --sweep 2>&1 | tee "$out/q4_0.log" | grep -v '^JSON'
run bench-1b --config bench-1b --batch 2 --seq 2048 --steps 6 --profile "$out/profile"
run bench-1b-xla-q4_0 --config bench-1b --batch 2 --seq 2048 --steps 6 --modes qat --q4-0-impl xla
run bench-1b-pipeline --config bench-1b --batch 2 --seq 2048 --steps 6 --modes qat+teacher --pipeline
# E2B needs remat on 80 GB (24 GiB short without); `weights` keeps the quantized (or cast) bf16 weights.
run e2b --config e2b --freeze-embeddings --remat weights --steps 4
# 26B-A4B-4l: plain and QAT fit without remat (50 GiB); QAT + teacher does not (13 GiB short).
run 26b-a4b-4l --config 26b-a4b-4l --freeze-embeddings --remat none --modes plain,qat --steps 6
run 26b-a4b-4l-teacher --config 26b-a4b-4l --freeze-embeddings --remat weights --modes qat+teacher --steps 4
if [[ -n "$peer" ]]; then
  echo "== peer: $peer"
  timeout "$limit" "$py" "$peer" --config bench-1b --batch 2 --seq 2048 --steps 6 2>&1 | tee "$out/peer.txt" \
    | grep -E '^(plain|qat|PEER)'
  # torch.compile: the peer a performance-minded user runs, and the ratios BENCHMARKS.md quotes first. One
  # process per mode, so a compile that outruns its limit costs that mode only (QAT + teacher: ~4 min).
  for m in plain qat qat+teacher; do
    echo "== peer compiled $m"
    TORCHINDUCTOR_CACHE_DIR="$out/inductor" timeout "$limit" "$py" "$peer" --config bench-1b --batch 2 --seq 2048 \
      --steps 6 --compile --modes $m 2>&1 | tee "$out/peer-compiled-${m/+/_}.txt" | grep -E '^(plain|qat|PEER)'
  done
  for c in e2b 26b-a4b-4l; do  # configs the peer script lacks, through our HF config mapping
    echo "== peer $c"
    timeout "$limit" "$py" "$here/bench_peer.py" "$peer" --config $c --batch 2 --seq 2048 --steps 4 2>&1 \
      | tee "$out/peer-$c.txt" | grep -E '^(plain|qat|PEER)'
  done
fi
grep -h '^JSON ' "$out"/*.txt | sed 's/^JSON //' > "$out/results.jsonl"
echo "rows: $out/results.jsonl"
