#!/usr/bin/env bash
# Several JAX processes on one machine, each with some CPU devices: the pod code path
# (jax.distributed, per-process data, gloo collectives, coordinated checkpoints) on a laptop.
#
#   bash launch/local_multiprocess.sh 2 2 configs/pretrain_digits.py runs/mp
# runs 2 processes with 2 CPU devices each (4 devices in the mesh).
set -euo pipefail
NPROC=${1:?usage: local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [...]}
NDEV=${2:?}
CONFIG=${3:?}
WORKDIR=${4:?}
shift 4
PORT=${PORT:-$(python -c 'import portpicker; print(portpicker.pick_unused_port())')}
pids=()
for ((i = 0; i < NPROC; i++)); do
  JAX_NUM_CPU_DEVICES=$NDEV JAX_PLATFORMS=cpu python -m dmae_jax.main --config="$CONFIG" \
    --workdir="$WORKDIR" --coordinator_address="localhost:$PORT" \
    --num_processes="$NPROC" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
