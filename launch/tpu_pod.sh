#!/usr/bin/env bash
# A run on a Cloud TPU slice, started, and restarted after a preemption, by one command:
#
#   ZONE=us-central2-b TPU=dmae TYPE=v4-128 BUCKET=gs://my-bucket \
#     bash launch/tpu_pod.sh configs/vit_large.py dmae_l [--config.field=value ...]
#   bash launch/tpu_pod.sh --dry-run CONFIG RUN ...   checks the config, prints every step
#   bash launch/tpu_pod.sh --logs RUN                  follows worker 0's log of RUN
#
# What it does, in order; every step is safe to repeat, so the same command resumes a run:
#   0. On this machine: checks the config as the workers will (a mistyped --config.field stops
#      here, in seconds), archives this checkout's committed HEAD, resolves the workers'
#      packages (jax[tpu] pinned to the tested version).
#   1. Reads the state of the slice and acts on it until the slice is usable: a missing node
#      is created (or requested through a queued resource), a PREEMPTED or TERMINATED node is
#      deleted and created again, a SUSPENDED or FAILED queued resource is deleted and
#      requested again, anything on its way is waited for (--dry-run prints the table).
#   2. Stops if RUN is still running on the slice (nothing to do).
#   3. Installs Python and the packages on every worker: from PyPI when the workers have
#      external IPs, else from a wheelhouse this machine builds for the workers' platform and
#      puts in the bucket (built once per package set, found there on later launches).
#   4. Starts the run on every worker, detached, logging to ~/dmae_runs/RUN.log. It resumes
#      from the newest checkpoint in $BUCKET/runs/RUN, if any.
#
# Environment:
#   ZONE, TPU, BUCKET  required; PROJECT optional (gcloud's default project otherwise).
#                      BUCKET is gs://...; a local directory works when the workers share it.
#   TYPE               accelerator type (v4-128, v5p-128, v5litepod-16, v6e-16); default v4-128
#   VERSION            TPU software version; default: Google's recommended image for TYPE
#   QUEUED=1           ask through the queued resource $TPU-qr (waits until it is ACTIVE)
#   SPOT=1             spot capacity (preemptible; rerun this command after a preemption)
#   INTERNAL_IPS=1     create the slice without external IPs (the subnet needs Private Google
#                      Access for the bucket); ssh and scp then use --internal-ip
#   SSH_FLAGS          flags for tpu-vm ssh/scp instead (e.g. --tunnel-through-iap)
#   INSTALL            auto (default: wheelhouse unless the node has external IPs), online,
#                      or wheelhouse
#   WORKER_PYTHON      a Python on the workers that already has every package (a custom
#                      image): install nothing
#   PYTHON=3.11        the workers' Python (the TPU VM images ship 3.10; uv provides it)
#   JAX_VERSION        jax[tpu] on the workers; default the tested version (below)
#   EXTRAS=gcs         setup.py extras the workers install, comma-separated (gcs: the
#                      gs:// clients; EXTRAS= for none)
#   GLIBC=2.35         the workers' glibc (the TPU VM images are Ubuntu 22.04): wheel platform
#   POLL_SECONDS=60    how often a state on its way (CREATING, WAITING_FOR_RESOURCES, ...) is
#                      read again
# Overrides after RUN reach python on every worker exactly as typed here, quotes included:
#   bash launch/tpu_pod.sh configs/cascade.py cascade '--config.checkpoints=("gs://b/a","gs://b/c")'
# This machine needs git, gcloud, Python with this checkout's requirements, and uv
# (pip install uv; it resolves the workers' packages and downloads their Python).
set -euo pipefail

# The jax version the test suite ran with (tests/test_launch.py keeps it equal to the one
# installed there); jax[tpu]==X pins jaxlib and libtpu with it.
TESTED_JAX_VERSION=0.10.2

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "error: launch/tpu_pod.sh needs bash >= 4.4, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 2
fi
usage="usage: tpu_pod.sh [--dry-run] CONFIG RUN_NAME [--config.field=value ...] | tpu_pod.sh --logs RUN_NAME"
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ "${1:-}" = "--logs" ]; then
  RUN=${2:?$usage}
  : "${ZONE:?set ZONE}" "${TPU:?set TPU (the TPU VM name)}"
  read -r -a ssh_flags <<< "${SSH_FLAGS:-$([ "${INTERNAL_IPS:-0}" = 1 ] && echo --internal-ip)}"
  exec gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
    "${ssh_flags[@]}" --worker=0 --command "tail -n 100 -F ~/dmae_runs/$RUN.log"
