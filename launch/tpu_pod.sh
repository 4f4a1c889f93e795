#!/usr/bin/env bash
# Cloud TPU slice: get the TPU VMs (directly, or through a queued resource, optionally
# spot), copy this checkout to every worker, install it in a Python >= 3.11 environment,
# and start the same command on every worker, detached, with a log per worker. JAX finds
# the other hosts itself (jax.distributed.initialize() on a multi-host slice); data and
# workdir live on GCS.
#
#   ZONE=us-central2-b TPU=dmae-v4-128 TYPE=v4-128 BUCKET=gs://my-bucket \
#     bash launch/tpu_pod.sh configs/vit_large.py dmae_large [--config.key=value ...]
#   bash launch/tpu_pod.sh --dry-run ...      print every command, run none
#   bash launch/tpu_pod.sh --logs RUN         follow worker 0's log of run RUN
#
# Environment:
#   ZONE, TPU, BUCKET  required; PROJECT optional (gcloud's default project otherwise)
#   TYPE               accelerator type (v4-128, v5p-128, v5litepod-16, v6e-16); default v4-128
#   VERSION            TPU software version; default: Google's recommended image for TYPE
#   QUEUED=1           ask through a queued resource (waits until it is ACTIVE)
#   SPOT=1             spot capacity (cheaper, preemptible: runs resume from checkpoints)
#   PYTHON=3.11        Python for the environment on the workers (the images ship 3.10;
#                      uv installs a standalone CPython)
#   JAX_VERSION        jax[tpu] version to install; default: the one setup.py resolves
# Overrides after RUN reach python on every worker exactly as typed here, quotes included:
#   bash launch/tpu_pod.sh configs/cascade.py cascade '--config.checkpoints=("gs://b/a","gs://b/c")'
# ImageNet must already be prepared as ArrayRecord under $BUCKET/tfds (see README).
set -euo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ "${1:-}" = "--logs" ]; then
  RUN=${2:?usage: tpu_pod.sh --logs RUN_NAME}
  : "${ZONE:?set ZONE}" "${TPU:?set TPU (the TPU VM name)}"
  exec gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=0 \
    --command "tail -n 100 -F ~/dmae_runs/$RUN.log"
fi
CONFIG=${1:?usage: tpu_pod.sh [--dry-run] CONFIG RUN_NAME [overrides...]}
RUN=${2:?usage: tpu_pod.sh [--dry-run] CONFIG RUN_NAME [overrides...]}
shift 2
: "${ZONE:?set ZONE}" "${TPU:?set TPU (the TPU VM name)}" "${BUCKET:?set BUCKET (gs://...)}"
TYPE=${TYPE:-v4-128}
case "$TYPE" in
  v6e-*) DEFAULT_VERSION=v2-alpha-tpuv6e ;;
  v5p-*) DEFAULT_VERSION=v2-alpha-tpuv5 ;;
  v5litepod-*|v5e-*) DEFAULT_VERSION=v2-alpha-tpuv5-lite ;;
  *) DEFAULT_VERSION=tpu-ubuntu2204-base ;;
esac
VERSION=${VERSION:-$DEFAULT_VERSION}
PYTHON=${PYTHON:-3.11}
PROJECT_ARGS=()
if [ -n "${PROJECT:-}" ]; then PROJECT_ARGS=(--project "$PROJECT"); fi
HERE=$(cd "$(dirname "$0")/.." && pwd)

# Prints a command with every word shell-quoted; runs it unless this is a dry run.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$DRY" = 0 ]; then "$@"; fi
}
ssh_all() {
  printf '  # what every worker runs:\n'; printf '%s\n' "$1" | sed 's/^/  | /'
  run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all \
    --command "$1"
}

# ------------------------------------------------------------------ 1. The TPU VMs.
exists=1
if [ "$DRY" = 1 ]; then
  exists=0
elif ! gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" "${PROJECT_ARGS[@]}" \
    >/dev/null 2>&1; then
  exists=0
