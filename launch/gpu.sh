#!/usr/bin/env bash
# GPU machines: one process per machine drives every local GPU (the mesh spans all of them),
# or, when the scheduler starts several tasks on a machine, one process per GPU.
#
#   bash launch/gpu.sh configs/vit_base.py runs/dmae_base --config.accum_steps=8
#
# Several machines (dmae_jax.parallel.decide_start reads which of these started it):
#   - SLURM:      srun --nodes=2 --ntasks-per-node=1 bash launch/gpu.sh CONFIG WORKDIR ...
#                 JAX's SLURM detection finds the coordinator (the step's first node), the
#                 process count and index (SLURM_NTASKS, SLURM_PROCID).
#   - Open MPI 4: mpirun -np 2 --npernode 1 bash launch/gpu.sh CONFIG WORKDIR ...
#                 JAX's Open MPI detection reads OMPI_MCA_orte_hnp_uri (the coordinator is
#                 on mpirun's host: rank 0 must run there) and OMPI_COMM_WORLD_SIZE/RANK.
#   - Open MPI 5: its mpirun (PRRTE) does not say where rank 0 runs, so name it; the count
#                 and index still come from OMPI_COMM_WORLD_SIZE/RANK:
#                 mpirun -np 2 --npernode 1 -x COORDINATOR=host0:12355 bash launch/gpu.sh ...
#   - By hand, on each machine:
#       NUM_PROCESSES=2 PROCESS_ID=0 COORDINATOR=host0:12355 bash launch/gpu.sh ...
#       NUM_PROCESSES=2 PROCESS_ID=1 COORDINATOR=host0:12355 bash launch/gpu.sh ...
# A process that sees fewer GPUs than SLURM gave its node, or a job that did not form as the
# scheduler describes it, stops with one `error:` line before any data is read.
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
if [ -n "${COORDINATOR:-}" ]; then DIST+=(--coordinator_address="$COORDINATOR"); fi
if [ -n "${NUM_PROCESSES:-}" ]; then DIST+=(--num_processes="$NUM_PROCESSES"); fi
if [ -n "${PROCESS_ID:-}" ]; then DIST+=(--process_id="$PROCESS_ID"); fi
exec python -m dmae_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${DIST[@]}" "$@"