fi
CONFIG=${1:?$usage}
RUN=${2:?$usage}
shift 2
OVERRIDES=("$@")
: "${ZONE:?set ZONE}" "${TPU:?set TPU (the TPU VM name)}" "${BUCKET:?set BUCKET (gs://...)}"
BUCKET=${BUCKET%/}
case "$BUCKET" in
  gs://*|/*) ;;
  *) echo "error: BUCKET must be gs://NAME[/prefix] (or an absolute path the workers share), got $BUCKET" >&2; exit 2 ;;
esac
if [[ ! "$RUN" =~ ^[A-Za-z0-9_.-]+$ ]]; then
  echo "error: RUN_NAME may hold letters, digits, '_', '.', '-', got '$RUN'" >&2; exit 2
fi
TYPE=${TYPE:-v4-128}
case "$TYPE" in
  v6e-*) DEFAULT_VERSION=v2-alpha-tpuv6e ;;
  v5p-*) DEFAULT_VERSION=v2-alpha-tpuv5 ;;
  v5litepod-*|v5e-*) DEFAULT_VERSION=v2-alpha-tpuv5-lite ;;
  *) DEFAULT_VERSION=tpu-ubuntu2204-base ;;
esac
VERSION=${VERSION:-$DEFAULT_VERSION}
PYTHON=${PYTHON:-3.11}
JAX_VERSION=${JAX_VERSION:-$TESTED_JAX_VERSION}
GLIBC=${GLIBC:-2.35}
POLL_SECONDS=${POLL_SECONDS:-60}
INSTALL=${INSTALL:-auto}
EXTRAS=${EXTRAS-gcs}
if [ -n "${WORKER_PYTHON:-}" ]; then INSTALL=none; fi
case "$INSTALL" in
  auto|online|wheelhouse|none) ;;
  *) echo "error: INSTALL must be auto, online or wheelhouse, got '$INSTALL'" >&2; exit 2 ;;
esac
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORKDIR=$BUCKET/runs/$RUN
QR=$TPU-qr
LOC=(--zone "$ZONE" ${PROJECT:+--project "$PROJECT"})
read -r -a SSH <<< "${SSH_FLAGS:-$([ "${INTERNAL_IPS:-0}" = 1 ] && echo --internal-ip)}"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/dmae_launch.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# Prints a command with every word shell-quoted; runs it unless this is a dry run.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$DRY" = 0 ]; then "$@"; fi
}
# The same, also in a dry run: the local steps that only read or write $TMP.
always() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  "$@"
}
say() { printf '%s\n' "$*"; }
ssh_all() {
  say "  # every worker runs:"; printf '%s\n' "$1" | sed 's/^/  | /'
  run gcloud compute tpus tpu-vm ssh "$TPU" "${LOC[@]}" "${SSH[@]}" --worker=all --command "$1"
}

# ------------------------------------------------------------------ 0. On this machine.
say "# 0. On this machine: the config, the code, the workers' packages"
ARGS=(--config="$CONFIG" --workdir="$WORKDIR" --config.data.data_dir="$BUCKET/tfds" "${OVERRIDES[@]}")
# From the checkout's root, as on the workers: CONFIG is a path relative to it.
if ! (cd "$HERE" && always env PYTHONPATH="$HERE" JAX_PLATFORMS=cpu python3 launch/check_config.py \
    --config="$CONFIG" --config.data.data_dir="$BUCKET/tfds" "${OVERRIDES[@]}"); then
  exit 2  # its one `error:` line said why; nothing was asked of the cloud
fi
if [ -n "$(git -C "$HERE" status --porcelain --untracked-files=no)" ]; then
  say "warning: uncommitted changes in $HERE are NOT copied (only HEAD is)" >&2
fi
always git -C "$HERE" archive --format=tar.gz -o "$TMP/dmae_jax.tar.gz" HEAD

