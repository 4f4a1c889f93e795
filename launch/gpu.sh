#!/usr/bin/env bash
# GPU machines: one process per machine drives every local GPU (the mesh spans all of them).
#
#   bash launch/gpu.sh configs/vit_base.py runs/dmae_base --config.accum_steps=8
#
# Several machines, three ways to start one process per machine:
#   - SLURM:    srun --nodes=2 --ntasks-per-node=1 bash launch/gpu.sh CONFIG WORKDIR ...
#   - Open MPI: mpirun -np 2 --npernode 1 bash launch/gpu.sh CONFIG WORKDIR ...
#     With several tasks, dmae_jax calls jax.distributed.initialize() with no arguments and
#     JAX's cluster detection reads the coordinator, process count and index from SLURM's
#     (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID) or Open MPI's
#     (OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE/RANK) environment.
#   - By hand, on each machine:
#       NUM_PROCESSES=2 PROCESS_ID=0 COORDINATOR=host0:12355 bash launch/gpu.sh ...
#       NUM_PROCESSES=2 PROCESS_ID=1 COORDINATOR=host0:12355 bash launch/gpu.sh ...
# Needs a CUDA build of JAX in the active environment (pip install -U "jax[cuda12]"); this
# script checks for it and stops if it is missing, it installs nothing.
set -euo pipefail
CONFIG=${1:?usage: gpu.sh CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: gpu.sh CONFIG WORKDIR [overrides...]}
shift 2
if ! python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  echo "error: JAX sees no GPU in this environment; install a CUDA build first:" >&2
  echo "  pip install -U \"jax[cuda12]\"   (see JAX's installation guide for other CUDA versions)" >&2
  exit 1
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
DIST=()
if [ -n "${COORDINATOR:-}" ]; then
  DIST=(--coordinator_address="$COORDINATOR" --num_processes="${NUM_PROCESSES:?}"
        --process_id="${PROCESS_ID:?}")
fi
exec python -m dmae_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${DIST[@]}" "$@"
