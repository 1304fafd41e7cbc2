#!/usr/bin/env bash
# Launch a gemma-qat training run on every worker of a Cloud TPU VM slice (v5p-N, v6e-N, v5e-N).
#
#   launch/tpu_pod.sh [--dry-run] --tpu NAME --zone ZONE [--project P] [--topology v5p-64]
#                     [--sync scp|git] [--repo URL] [--ref REF] [--remote-dir DIR] [--skip-install]
#                     --config configs/e4b-q4_0.toml [key=value ...]
#
# Steps, each one `gcloud compute tpus tpu-vm ... --worker=all` so every host runs it:
#   1. sync the code: scp a tarball of this checkout (default) or git clone/checkout REF;
#   2. install: `bash tools/bootstrap.sh`, then libtpu through jax[tpu] at the jax version installed;
#   3. train: `.venv/bin/gemma-qat train --config FILE overrides`, detached, one log per host.
# No coordinator variables are needed: on a multi-host slice jax reads the TPU metadata
# (TPU_WORKER_HOSTNAMES), see gemma_qat/train/distributed.py. LIBTPU_INIT_ARGS set here is passed on.
# Environment defaults: TPU_NAME, ZONE, PROJECT, SYNC, REPO_URL, REF, REMOTE_DIR.
# --dry-run prints exactly the commands (shell-quoted) and runs none of them.
set -euo pipefail

DRY_RUN=0 TPU="${TPU_NAME:-}" ZONE="${ZONE:-}" PROJECT="${PROJECT:-}" TOPOLOGY="" CONFIG=""
SYNC="${SYNC:-scp}" REPO_URL="${REPO_URL:-}" REF="${REF:-main}" REMOTE_DIR="${REMOTE_DIR:-gemma-qat}"
INSTALL=1 OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --tpu) TPU="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --topology) TOPOLOGY="$2"; shift ;;
    --sync) SYNC="$2"; shift ;;
    --repo) REPO_URL="$2"; shift ;;
    --ref) REF="$2"; shift ;;
    --remote-dir) REMOTE_DIR="$2"; shift ;;
    --skip-install) INSTALL=0 ;;
    --config) CONFIG="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    --*) echo "tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
    *=*) OVERRIDES+=("$1") ;;
    *) echo "tpu_pod.sh: expected key=value override, got $1" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
[ -n "$TPU" ] || die "--tpu NAME (or TPU_NAME) is required"
[ -n "$ZONE" ] || die "--zone ZONE (or ZONE) is required"
[ -n "$CONFIG" ] || die "--config FILE is required"
[ -f "$CONFIG" ] || die "config $CONFIG does not exist (give a path inside the checkout)"
case "$SYNC" in scp|git) ;; *) die "--sync must be scp or git" ;; esac
[ "$SYNC" = scp ] || [ -n "$REPO_URL" ] || die "--sync git needs --repo URL"

# The topology: --topology, else the config's `# topology:` comment. Only for the worker count.
if [ -z "$TOPOLOGY" ]; then
  TOPOLOGY=$(sed -n 's/^# *topology: *\([^ ]*\).*/\1/p' "$CONFIG" | head -1)
fi
workers_of() {  # Cloud TPU hosts: v5p-N has N/2 chips, 4 per host; v5e/v6e: one host up to 8 chips, else 4 per host
  local n="${1##*-}"
  case "$1" in
    v5p-*) echo $(( n / 8 > 0 ? n / 8 : 1 )) ;;
    v6e-*|v5e-*|v5litepod-*) if [ "$n" -le 8 ]; then echo 1; else echo $(( n / 4 )); fi ;;
    *) echo "?" ;;
  esac
}
WORKERS=$(workers_of "${TOPOLOGY:-?}")

q() {  # shell-quote one word for printing, leaving plain words readable
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
run() {
  if [ "$DRY_RUN" = 1 ]; then
    local out="" a; for a in "$@"; do out+="$(q "$a") "; done; echo "${out% }"
  else
    "$@"
  fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --worker=all)
[ -n "$PROJECT" ] && WHERE+=(--project="$PROJECT")
on_all() { run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --command "$1"; }

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TRAIN_ARGS="--config $(q "$CONFIG")"
for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do TRAIN_ARGS+=" $(q "$o")"; done
ENV_EXPORTS="export JAX_PLATFORMS=tpu"
[ -n "${LIBTPU_INIT_ARGS:-}" ] && ENV_EXPORTS+="; export LIBTPU_INIT_ARGS=$(q "$LIBTPU_INIT_ARGS")"

echo "# gemma-qat on TPU $TPU ($ZONE): topology ${TOPOLOGY:-unknown}, workers: $WORKERS, config $CONFIG"
echo "# coordinator: discovered by jax from the TPU metadata (TPU_WORKER_HOSTNAMES) on each worker"
if [ "$SYNC" = scp ]; then
  TARBALL=/tmp/gemma-qat-src.tgz
  run tar -czf "$TARBALL" --exclude=./.venv --exclude=./runs --exclude=./.git --exclude=__pycache__ -C "$REPO_ROOT" .
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU:$TARBALL" "${WHERE[@]}"
  on_all "mkdir -p $REMOTE_DIR && tar -xzf $TARBALL -C $REMOTE_DIR"
else
  on_all "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin; else git clone -q $(q "$REPO_URL") $REMOTE_DIR; fi && git -C $REMOTE_DIR checkout -q $(q "$REF")"
fi
if [ "$INSTALL" = 1 ]; then
  # bootstrap.sh installs jax for CPU; libtpu comes with jax[tpu], pinned to that same jax version.
  on_all "cd $REMOTE_DIR && bash tools/bootstrap.sh && JV=\$(.venv/bin/python -c 'import jax; print(jax.__version__)') && .venv/bin/python -m pip install -q \"jax[tpu]==\$JV\""
fi
# setsid + nohup: the run must outlive this ssh session; SIGTERM (preemption) makes it save and exit.
on_all "cd $REMOTE_DIR && mkdir -p logs && $ENV_EXPORTS && setsid nohup .venv/bin/gemma-qat train $TRAIN_ARGS > logs/train-\$(hostname).log 2>&1 < /dev/null &"
echo "# follow: ${GCLOUD[*]} ssh $TPU --zone=$ZONE --worker=0 --command='tail -f $REMOTE_DIR/logs/train-*.log'"