# The workers' packages: this checkout's requirements and jax[tpu]==JAX_VERSION, resolved
# once here for the workers' platform, so every worker installs the same versions.
if [ "$INSTALL" != none ]; then
  if [ "$DRY" = 0 ] && ! command -v uv >/dev/null; then
    say "error: this machine needs uv to resolve the workers' packages: pip install uv" >&2; exit 2
  fi
  printf 'jax[tpu]==%s\n' "$JAX_VERSION" > "$TMP/pins.in"
  EXTRA_ARGS=()
  for extra in ${EXTRAS//,/ }; do EXTRA_ARGS+=(--extra "$extra"); done
  run uv pip compile --quiet --no-header --no-annotate --python-version "$PYTHON" \
    --python-platform "x86_64-manylinux_${GLIBC//./_}" "${EXTRA_ARGS[@]}" \
    -o "$TMP/requirements.txt" "$HERE/setup.py" "$TMP/pins.in"
fi

# ------------------------------------------------------------------ 1. The slice.
# Each state, as the Cloud TPU API names it, and what this script does about it.
node_action() {
  case "$1" in
    NOT_FOUND) echo create ;;
    READY) echo use ;;
    CREATING|STARTING|RESTARTING|REIMAGING|REPAIRING|STOPPING|DELETING|UNHIDING) echo wait ;;
    PREEMPTED|TERMINATED) echo "delete, create again" ;;
    *) echo stop ;;
  esac
}
queued_action() {
  case "$1" in
    NOT_FOUND) echo request ;;
    ACTIVE) echo "use its node" ;;
    CREATING|ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING|SUSPENDING|DELETING) echo wait ;;
    SUSPENDED|FAILED) echo "delete, request again" ;;
    *) echo stop ;;
  esac
}
# Prints STATE of the node or queued resource, or NOT_FOUND; any other gcloud error stops.
read_state() {
  local kind=$1 name=$2 field=$3 out
  if out=$(gcloud compute tpus "$kind" describe "$name" "${LOC[@]}" --format="value($field)" 2>"$TMP/describe.err"); then
    echo "${out:-UNKNOWN}"
  elif grep -q NOT_FOUND "$TMP/describe.err"; then
    echo NOT_FOUND
  else
    cat "$TMP/describe.err" >&2
    say "error: cannot read the state of $kind $name (gcloud's message above)" >&2
    exit 1
  fi
}
print_table() {
  local action=$1; shift
  local state
  for state in "$@"; do printf '  #   %-22s -> %s\n' "$state" "$($action "$state")"; done
}
SPOT_ARGS=()
if [ "${SPOT:-0}" = 1 ]; then SPOT_ARGS=(--spot); fi
IP_ARGS=()
if [ "${INTERNAL_IPS:-0}" = 1 ]; then IP_ARGS=(--internal-ips); fi
create_node() {
  run gcloud compute tpus tpu-vm create "$TPU" "${LOC[@]}" --accelerator-type "$TYPE" \
    --version "$VERSION" "${SPOT_ARGS[@]}" "${IP_ARGS[@]}"
}
request_node() {
  run gcloud compute tpus queued-resources create "$QR" --node-id "$TPU" "${LOC[@]}" \
    --accelerator-type "$TYPE" --runtime-version "$VERSION" "${SPOT_ARGS[@]}" "${IP_ARGS[@]}"
}
seen=""
note_state() {  # one line per change of state, not per poll
  if [ "$2" != "$seen" ]; then say "$1 is $2: $3"; seen=$2; fi
}
slice_direct() {
  local state
  while :; do
    state=$(read_state tpu-vm "$TPU" state)
    note_state "TPU $TPU" "$state" "$(node_action "$state")"
    case $(node_action "$state") in
      use) return ;;
      create) create_node ;;
      "delete, create again")
        say "the run resumes from its newest checkpoint in $WORKDIR"
        run gcloud compute tpus tpu-vm delete "$TPU" "${LOC[@]}" --quiet ;;
      wait) sleep "$POLL_SECONDS" ;;
      *) say "error: TPU $TPU is $state; inspect it (gcloud compute tpus tpu-vm describe $TPU --zone $ZONE) and delete it, or start it, before launching on it" >&2
         exit 1 ;;
    esac
  done
}
slice_queued() {
  local state node
  while :; do
    state=$(read_state queued-resources "$QR" state.state)
    note_state "queued resource $QR" "$state" "$(queued_action "$state")"
    case $(queued_action "$state") in
      "use its node")
        node=$(read_state tpu-vm "$TPU" state)
        case $(node_action "$node") in
          use) return ;;
          wait) sleep "$POLL_SECONDS" ;;
          *) say "its node $TPU is $node: deleting the queued resource to request it again"
             run gcloud compute tpus queued-resources delete "$QR" "${LOC[@]}" --force --quiet ;;
        esac ;;
      request) request_node ;;
      "delete, request again")
        say "the run resumes from its newest checkpoint in $WORKDIR"
        run gcloud compute tpus queued-resources delete "$QR" "${LOC[@]}" --quiet ;;
      wait) sleep "$POLL_SECONDS" ;;
      *) say "error: queued resource $QR is $state; inspect it (gcloud compute tpus queued-resources describe $QR --zone $ZONE)" >&2
         exit 1 ;;
    esac
  done
}
NODE_STATES=(NOT_FOUND READY CREATING STARTING REPAIRING PREEMPTED TERMINATED STOPPED)
if [ "${QUEUED:-0}" = 1 ]; then
  say "# 1. The slice: queued resource $QR, read every ${POLL_SECONDS} s until its node is READY"
  if [ "$DRY" = 1 ]; then
    printf '+ gcloud compute tpus queued-resources describe %q' "$QR"; printf ' %q' "${LOC[@]}" '--format=value(state.state)'; printf '\n'
    print_table queued_action NOT_FOUND WAITING_FOR_RESOURCES PROVISIONING ACTIVE SUSPENDING SUSPENDED FAILED
    say "  # when ACTIVE, its node: READY -> use it; CREATING -> wait; PREEMPTED, TERMINATED or gone -> delete the queued resource (--force), request again"
    say "  # to request:"; request_node
    say "  # to delete:"; run gcloud compute tpus queued-resources delete "$QR" "${LOC[@]}" --quiet
  else
    slice_queued
  fi
