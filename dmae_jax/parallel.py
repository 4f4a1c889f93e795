"""Devices, meshes and shardings: the same code on 1 CPU, 8 GPUs and a TPU pod.

One `Mesh` with two axes, ("data", "fsdp"). The batch is split over both axes (every device
gets a distinct slice of it); parameters and optimizer state are replicated, or, with FSDP,
split along their largest dimension that the "fsdp" axis divides (big_vision's strategy).
`jax.jit` with these `NamedSharding`s inserts the collectives; no pmap, no shard_map.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dmae_jax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")

_TPU_ENV_HINTS = ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Calls `jax.distributed.initialize` when this is one process of several.

    Explicit arguments (GPU clusters, local multi-process CPU runs) win; otherwise the
    environment variables `DMAE_COORDINATOR_ADDRESS`, `DMAE_NUM_PROCESSES` and
    `DMAE_PROCESS_ID` are read; otherwise, on a multi-host Cloud TPU slice (detected from its
    environment), JAX discovers everything itself. A single process needs nothing.
    """
    coordinator_address = coordinator_address or os.environ.get("DMAE_COORDINATOR_ADDRESS")
    if num_processes is None and "DMAE_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["DMAE_NUM_PROCESSES"])
    if process_id is None and "DMAE_PROCESS_ID" in os.environ:
        process_id = int(os.environ["DMAE_PROCESS_ID"])
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ConfigError(
                "a coordinator address needs num_processes and process_id too, got "
                f"num_processes={num_processes}, process_id={process_id}"
            )
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"process_id must be in [0, {num_processes}), got {process_id}")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _on_multihost_tpu() or _on_cluster():
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def _on_multihost_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or any(k in os.environ for k in _TPU_ENV_HINTS[1:])


def _on_cluster() -> bool:
    """One task of several under SLURM (srun) or Open MPI (mpirun): JAX reads the rest."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in os.environ for k in slurm) and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return ("OMPI_MCA_orte_hnp_uri" in os.environ
            and int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all); `fsdp` devices share each param."""
    n = jax.device_count() if devices is None else len(devices)
    if fsdp < 1 or n % fsdp:
        raise ConfigError(
            f"config.mesh.fsdp must be a divisor of the device count {n}, got {fsdp}"
        )
    # Auto axes: XLA propagates shardings from the inputs (jax.make_mesh defaults to Explicit
    # axes since JAX 0.8, which would make every op's sharding part of its type).
    return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full value on every device."""
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**14) -> P:
    """Shards the largest dimension divisible by `fsdp_size`; small arrays stay replicated."""
    if fsdp_size == 1 or int(np.prod(shape)) < min_size:
        return P()
    for axis in np.argsort(shape)[::-1]:
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of arrays: replicated, or FSDP when the mesh has fsdp > 1."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp_size)), state
    )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def check_batch_size(global_batch_size: int, field: str, accum_steps: int = 1) -> None:
    """Fails early when a batch cannot be split evenly over devices, processes and micro-steps."""
    n = jax.device_count()
    if global_batch_size <= 0 or global_batch_size % (n * accum_steps):
        raise ConfigError(
            f"{field} must be a positive multiple of the device count ({n}) times the "
            f"gradient-accumulation steps ({accum_steps}), got {global_batch_size}"
        )