fi
if [ "$exists" = 0 ]; then
  SPOT_ARGS=()
  if [ "${SPOT:-0}" = 1 ]; then SPOT_ARGS=(--spot); fi
  if [ "${QUEUED:-0}" = 1 ]; then
    run gcloud compute tpus queued-resources create "$TPU-qr" --node-id "$TPU" \
      --zone "$ZONE" "${PROJECT_ARGS[@]}" --accelerator-type "$TYPE" \
      --runtime-version "$VERSION" "${SPOT_ARGS[@]}"
    echo "waiting for queued resource $TPU-qr to become ACTIVE"
    if [ "$DRY" = 0 ]; then
      while :; do
        state=$(gcloud compute tpus queued-resources describe "$TPU-qr" --zone "$ZONE" \
          "${PROJECT_ARGS[@]}" --format='value(state.state)')
        case "$state" in
          ACTIVE) break ;;
          FAILED|SUSPENDED) echo "queued resource $TPU-qr is $state" >&2; exit 1 ;;
        esac
        sleep 60
      done
    else
      printf '+ gcloud compute tpus queued-resources describe %q --zone %q --format=value(state.state)  # every 60 s until ACTIVE\n' "$TPU-qr" "$ZONE"
    fi
  else
    run gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" "${PROJECT_ARGS[@]}" \
      --accelerator-type "$TYPE" --version "$VERSION" "${SPOT_ARGS[@]}"
  fi
fi

# ------------------------------------------------------------------ 2. Code on every worker.
# This checkout's committed HEAD (git archive), so every worker runs exactly one commit.
ARCHIVE=$(mktemp -d)/dmae_jax.tar.gz
if [ "$DRY" = 0 ] && [ -n "$(git -C "$HERE" status --porcelain --untracked-files=no)" ]; then
  echo "warning: uncommitted changes in $HERE are NOT copied (only HEAD is)" >&2
fi
run git -C "$HERE" archive --format=tar.gz -o "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU:dmae_jax.tar.gz" --zone "$ZONE" \
  "${PROJECT_ARGS[@]}" --worker=all

# ------------------------------------------------------------------ 3. Python >= 3.11 env.
# The TPU VM images ship Python 3.10; uv puts a standalone CPython $PYTHON in ~/dmae_venv.
JAX_SPEC="jax[tpu]${JAX_VERSION:+==$JAX_VERSION}"
SETUP=(
  "rm -rf ~/dmae_jax && mkdir -p ~/dmae_jax ~/dmae_runs"
  "tar -xzf ~/dmae_jax.tar.gz -C ~/dmae_jax"
  "python3 -m pip install --user -q -U uv"
  "~/.local/bin/uv venv -q --allow-existing --python $PYTHON ~/dmae_venv"
  "~/.local/bin/uv pip install -q --python ~/dmae_venv/bin/python -e ~/dmae_jax $(printf %q "$JAX_SPEC")"
  "~/dmae_venv/bin/python -c 'import sys, jax; assert sys.version_info >= (3, 11); print(jax.__version__, jax.device_count())'"
)
ssh_all "$(printf '%s && ' "${SETUP[@]}")true"

# ------------------------------------------------------------------ 4. The run, detached.
# The same command on every worker; process 0 writes metrics and reports, every process
# takes part in the checkpoints. A preemption (SIGTERM) saves first; rerunning this script
# with the same RUN resumes from the last checkpoint.
ARGS=(--config="$CONFIG" --workdir="$BUCKET/runs/$RUN" --config.data.data_dir="$BUCKET/tfds" "$@")
QUOTED=$(printf ' %q' "${ARGS[@]}")
ssh_all "cd ~/dmae_jax && nohup setsid ~/dmae_venv/bin/python -m dmae_jax.main$QUOTED \
> ~/dmae_runs/$RUN.log 2>&1 < /dev/null & echo started pid \$! on \$(hostname)"
echo "started $RUN on $TPU; follow it with: TPU=$TPU ZONE=$ZONE bash launch/tpu_pod.sh --logs $RUN"
