"""Devices, meshes and shardings: the same code on 1 CPU, 8 GPUs and a TPU pod.

One `Mesh` with two axes, ("data", "fsdp"). The batch is split over both axes (every device
gets a distinct slice of it); parameters and optimizer state are replicated, or, with FSDP,
split along their largest dimension that the "fsdp" axis divides (big_vision's strategy).
`jax.jit` with these `NamedSharding`s inserts the collectives; no pmap, no shard_map.

A job of several processes (one per TPU VM or GPU node, or one per GPU) is joined by
`initialize_distributed`: `decide_start` reads from the environment, by the rules of JAX's
own cluster detection, whether and how this process is one of several; the job JAX then
forms is checked against it before any data is read.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dmae_jax.errors import ConfigError, LaunchError

BATCH_AXES = ("data", "fsdp")


# ------------------------------------------------------------------ Joining a multi-process job.


@dataclasses.dataclass(frozen=True)
class Start:
    """How this process joins its job, and what the job must look like once it has."""

    how: str  # "single", "explicit", "gce-tpu", "gke-tpu", "open-mpi", "slurm"
    initialize: dict | None  # jax.distributed.initialize's arguments; None: a single process
    num_processes: int = 1
    num_devices: int | None = None  # devices of the whole job (TPU: from the accelerator type)
    slice_type: str | None = None  # the accelerator type that device count comes from
    all_local_gpus: bool = False  # alone on its node: this process drives every local GPU
    node_gpus: int | None = None  # GPUs the scheduler gave this node (SLURM_GPUS_ON_NODE)


# JAX devices per unit of an accelerator type's "-N": TPU v2/v3 count TensorCores and JAX makes
# one device per core; v4/v5p count TensorCores but JAX makes one device of each chip's two
# ("megacore"); v5e/v6e count chips of one TensorCore.
_DEVICES_PER_TYPE_UNIT = {"v2": 1.0, "v3": 1.0, "v4": 0.5, "v5p": 0.5, "v5litepod": 1.0,
                          "v5e": 1.0, "v6e": 1.0}

# What JAX's SLURM detection requires; srun sets them for every task of a job step.
_SLURM_TASK = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def slice_devices(accelerator_type: str | None) -> int | None:
    """JAX devices of a TPU slice ("v4-32" -> 16), or None for a type this table does not know."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type or "")
    if m is None or m.group(1) not in _DEVICES_PER_TYPE_UNIT:
        return None
    return int(int(m.group(2)) * _DEVICES_PER_TYPE_UNIT[m.group(1)])


