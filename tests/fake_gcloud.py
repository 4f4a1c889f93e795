"""A fake `gcloud` for the launch tests: the Cloud TPU commands launch/tpu_pod.sh uses, with
the states of the real service, on this machine.

    gcloud compute tpus tpu-vm {create,describe,delete,list,ssh,scp} ...
    gcloud compute tpus queued-resources {create,describe,delete,list} ...

Everything lives in the directory $FAKE_GCLOUD_STATE: `state.json` (the nodes and queued
resources, as the Cloud TPU API v2 writes them), `calls.log` (one JSON argv per call), and
`workers/<node>/<i>/`, the home directory of worker i of a node. `ssh --worker=all --command C`
runs `bash -c C` in each worker's home at once (the environment a worker has: HOME, PATH, its
index, and $FAKE_GCLOUD_WORKER_ENV, a JSON object); `scp` copies into those homes. Deleting a
node ends its workers' processes and removes their homes, as a new VM starts with an empty disk.

What the real service does and this fake does too:
- flags each command does not have are refused (exit 2, "unrecognized arguments");
- `describe` of something that does not exist fails with NOT_FOUND (exit 1), `create` of
  something that exists with ALREADY_EXISTS;
- `tpu-vm create` returns when the node is READY; a queued resource is WAITING_FOR_RESOURCES
  when `create` returns, then PROVISIONING (its node CREATING), then ACTIVE (its node READY):
  one step per `describe` of it, the calls a launcher makes while it polls;
- a spot node that is preempted (`preempt`) has its processes sent SIGTERM (the VM's
  shutdown), then stays PREEMPTED: ssh and scp to it fail until it is deleted; a preempted
  queued resource's node is deleted and the resource goes SUSPENDING, then SUSPENDED;
- a queued resource is deleted without --force only when WAITING_FOR_RESOURCES, FAILED or
  SUSPENDED (FAILED_PRECONDITION otherwise); `fail_next_request` makes the next request end
  FAILED instead of PROVISIONING, as one whose resources never came.
JAX on these CPU workers cannot find its peers the way a TPU VM does (no metadata server), so
each worker of a multi-host node gets DMAE_COORDINATOR_ADDRESS, DMAE_NUM_PROCESSES and
DMAE_PROCESS_ID, the explicit start of `dmae_jax.parallel.decide_start`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import portpicker

STATE_ENV = "FAKE_GCLOUD_STATE"
WORKER_ENV = "FAKE_GCLOUD_WORKER_ENV"

# The flags of each command (from `gcloud ... --help` of Google Cloud SDK 528); True: takes a
# value.
_COMMON = {"--zone": True, "--project": True, "--quiet": False, "--format": True}
_FLAGS = {
    ("tpu-vm", "create"): {"--accelerator-type": True, "--version": True, "--spot": False,
                           "--internal-ips": False, "--async": False},
    ("tpu-vm", "describe"): {},
    ("tpu-vm", "delete"): {"--async": False},
    ("tpu-vm", "list"): {"--filter": True},
    ("tpu-vm", "ssh"): {"--worker": True, "--command": True, "--internal-ip": False,
                        "--tunnel-through-iap": False},
    ("tpu-vm", "scp"): {"--worker": True, "--internal-ip": False, "--tunnel-through-iap": False,
                        "--recurse": False},
    ("queued-resources", "create"): {"--node-id": True, "--accelerator-type": True,
                                     "--runtime-version": True, "--spot": False,
                                     "--internal-ips": False, "--async": False},
    ("queued-resources", "describe"): {},
    ("queued-resources", "delete"): {"--force": False, "--async": False},
    ("queued-resources", "list"): {"--filter": True},
}


class GcloudError(Exception):
    """An error gcloud prints as `ERROR: (gcloud.<command>) <message>` with an exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------ State.