else
  say "# 1. The slice: TPU $TPU, read every ${POLL_SECONDS} s until it is READY"
  if [ "$DRY" = 1 ]; then
    printf '+ gcloud compute tpus tpu-vm describe %q' "$TPU"; printf ' %q' "${LOC[@]}" '--format=value(state)'; printf '\n'
    print_table node_action "${NODE_STATES[@]}"
    say "  # to create:"; create_node
    say "  # to delete:"; run gcloud compute tpus tpu-vm delete "$TPU" "${LOC[@]}" --quiet
  fi
  if [ "$DRY" = 0 ]; then slice_direct; fi
fi

# ------------------------------------------------------------------ 2. Still running?
ALIVE="p=~/dmae_runs/$RUN.pid; if [ -s \$p ] && kill -0 \$(cat \$p) 2>/dev/null; then echo dmae-alive \$(hostname); fi"
say "# 2. Is $RUN still running on $TPU?"
if [ "$DRY" = 1 ]; then
  ssh_all "$ALIVE"
elif grep -q dmae-alive <<< "$(gcloud compute tpus tpu-vm ssh "$TPU" "${LOC[@]}" "${SSH[@]}" --worker=all --command "$ALIVE" || true)"; then
  say "$RUN is still running on $TPU: nothing to do. Follow it: TPU=$TPU ZONE=$ZONE bash launch/tpu_pod.sh --logs $RUN"
  exit 0
fi

# ------------------------------------------------------------------ 3. Code and packages.
if [ "$INSTALL" = auto ]; then
  say "# 3. Install from PyPI if the workers have external IPs, else from a wheelhouse"
  if [ "$DRY" = 1 ]; then
    printf '+ gcloud compute tpus tpu-vm describe %q' "$TPU"; printf ' %q' "${LOC[@]}" '--format=value(networkConfig.enableExternalIps)'; printf '\n'
    if [ "${INTERNAL_IPS:-0}" = 1 ]; then INSTALL=wheelhouse; else INSTALL=online; fi
    say "  # True -> online; anything else -> wheelhouse (shown: $INSTALL)"
  elif [ "$(gcloud compute tpus tpu-vm describe "$TPU" "${LOC[@]}" --format='value(networkConfig.enableExternalIps)')" = True ]; then
    INSTALL=online
  else
    INSTALL=wheelhouse
  fi
