#!/usr/bin/env bash
# GPU workstation: one process drives every local GPU (the mesh spans all of them).
#
#   bash launch/gpu.sh configs/vit_base.py runs/dmae_base --config.accum_steps=8
#
# Several GPU machines: run this on each with the coordinator's address, e.g.
#   NUM_PROCESSES=2 PROCESS_ID=0 COORDINATOR=host0:12355 bash launch/gpu.sh ...
#   NUM_PROCESSES=2 PROCESS_ID=1 COORDINATOR=host0:12355 bash launch/gpu.sh ...
# (under SLURM/Open MPI jax.distributed can also read these from the scheduler).
set -euo pipefail
CONFIG=${1:?usage: gpu.sh CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: gpu.sh CONFIG WORKDIR [overrides...]}
shift 2
python -c "import jax; assert jax.default_backend() == 'gpu', 'install jax[cuda12]'" \
  || pip install -U 'jax[cuda12]>=0.10.2'
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
DIST=()
if [ -n "${COORDINATOR:-}" ]; then
  DIST=(--coordinator_address="$COORDINATOR" --num_processes="${NUM_PROCESSES:?}"
        --process_id="${PROCESS_ID:?}")
fi
exec python -m dmae_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${DIST[@]}" "$@"