@contextlib.contextmanager
def _state(root: str):
    """The state, locked for one read-modify-write (the test and the script both change it)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "state.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(root, "state.json")
        state = {"nodes": {}, "queued": {}, "fail_next_request": False}
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
        yield state
        with open(path + ".tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(path + ".tmp", path)


def read_state(root: str) -> dict:
    """The nodes and queued resources as they are now (for assertions)."""
    with _state(root) as state:
        return json.loads(json.dumps(state))


def calls(root: str) -> list[list[str]]:
    """Every gcloud argv so far, in order."""
    path = os.path.join(root, "calls.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def workers_dir(root: str, node: str, worker: int) -> str:
    return os.path.join(root, "workers", node, str(worker))


def _hosts(accelerator_type: str) -> int:
    """TPU VMs of an accelerator type: 4 chips a host (v4/v5p count 2 TensorCores a chip)."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type)
    if m is None:
        raise GcloudError(f"INVALID_ARGUMENT: unknown accelerator type {accelerator_type!r}")
    chips = int(m.group(2)) // (2 if m.group(1) in ("v2", "v3", "v4", "v5p") else 1)
    return max(1, chips // (8 if m.group(1) in ("v5litepod", "v6e") and chips <= 8 else 4))


def _new_node(root, project, zone, name, accelerator_type, version, spot, internal, queued=None):
    node = {
        "name": f"projects/{project}/locations/{zone}/nodes/{name}",
        "acceleratorType": accelerator_type,
        "runtimeVersion": version,
        "state": "CREATING",
        "networkConfig": {"enableExternalIps": not internal},
        "schedulingConfig": {"spot": True} if spot else {},
        "networkEndpoints": [{"ipAddress": f"10.130.0.{i + 2}"}
                             for i in range(_hosts(accelerator_type))],
    }
    if queued:
        node["queuedResource"] = queued
    for i in range(len(node["networkEndpoints"])):
        os.makedirs(workers_dir(root, name, i), exist_ok=True)
    return node


def _remove_node(root: str, state: dict, name: str) -> None:
    """The VMs go away: their processes end, their disks are gone."""
    _end_processes(os.path.join(root, "workers", name))
    shutil.rmtree(os.path.join(root, "workers", name), ignore_errors=True)
    del state["nodes"][name]


def _processes_under(directory: str) -> list[int]:
    """Processes whose working directory is inside `directory` (a worker VM's processes)."""
    found = []
    prefix = os.path.realpath(directory) + os.sep
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (os.readlink(f"/proc/{pid}/cwd") + os.sep).startswith(prefix):
                found.append(int(pid))
    return found


def _end_processes(directory: str, grace: float = 60.0) -> None:
    """SIGTERM, as a VM's shutdown sends; SIGKILL whatever is left after `grace` seconds."""
    pids = _processes_under(directory)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while pids and time.time() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------ What the test does.


def preempt(root: str, name: str) -> None:
    """The service preempts spot node `name`: its processes get SIGTERM and the VMs stop."""
    with _state(root) as state:
        node = state["nodes"][name]
        assert node["schedulingConfig"].get("spot"), f"{name} is not a spot node"
        queued = node.get("queuedResource")
        if queued:
            _remove_node(root, state, name)
            state["queued"][queued.rsplit("/", 1)[1]]["state"]["state"] = "SUSPENDING"
        else:
            _end_processes(os.path.join(root, "workers", name))
            node["state"] = "PREEMPTED"


def fail_next_request(root: str) -> None:
    """The next queued resource request ends FAILED (its resources never came)."""
    with _state(root) as state:
        state["fail_next_request"] = True


def end_all_processes(root: str) -> None:
    """Test clean-up: no worker process outlives the test."""
    _end_processes(os.path.join(root, "workers"), grace=30.0)


# ------------------------------------------------------------------ The commands.


def _parse(group: str, verb: str, args: list[str]) -> tuple[list[str], dict]:
    allowed = {**_COMMON, **_FLAGS[(group, verb)]}
    positional, flags, i = [], {}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name not in allowed:
                raise GcloudError(f"unrecognized arguments: {arg}", status=2)
            if allowed[name] and not eq:
                i += 1
                if i == len(args):
                    raise GcloudError(f"argument {name}: expected one argument", status=2)
                value = args[i]
            flags[name] = value if allowed[name] else True
        else:
            positional.append(arg)
        i += 1
    if "--zone" not in flags:
        raise GcloudError("argument --zone: Must be specified.", status=2)
    return positional, flags


def _format(resource: dict, fmt: str | None) -> str:
    """`value(a.b)` as gcloud prints it (booleans True/False, a missing field empty), or JSON."""
    m = re.fullmatch(r"value\(([\w.]+)\)", fmt or "")
    if m is None:
        return json.dumps(resource, indent=2)
    value = resource
    for key in m.group(1).split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _tick(root: str, state: dict, name: str) -> None:
    """A queued resource moves one state along, as it does between a launcher's polls."""
    queued = state["queued"][name]
    spec = queued["tpu"]["nodeSpec"][0]
    current = queued["state"]["state"]
    if current == "WAITING_FOR_RESOURCES":
        if state["fail_next_request"]:
            state["fail_next_request"] = False
            queued["state"]["state"] = "FAILED"
            return
        node = spec["node"]
        state["nodes"][spec["nodeId"]] = _new_node(
            root, *spec["parent"].split("/")[1::2], spec["nodeId"], node["acceleratorType"],
            node["runtimeVersion"], "spot" in queued,
            not node["networkConfig"]["enableExternalIps"], queued=queued["name"])
        queued["state"]["state"] = "PROVISIONING"
    elif current == "PROVISIONING":
        state["nodes"][spec["nodeId"]]["state"] = "READY"
        queued["state"]["state"] = "ACTIVE"
    elif current == "SUSPENDING":
        queued["state"]["state"] = "SUSPENDED"


def tpu_vm(root: str, verb: str, args: list[str]) -> str:
    positional, flags = _parse("tpu-vm", verb, args)
    project, zone = flags.get("--project", "fake-project"), flags["--zone"]
    with _state(root) as state:
        nodes = state["nodes"]
        if verb == "list":
            return "\n".join(_format(n, flags.get("--format")) for n in nodes.values())
        if verb == "scp":
            *sources, target = positional
            name, _, dest = target.partition(":")
        else:
            name = positional[0]
        path = f"projects/{project}/locations/{zone}/nodes/{name}"
        if verb == "create":
            if name in nodes:
                raise GcloudError(f"ALREADY_EXISTS: Resource '{path}' already exists")
            nodes[name] = _new_node(root, project, zone, name, flags["--accelerator-type"],
                                    flags["--version"], "--spot" in flags,
                                    "--internal-ips" in flags)
            nodes[name]["state"] = "READY"
            return ""
        if name not in nodes:
            raise GcloudError(f"NOT_FOUND: Resource '{path}' was not found")
        node = nodes[name]
        if verb == "describe":
            return _format(node, flags.get("--format"))
        if verb == "delete":
            _remove_node(root, state, name)
            return ""
        if node["state"] != "READY":
            raise GcloudError(f"cannot connect to TPU {name}: it is {node['state']}", status=255)
        workers = range(len(node["networkEndpoints"]))
        if flags.get("--worker", "0") != "all":
            workers = [int(flags.get("--worker", "0"))]
    if verb == "scp":
        for i in workers:
            for source in sources:
                shutil.copy(source, os.path.join(workers_dir(root, name, i), dest))
        return ""
    return _ssh(root, name, node, workers, flags.get("--command"))


def _ssh(root: str, name: str, node: dict, workers, command: str | None) -> str:
    if command is None:
        raise GcloudError("an interactive shell is not part of this fake", status=2)
    extra = json.loads(os.environ.get(WORKER_ENV, "{}"))
    hosts = len(node["networkEndpoints"])
    port = portpicker.pick_unused_port() if hosts > 1 else None
    procs = []
    for i in workers:
        home = workers_dir(root, name, i)
        env = dict(extra, HOME=home, PATH=os.environ["PATH"], LANG="C.UTF-8",
                   TPU_NAME=name, FAKE_WORKER=str(i))
        if port is not None:
            env.update(DMAE_COORDINATOR_ADDRESS=f"localhost:{port}",
                       DMAE_NUM_PROCESSES=str(hosts), DMAE_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(["bash", "-c", command], cwd=home, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs, status = [], 0
    for proc in procs:
        out, _ = proc.communicate()
        outputs.append(out)
        status = status or proc.returncode
    if status:
        raise GcloudError("".join(outputs) + f"command exited with return code [{status}]")
    return "".join(outputs)


def queued_resources(root: str, verb: str, args: list[str]) -> str:
    positional, flags = _parse("queued-resources", verb, args)
    project, zone = flags.get("--project", "fake-project"), flags["--zone"]
    with _state(root) as state:
        queued = state["queued"]
        if verb == "list":
            return "\n".join(_format(q, flags.get("--format")) for q in queued.values())
        name = positional[0]
        path = f"projects/{project}/locations/{zone}/queuedResources/{name}"
        if verb == "create":
            node_id = flags["--node-id"]
            if name in queued:
                raise GcloudError(f"ALREADY_EXISTS: Resource '{path}' already exists")
            if node_id in state["nodes"]:
                raise GcloudError(f"ALREADY_EXISTS: a node named {node_id} exists")
            _hosts(flags["--accelerator-type"])
            queued[name] = {
                "name": path,
                "state": {"state": "WAITING_FOR_RESOURCES"},
                "tpu": {"nodeSpec": [{
                    "parent": f"projects/{project}/locations/{zone}",
                    "nodeId": node_id,
                    "node": {"acceleratorType": flags["--accelerator-type"],
                             "runtimeVersion": flags["--runtime-version"],
                             "networkConfig": {
                                 "enableExternalIps": "--internal-ips" not in flags}}}]},
            }
            if "--spot" in flags:
                queued[name]["spot"] = {}
            return f"Create request issued for: [{name}]"
        if name not in queued:
            raise GcloudError(f"NOT_FOUND: Resource '{path}' was not found")
        if verb == "describe":
            out = _format(queued[name], flags.get("--format"))
            _tick(root, state, name)
            return out
        current = queued[name]["state"]["state"]
        node_id = queued[name]["tpu"]["nodeSpec"][0]["nodeId"]
        if "--force" not in flags and current not in ("WAITING_FOR_RESOURCES", "FAILED",
                                                      "SUSPENDED"):
            raise GcloudError(f"FAILED_PRECONDITION: queued resource {name} is {current}; "
                              f"delete it with --force to delete its nodes too")
        if node_id in state["nodes"]:
            _remove_node(root, state, node_id)
        del queued[name]
        return ""


def main(argv: list[str]) -> int:
    root = os.environ[STATE_ENV]
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "calls.log"), "a") as f:
        f.write(json.dumps(argv) + "\n")
    if argv[:2] != ["compute", "tpus"] or len(argv) < 4 or argv[2] not in ("tpu-vm",
                                                                           "queued-resources"):
        print(f"ERROR: (gcloud) this fake has no command {' '.join(argv[:4])!r}",
              file=sys.stderr)
        return 2
    group, verb = argv[2], argv[3]
    command = f"gcloud.compute.tpus.{group}.{verb}"
    if (group, verb) not in _FLAGS:
        print(f"ERROR: ({command}) Invalid choice: '{verb}'.", file=sys.stderr)
        return 2
    try:
        if group == "tpu-vm":
            out = tpu_vm(root, verb, argv[4:])
        else:
            out = queued_resources(root, verb, argv[4:])
    except GcloudError as e:
        print(f"ERROR: ({command}) {e}", file=sys.stderr)
        return e.status
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