fi
say "#    code and packages on every worker: $INSTALL"
SHIP=("$TMP/dmae_jax.tar.gz")
if [ "$INSTALL" != none ]; then SHIP+=("$TMP/requirements.txt"); fi
run gcloud compute tpus tpu-vm scp "${SHIP[@]}" "$TPU:" "${LOC[@]}" "${SSH[@]}" --worker=all
SETUP=(
  "rm -rf ~/dmae_jax && mkdir -p ~/dmae_jax ~/dmae_runs"
  "tar -xzf ~/dmae_jax.tar.gz -C ~/dmae_jax"
)
case "$INSTALL" in
  none)
    PY=$WORKER_PYTHON ;;
  online)
    PY="~/dmae_venv/bin/python"
    SETUP+=(
      "python3 -m pip install --user -q -U uv"
      "~/.local/bin/uv venv -q --allow-existing --python $PYTHON ~/dmae_venv"
      "~/.local/bin/uv pip install -q --python ~/dmae_venv/bin/python -r ~/requirements.txt"
    ) ;;
  wheelhouse)
    PY="~/dmae_venv/bin/python"
    # Named by its contents: a package set already in the bucket is not built again.
    if [ "$DRY" = 1 ]; then KEY=KEY; else KEY=$(sha256sum "$TMP/requirements.txt" | cut -c1-16); fi
    WHEELHOUSE=$BUCKET/wheelhouse/py$PYTHON-$KEY.tar
    case "$BUCKET" in
      gs://*) have() { gcloud storage ls "$1" >/dev/null 2>&1; }; GET="gcloud storage cp"; PUT=(gcloud storage cp) ;;
      *) have() { [ -f "$1" ]; }; GET="cp"; PUT=(cp) ;;
    esac
    if [ "$DRY" = 1 ] || ! have "$WHEELHOUSE"; then
      say "  # building $WHEELHOUSE on this machine (manylinux_${GLIBC//./_} x86_64, CPython $PYTHON)"
      WH=$TMP/wheelhouse
      PLATFORMS=()
      for ((minor = ${GLIBC#2.}; minor >= 17; minor--)); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
      PLATFORMS+=(--platform manylinux2014_x86_64)
      run uv python install --quiet --install-dir "$WH/python" "cpython-$PYTHON-linux-x86_64-gnu"
      run python3 -m pip download --quiet --no-deps "${PLATFORMS[@]}" --python-version "$PYTHON" \
        --implementation cp -d "$WH/wheels" -r "$TMP/requirements.txt"
      # A package published only as source: built here, and only if it is pure Python.
      say "  # source-only packages: pip wheel --no-deps each; refused unless py3-none-any"
      if [ "$DRY" = 0 ]; then
        for sdist in "$WH"/wheels/*.tar.gz "$WH"/wheels/*.zip; do
          [ -e "$sdist" ] || continue
          python3 -m pip wheel --quiet --no-deps -w "$TMP/built" "$sdist"
          rm "$sdist"
        done
        for wheel in "$TMP"/built/*.whl; do
          [ -e "$wheel" ] || continue
          case "$wheel" in
            *-none-any.whl) mv "$wheel" "$WH/wheels/" ;;
            *) say "error: $(basename "$wheel") is not pure Python and has no wheel for the workers' platform" >&2; exit 1 ;;
          esac
        done
      fi
      run cp "$TMP/requirements.txt" "$WH/"
      run tar -cf "$TMP/wheelhouse.tar" -C "$TMP" wheelhouse
      if [[ "$BUCKET" != gs://* ]]; then run mkdir -p "$(dirname "$WHEELHOUSE")"; fi
      run "${PUT[@]}" "$TMP/wheelhouse.tar" "$WHEELHOUSE"
    else
      say "  # $WHEELHOUSE is in the bucket already"
    fi
    SETUP+=(
      "if [ ! -e ~/dmae_venv/.$KEY ]; then rm -rf ~/dmae_wheelhouse ~/dmae_venv"
      "$GET $WHEELHOUSE ~/dmae_wheelhouse.tar && mkdir ~/dmae_wheelhouse"
      "tar -xf ~/dmae_wheelhouse.tar -C ~/dmae_wheelhouse --strip-components=1"
      "\$(ls -d ~/dmae_wheelhouse/python/cpython-*/bin/python3 | head -n 1) -m venv ~/dmae_venv"
      "~/dmae_venv/bin/python -m pip install -q --no-index --find-links ~/dmae_wheelhouse/wheels -r ~/dmae_wheelhouse/requirements.txt"
      "touch ~/dmae_venv/.$KEY; fi"
    ) ;;
esac
SETUP+=("cd ~/dmae_jax && $PY -c 'import sys, jax; assert sys.version_info >= (3, 11), sys.version; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__)'")
ssh_all "$(printf '%s && ' "${SETUP[@]}")true"

# ------------------------------------------------------------------ 4. The run, detached.
# The same command on every worker; process 0 writes metrics and reports, every process takes
# part in the checkpoints. A preemption (SIGTERM) saves first; this script, run again with the
# same RUN, resumes from the newest checkpoint in $WORKDIR.
say "# 4. $RUN on every worker of $TPU, detached; log ~/dmae_runs/$RUN.log"
QUOTED=$(printf ' %q' "${ARGS[@]}")
# (The subshell takes the log as its output before it runs python, so no process holds ssh's
# output open: the ssh returns at once, and $! is python's pid.)
ssh_all "(cd ~/dmae_jax && exec nohup setsid $PY -m dmae_jax.main$QUOTED) \
>> ~/dmae_runs/$RUN.log 2>&1 < /dev/null & echo \$! > ~/dmae_runs/$RUN.pid; echo started pid \$! on \$(hostname)"
say "started $RUN on $TPU; follow it with: TPU=$TPU ZONE=$ZONE bash launch/tpu_pod.sh --logs $RUN"