def decide_start(
    env: Mapping[str, str],
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cloud_tpu_vm: bool = False,
    metadata: Callable[[str], str | None] = lambda key: None,
) -> Start:
    """How a process started with `env` joins its job; pure (the metadata server is passed in).

    The first rule that applies decides (JAX's order, with Cloud TPU first: on a TPU VM no
    other applies):
    1. An explicit coordinator (`--coordinator_address` or DMAE_COORDINATOR_ADDRESS), with the
       process count and index from the flags, DMAE_NUM_PROCESSES / DMAE_PROCESS_ID, or the
       scheduler that started the process (SLURM, Open MPI).
    2. A Cloud TPU VM (`cloud_tpu_vm`: JAX found libtpu and TPU chips) with more than one host:
       on GKE, TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES) names the hosts; on a GCE TPU VM
       (`tpu-vm create`, queued resources) the metadata server does. JAX's "gketpu" /
       "gcetpu" detection then finds the coordinator, count and index itself.
    3. Open MPI <= 4 (its mpirun sets OMPI_MCA_orte_hnp_uri): JAX's "ompi" detection.
    4. Open MPI 5, whose mpirun is PRRTE's and sets nothing that says where rank 0 runs:
       refused, with what to pass (rule 1); a guessed coordinator would split the job.
    5. SLURM (`srun` with more than one task): JAX's "slurm" detection.
    6. Otherwise a single process.
    """
    coordinator_address = coordinator_address or env.get("DMAE_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("DMAE_NUM_PROCESSES"):
        num_processes = _env_int(env, "DMAE_NUM_PROCESSES")
    if process_id is None and env.get("DMAE_PROCESS_ID"):
        process_id = _env_int(env, "DMAE_PROCESS_ID")
    tasks = _scheduler_tasks(env)
    if coordinator_address:
        return _explicit_start(coordinator_address, num_processes, process_id, tasks, env)
    if num_processes is not None or process_id is not None:
        raise LaunchError(f"--num_processes={num_processes} and --process_id={process_id} need "
                          f"--coordinator_address=HOST:PORT of process 0 too")
    if cloud_tpu_vm:
        return _tpu_start(env, metadata)
    if "OMPI_MCA_orte_hnp_uri" in env:
        return _scheduler_start("open-mpi", "ompi", tasks, env)
    if _open_mpi_5(env) and tasks is not None and tasks.count > 1:
        raise LaunchError(
            f"Open MPI 5 started {tasks.count} processes but does not say where rank 0 runs "
            f"(its PRRTE mpirun sets none of the variables JAX reads): pass "
            f"--coordinator_address=HOST:PORT, the host of rank 0 and a free port "
            f"(launch/gpu.sh: COORDINATOR=HOST:PORT); count and index then come from "
            f"OMPI_COMM_WORLD_SIZE and OMPI_COMM_WORLD_RANK")
    if all(k in env for k in _SLURM_TASK):
        return _scheduler_start("slurm", "slurm", tasks, env)
    return Start("single", None)


class _Tasks(NamedTuple):
    """A scheduler's view of this process: how many, which one, and how many share its node."""

    count: int
    index: int
    local_index: int
    on_node: int | None


def _scheduler_tasks(env: Mapping[str, str]) -> _Tasks | None:
    """This process's place among the tasks Open MPI (4 or 5) or SLURM started, if any."""
    if "OMPI_COMM_WORLD_SIZE" in env and "OMPI_COMM_WORLD_RANK" in env:
        on_node = env.get("OMPI_COMM_WORLD_LOCAL_SIZE")
        return _Tasks(_env_int(env, "OMPI_COMM_WORLD_SIZE"),
                      _env_int(env, "OMPI_COMM_WORLD_RANK"),
                      _env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                      _env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if on_node else None)
    if all(k in env for k in _SLURM_TASK):
        return _Tasks(_env_int(env, "SLURM_NTASKS"), _env_int(env, "SLURM_PROCID"),
                      _env_int(env, "SLURM_LOCALID"), _slurm_tasks_on_node(env))
    return None


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE ("2(x3),1") at SLURM_NODEID."""
    layout, node = env.get("SLURM_STEP_TASKS_PER_NODE"), env.get("SLURM_NODEID")
    if not layout or node is None:
        return None
    counts: list[int] = []
    for part in layout.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    index = _env_int(env, "SLURM_NODEID")
    return counts[index] if index < len(counts) else None


def _open_mpi_5(env: Mapping[str, str]) -> bool:
    """Started by Open MPI 5's mpirun (PRRTE), which replaced Open MPI 4's ORTE runtime."""
    return "OMPI_COMM_WORLD_SIZE" in env and ("PRTE_LAUNCHED" in env or "PMIX_NAMESPACE" in env)


def _node_gpus(env: Mapping[str, str]) -> int | None:
    return _env_int(env, "SLURM_GPUS_ON_NODE") if env.get("SLURM_GPUS_ON_NODE") else None


def _explicit_start(coordinator_address: str, num_processes: int | None,
                    process_id: int | None, tasks: _Tasks | None,
                    env: Mapping[str, str]) -> Start:
    """Rule 1: the coordinator given; count and index given, or the scheduler's."""
    if tasks is not None:
        num_processes = tasks.count if num_processes is None else num_processes
        process_id = tasks.index if process_id is None else process_id
    if num_processes is None or process_id is None:
        raise LaunchError(
            f"--coordinator_address={coordinator_address} needs the process count and this "
            f"process's index: --num_processes and --process_id (or DMAE_NUM_PROCESSES and "
            f"DMAE_PROCESS_ID), or a SLURM or Open MPI task; got num_processes={num_processes}, "
            f"process_id={process_id}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise LaunchError(f"--process_id must be in [0, {num_processes}) for "
                          f"--num_processes={num_processes}, got {process_id}")
    # No detection: with the values given, JAX would still read a scheduler's local rank
    # and hide every GPU but that one.
    initialize: dict[str, Any] = dict(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, cluster_detection_method="deactivate")
    if tasks is not None and tasks.on_node is not None and tasks.on_node > 1:
        initialize["local_device_ids"] = [tasks.local_index]  # one GPU per process
        return Start("explicit", initialize, num_processes)
    return Start("explicit", initialize, num_processes,
                 node_gpus=_node_gpus(env) if tasks is not None else None)


def _scheduler_start(how: str, method: str, tasks: _Tasks | None,
                     env: Mapping[str, str]) -> Start:
    """Rules 3 and 5: JAX's detection reads the coordinator, count and index.

    JAX assumes one process per GPU under a scheduler and shows each process only the GPU of
    its local rank; a process alone on its node (launch/gpu.sh: one per machine) gets all.
    """
    if tasks is None or tasks.count <= 1:
        return Start("single", None)
    alone = tasks.on_node == 1
    return Start(how, {"cluster_detection_method": method}, tasks.count,
                 all_local_gpus=alone, node_gpus=_node_gpus(env) if alone else None)


def _tpu_start(env: Mapping[str, str], metadata: Callable[[str], str | None]) -> Start:
    """Rule 2: the slice's hosts (times MEGASCALE_NUM_SLICES) and its devices."""
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts:  # GKE injects these into every pod of a TPU slice
        how, method, slice_type = "gke-tpu", "gketpu", env.get("TPU_ACCELERATOR_TYPE")
        slices = env.get("MEGASCALE_NUM_SLICES")
    else:
        hosts = metadata("worker-network-endpoints")
        if not hosts:
            raise LaunchError(
                "this is a Cloud TPU VM but the metadata server names no workers "
                "(instance/attributes/worker-network-endpoints), so JAX cannot find the other "
                "hosts of the slice")
        how, method, slice_type = "gce-tpu", "gcetpu", metadata("accelerator-type")
        slices = env.get("MEGASCALE_NUM_SLICES") or _tpu_env(metadata, "MEGASCALE_NUM_SLICES")
    num_slices = int(slices) if slices else 1
    num_processes = len(hosts.split(",")) * num_slices
    per_slice = slice_devices(slice_type)
    num_devices = per_slice * num_slices if per_slice is not None else None
    if num_processes == 1:
        return Start("single", None, 1, num_devices, slice_type)
    return Start(how, {"cluster_detection_method": method}, num_processes, num_devices,
                 slice_type)


def _tpu_env(metadata: Callable[[str], str | None], key: str) -> str | None:
    """A value of the TPU VM's `tpu-env` metadata (lines `KEY: 'value'`), read as JAX does."""
    for line in (metadata("tpu-env") or "").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip().strip("'")
    return None


def _env_int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"{key} must be an integer, got {value!r}") from None


def check_started(start: Start, *, process_count: int, initialized: bool, device_count: int,
                  local_device_count: int, platform: str) -> None:
    """Fails unless the job JAX formed is the one the environment describes."""
    if process_count > 1 and not initialized:
        raise LaunchError(
            f"JAX sees {process_count} processes but jax.distributed was not initialised "
            f"(this environment reads as {start.how}); checkpoints and the data split need it")
    if process_count != start.num_processes:
        raise LaunchError(f"this job should have {start.num_processes} processes "
                          f"({start.how}), JAX sees {process_count}")
    if start.num_devices is not None and device_count < start.num_devices:
        raise LaunchError(
            f"JAX sees {device_count} devices but the slice ({start.slice_type}) has "
            f"{start.num_devices}: a host's TPU chips are missing or held by another process "
            f"(on each worker: sudo lsof -w /dev/accel* /dev/vfio/*)")
    if platform == "gpu" and start.node_gpus is not None and local_device_count < start.node_gpus:
        raise LaunchError(f"this process sees {local_device_count} of its node's "
                          f"{start.node_gpus} GPUs (SLURM_GPUS_ON_NODE)")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins the job this process belongs to (`decide_start`) and checks what JAX then sees."""
    # JAX's own test for a Cloud TPU VM (libtpu installed and TPU chips on the PCI bus), made
    # when jax is imported; its cluster detection reads the same flag.
    from jax._src import cloud_tpu_init

    start = decide_start(
        os.environ, coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id,
        cloud_tpu_vm=getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False),
        metadata=_gce_metadata)
    if start.initialize is not None:
        jax.distributed.initialize(**start.initialize)
        if start.all_local_gpus:
            # Undo the one-GPU-per-process default (no backend exists yet to have used it).
            jax.config.update("jax_cuda_visible_devices", "all")
            jax.config.update("jax_rocm_visible_devices", "all")
    check_started(start, process_count=jax.process_count(),
                  initialized=jax.distributed.is_initialized(), device_count=jax.device_count(),
                  local_device_count=jax.local_device_count(), platform=jax.default_backend())
    if start.num_processes > 1:
        logging.info("distributed (%s): process %d of %d, %d local / %d global devices",
                     start.how, jax.process_index(), jax.process_count(),
                     jax.local_device_count(), jax.device_count())


def _gce_metadata(key: str) -> str | None:
    """An instance attribute from the GCE metadata server; None when the VM has no such key."""
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    request = urllib.request.Request(
        f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
        headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read().decode()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise LaunchError(f"the GCE metadata server answered HTTP {e.code} for {key}") from None
    except OSError as e:
        raise LaunchError(f"this is a Cloud TPU VM but its metadata server ({host}) cannot be "
                          f"reached: {e}") from None


# ------------------------------------------------------------------ Meshes and shardings.


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


# The mesh of the training step being traced (`step_mesh`); None outside such a step.
_STEP_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("step_mesh",
                                                                          default=None)


@contextlib.contextmanager
def step_mesh(mesh: Mesh):
    """While a step is traced under it: `gather_weight` gathers parameters over `mesh`."""
    token = _STEP_MESH.set(mesh)
    try:
        yield
    finally:
        _STEP_MESH.reset(token)


def gather_weight(w: jax.Array) -> jax.Array:
    """A parameter gathered whole on every device for its use in the step being traced.

    FSDP stores parameters split over the "fsdp" axis; gathering each one where it is used
    (and reduce-scattering its gradient) keeps the matmuls batch-split. Left to itself, XLA
    may split a matmul's output along the features of a sharded weight instead and move
    activations between devices (all-to-all) to get back to the batch split. Outside a step,
    or without FSDP, w is returned as is.
    """
    mesh = _STEP_MESH.get()
    if mesh is None or mesh.shape["fsdp"] == 1:
        return w
    return jax.lax.with_sharding_constraint(w, replicated(mesh))


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
