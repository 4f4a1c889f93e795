"""Starting runs at scale: how a process joins its job (recorded environments of every way a
job is started, two real processes through SLURM's), and launch/tpu_pod.sh against a fake
gcloud that keeps the Cloud TPU service's states: a preempted run, launched again with the same
command, resumes from the bucket."""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import threading
from unittest import mock

import portpicker
import pytest

from dmae_jax import parallel
from dmae_jax.errors import LaunchError
from tests import fake_gcloud, helpers
from tests.gcs_emulator import gcs  # noqa: F401 (the module's GCS emulator fixture)

ROOT = helpers.REPO
SCRIPT = "launch/tpu_pod.sh"
with open(os.path.join(ROOT, "tests", "fixtures", "launch_environments.json")) as _f:
    RECORDED = {k: v for k, v in json.load(_f).items() if not k.startswith("_")}
TINY = ["--config.total_steps=40", "--config.log_every_steps=1", "--config.ckpt_every_steps=3",
        "--config.eval_every_steps=0", "--config.batch_size=16", "--config.model.decoder_depth=1"]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from dmae_jax.data import datasets

    path = str(tmp_path_factory.mktemp("tfds"))
    datasets.load_source("digits", "train", data_dir=path, image_size=16)
    return path


# ------------------------------------------------------------------ Joining a job, by rule.


def _decide(case: dict, metadata=None) -> parallel.Start:
    return parallel.decide_start(
        case["env"], cloud_tpu_vm=case["cloud_tpu_vm"],
        metadata=metadata or case["metadata"].get, **case.get("flags", {}))


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_each_recorded_environment_starts_as_its_scheduler_describes(name):
    case = RECORDED[name]
    expected = case["expected"]
    if "error" in expected:
        with pytest.raises(LaunchError, match=expected["error"]) as error:
            _decide(case)
        assert "--coordinator_address=HOST:PORT" in str(error.value)
        return
    start = _decide(case)
    for field, value in expected.items():
        assert getattr(start, field) == value, (field, start)


class _MetadataServer(http.server.BaseHTTPRequestHandler):
    """The GCE metadata server of one recorded TPU VM (instance attributes only)."""

    attributes: dict = {}

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        key = self.path.rsplit("/", 1)[1]
        if self.headers.get("Metadata-Flavor") != "Google" or key not in self.attributes:
            self.send_response(404 if key not in self.attributes else 403)
            self.end_headers()
            return
        body = self.attributes[key].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("name", sorted(k for k, v in RECORDED.items() if "jax" in v))
def test_jax_s_own_detection_reads_each_recorded_environment_as_the_decision_does(name):
    """The decision names a JAX cluster detection; JAX's code, on the same environment (and
    the same metadata, served over HTTP), finds the process count we expect and the index the
    scheduler gave. Open MPI 5 is the control: JAX does not detect it, or detects SLURM's
    batch step and gives every rank index 0, which is why it is refused."""
    from jax._src import clusters
    from jax._src.clusters import cloud_tpu_cluster

    case = RECORDED[name]
    jax_view = case["jax"]
    cluster = next(c for c in clusters.ClusterEnv._cluster_types if c.name == jax_view["cluster"])
    handler = type("Handler", (_MetadataServer,), {"attributes": case["metadata"]})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(case["env"], GCE_METADATA_IP=f"127.0.0.1:{server.server_port}")
    try:
        # (time.sleep: JAX retries a metadata key it does not find, 6 x 0.5 s.)
        with mock.patch.dict(os.environ, env, clear=True), \
                mock.patch.object(cloud_tpu_cluster, "running_in_cloud_tpu_vm",
                                  case["cloud_tpu_vm"]), mock.patch("time.sleep"):
            present = cluster.is_env_present()
            if not jax_view.get("present", True):
                assert not present
                return
            assert present
            process_id, count = cluster.get_process_id(), cluster.get_process_count()
            refused = "error" in case["expected"]
            # Our reader of the metadata server, against the same server.
            ours = None if refused else _decide(case, metadata=parallel._gce_metadata)
    finally:
        server.shutdown()
    assert process_id == jax_view["process_id"]
    if refused:
        assert process_id == 0 and int(case["env"]["OMPI_COMM_WORLD_RANK"]) != 0
        return
    assert count == ours.num_processes == case["expected"]["num_processes"]


def test_a_process_count_or_index_without_a_coordinator_is_refused():
    with pytest.raises(LaunchError, match="need --coordinator_address"):
        parallel.decide_start({}, num_processes=2, process_id=0)
    with pytest.raises(LaunchError, match=r"--process_id must be in \[0, 2\)"):
        parallel.decide_start({}, coordinator_address="h:1", num_processes=2, process_id=2)
    with pytest.raises(LaunchError, match="needs the process count"):
        parallel.decide_start({}, coordinator_address="h:1")


def test_slice_devices_follow_how_jax_counts_each_generation():
    assert [parallel.slice_devices(t) for t in
            ("v3-8", "v4-8", "v4-128", "v5p-128", "v5litepod-16", "v6e-256", "tpu7x-64", None)] \
        == [8, 4, 64, 64, 16, 256, None, None]


def _check(start, **seen):
    values = dict(process_count=start.num_processes, initialized=start.num_processes > 1,
                  device_count=start.num_devices or 1, local_device_count=1, platform="tpu")
    values.update(seen)
    parallel.check_started(start, **values)


def test_a_job_that_is_not_the_one_the_environment_describes_stops_with_one_line():
    slice_ = _decide(RECORDED["gce_tpu_vm_v4_32_worker_1"])
    _check(slice_)  # the job as described: no error
    with pytest.raises(LaunchError, match="JAX sees 4 processes but jax.distributed was not"):
        _check(slice_, initialized=False)
    with pytest.raises(LaunchError, match=r"sees 12 devices but the slice \(v4-32\) has 16"):
        _check(slice_, device_count=12)
    with pytest.raises(LaunchError, match="should have 4 processes"):
        _check(slice_, process_count=3)
    # A single process that JAX sees as one of several, uninitialised (the TPU pod).
    with pytest.raises(LaunchError, match="JAX sees 4 processes but"):
        _check(parallel.Start("single", None), process_count=4, initialized=False)
    gpus = _decide(RECORDED["slurm_2_nodes_one_task_each_8_gpus"])
    _check(gpus, local_device_count=8, platform="gpu")
    with pytest.raises(LaunchError, match="sees 1 of its node's 8 GPUs"):
        _check(gpus, local_device_count=1, platform="gpu")


def _free_slurm_job_id() -> tuple[int, int]:
    """A job id whose coordinator port (JAX's rule: id % 4096 + 61440) is free here."""
    for _ in range(200):
        job = random.randrange(10_000, 10_000_000)
        port = job % 2**12 + (65535 - 2**12 + 1)
        if portpicker.is_port_free(port):
            return job, port
    raise AssertionError("no free port in JAX's SLURM range")


def test_two_processes_started_as_slurm_tasks_train_and_checkpoint_together(tmp_path,
                                                                            digits_dir):
    job, _ = _free_slurm_job_id()
    work = str(tmp_path / "w")
    cmd = helpers.main_command("configs/pretrain_digits.py", work,
                               f"--config.data.data_dir={digits_dir}", *TINY[1:],
                               "--config.total_steps=6")
    procs = []
    for task in range(2):
        slurm = dict(SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                     SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_NODEID="0",
                     SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NUM_NODES="1")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=helpers.env(1, **slurm),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    # Task 0 is process 0 (it alone prints progress), task 1 is process 1: one job of two.
    assert sorted(helpers.losses(outs[0])) == list(range(1, 7))
    assert not helpers.losses(outs[1])
    assert helpers.checkpoint_steps(work) == [3, 6]


def test_open_mpi_5_without_a_coordinator_is_one_error_line_before_anything(tmp_path):
    env = helpers.env(1, **{k: v for k, v in RECORDED["open_mpi_5_two_nodes"]["env"].items()
                            if k.startswith(("OMPI_", "PMIX_", "PRTE_"))})
    before = os.listdir(tmp_path)
    proc = subprocess.run(helpers.main_command("configs/pretrain_digits.py", str(tmp_path)),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Open MPI 5 started 2 processes")
    assert os.listdir(tmp_path) == before


# ------------------------------------------------------------------ tpu_pod.sh, dry.


def _dry_run(*overrides: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, ZONE="us-central2-b", TPU="dmae-test", BUCKET="gs://b", **env)
    return subprocess.run(["bash", SCRIPT, "--dry-run", "configs/pretrain_digits.py", "run1",
                           *overrides], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=120)


def _commands(out: str) -> list[list[str]]:
    """The commands a dry run prints, each split as the local shell would."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _remote(command: list[str]) -> str:
    return command[command.index("--command") + 1]


OVERRIDE = "--config.profile_steps=(10, 15)"


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict:
    """The two dry runs the tests read: a queued spot slice without external IPs, and a
    direct spot node; each with its own TMPDIR, to see that it leaves nothing there."""
    runs = {}
    for name, overrides, env in [
            ("queued", (OVERRIDE, "--config.total_steps=100"),
             dict(QUEUED="1", SPOT="1", INTERNAL_IPS="1", TYPE="v5p-128")),
            ("direct", (), dict(SPOT="1"))]:
        tmp = tmp_path_factory.mktemp(f"dry_{name}")
        runs[name] = (_dry_run(*overrides, TMPDIR=str(tmp), **env), str(tmp))
    return runs


def test_dry_run_checks_the_config_here_and_shows_the_state_checks(dry_runs):
    proc, tmp = dry_runs["queued"]
    assert proc.returncode == 0, proc.stderr
    out, commands = proc.stdout, _commands(proc.stdout)
    assert "config ok: task pretrain" in out
    assert commands[0][-3:] == ["--config.data.data_dir=gs://b/tfds", OVERRIDE,
                                "--config.total_steps=100"]
    # The state checks: what is read, and what each state leads to.
    assert ["gcloud", "compute", "tpus", "queued-resources", "describe", "dmae-test-qr"] in [
        c[:6] for c in commands]
    for state, action in [("WAITING_FOR_RESOURCES", "wait"), ("ACTIVE", "use its node"),
                          ("SUSPENDED", "delete, request again"),
                          ("FAILED", "delete, request again"), ("NOT_FOUND", "request")]:
        assert re.search(rf"#\s+{state}\s+-> {action}$", out, re.M), state
    create = next(c for c in commands if c[3:5] == ["queued-resources", "create"])
    assert "--spot" in create and "--internal-ips" in create
    assert create[create.index("--runtime-version") + 1] == "v2-alpha-tpuv5"
    # No external IPs: the wheelhouse, built for the workers' platform, jax[tpu] pinned.
    assert "(shown: wheelhouse)" in out
    compile_ = next(c for c in commands if c[:3] == ["uv", "pip", "compile"])
    assert compile_[compile_.index("--python-platform") + 1] == "x86_64-manylinux_2_35"
    assert compile_[compile_.index("--extra") + 1] == "gcs"  # the workers' gs:// clients
    download = next(c for c in commands if c[1:4] == ["-m", "pip", "download"])
    assert "manylinux2014_x86_64" in download and "manylinux_2_35_x86_64" in download
    assert download[download.index("--python-version") + 1] == "3.11"
    ssh = [c for c in commands if c[3:5] == ["tpu-vm", "ssh"]]
    assert all("--internal-ip" in c for c in ssh)
    assert "--no-index --find-links ~/dmae_wheelhouse/wheels" in _remote(ssh[1])
    # The run: detached, logged, every argument as typed here.
    run = _remote(ssh[-1])
    assert "exec nohup setsid ~/dmae_venv/bin/python -m dmae_jax.main" in run
    assert ") >> ~/dmae_runs/run1.log 2>&1 < /dev/null &" in run
    argv = shlex.split(run.split("dmae_jax.main", 1)[1].split(") >>", 1)[0])
    assert argv == ["--config=configs/pretrain_digits.py", "--workdir=gs://b/runs/run1",
                    "--config.data.data_dir=gs://b/tfds", OVERRIDE, "--config.total_steps=100"]
    assert os.listdir(tmp) == []  # its temporary directory is gone


def test_dry_run_of_a_direct_node_shows_its_states_and_installs_from_pypi(dry_runs):
    proc, tmp = dry_runs["direct"]
    assert proc.returncode == 0, proc.stderr
    for state, action in [("NOT_FOUND", "create"), ("READY", "use"), ("CREATING", "wait"),
                          ("PREEMPTED", "delete, create again"),
                          ("TERMINATED", "delete, create again"), ("STOPPED", "stop")]:
        assert re.search(rf"#\s+{state}\s+-> {action}$", proc.stdout, re.M), state
    commands = _commands(proc.stdout)
    create = next(c for c in commands if c[3:5] == ["tpu-vm", "create"])
    assert "--spot" in create and "--internal-ips" not in create
    assert create[create.index("--version") + 1] == "tpu-ubuntu2204-base"
    assert "(shown: online)" in proc.stdout
    setup = _remote([c for c in commands if c[3:5] == ["tpu-vm", "ssh"]][1])
    assert "uv pip install -q --python ~/dmae_venv/bin/python -r ~/requirements.txt" in setup
    compile_ = next(c for c in commands if c[:3] == ["uv", "pip", "compile"])
    pins = compile_[-1]
    assert pins.endswith("pins.in") and os.listdir(tmp) == []


def test_a_mistyped_field_stops_the_launch_on_this_machine_before_any_cloud_call(tmp_path):
    bin_dir = _fake_gcloud_bin(tmp_path)
    state = str(tmp_path / "gcloud")
    env = dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               **{fake_gcloud.STATE_ENV: state}, TMPDIR=str(tmp_path / "tmp"))
    os.makedirs(env["TMPDIR"])
    for dry in ([], ["--dry-run"]):
        proc = subprocess.run(["bash", SCRIPT, *dry, "configs/pretrain_digits.py", "r",
                               "--config.totl_steps=3"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60,
                              env=dict(os.environ, ZONE="z", TPU="t", BUCKET="gs://b", **env))
        assert proc.returncode == 2
        assert ("error: --config.totl_steps: the config has no field 'totl_steps'; did you "
                "mean 'total_steps'?") in proc.stderr
        assert fake_gcloud.calls(state) == []
        assert os.listdir(env["TMPDIR"]) == []


def test_the_default_jax_pin_is_the_version_the_tests_run_with():
    import jax

    with open(os.path.join(ROOT, SCRIPT)) as f:
        pin = re.search(r"^TESTED_JAX_VERSION=(\S+)$", f.read(), re.M).group(1)
    assert pin == jax.__version__


def test_every_gcloud_command_the_script_prints_is_one_the_real_gcloud_accepts(tmp_path,
                                                                             dry_runs):
    """Google Cloud SDK parses each command (flags, values, resource names) and stops only at
    the missing account; the control with an unknown flag is refused by the parser."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        pytest.skip("the Google Cloud SDK is not installed here (it is on the CI machine)")
    commands = {}
    for proc, _ in dry_runs.values():
        for c in _commands(proc.stdout):
            if c[0] == "gcloud":
                commands.setdefault(tuple(c[:5]), c)
    commands[("control",)] = ["gcloud", "compute", "tpus", "tpu-vm", "create", "x",
                              "--zone", "z", "--accelerator-type", "v4-8", "--bogus-flag"]
    sdk_env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path / "sdk"),
                   CLOUDSDK_CORE_PROJECT="fake-project", CLOUDSDK_CORE_DISABLE_PROMPTS="1")

    def parse(argv):
        return subprocess.run([gcloud, *argv[1:]], env=sdk_env, capture_output=True,
                              text=True, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = dict(zip(commands, pool.map(parse, commands.values()), strict=True))
    control = results.pop(("control",))
    assert control.returncode == 2 and "unrecognized arguments: --bogus-flag" in control.stderr
    assert len(results) >= 8
    for key, proc in results.items():
        assert proc.returncode == 1, (key, proc.stderr)
        assert "You do not currently have an active account selected" in proc.stderr, key


# ------------------------------------------------------------------ tpu_pod.sh, on a fake cloud.


def _fake_gcloud_bin(tmp_path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                      f"{shlex.quote(os.path.join(ROOT, 'tests', 'fake_gcloud.py'))} \"$@\"\n")
    gcloud.chmod(0o755)
    return str(bin_dir)


class _Cloud:
    """A fake Cloud TPU project and a bucket; launches tpu_pod.sh against them."""

    def __init__(self, tmp_path, worker_python: str, bucket: str | None = None,
                 bucket_env: dict | None = None, **env):
        self.state = str(tmp_path / "gcloud")
        self.bucket = bucket or str(tmp_path / "bucket")
        worker_env = dict(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONUNBUFFERED="1",
                          TF_CPP_MIN_LOG_LEVEL="3", **(bucket_env or {}))
        self.env = dict(
            os.environ, PATH=f"{_fake_gcloud_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}",
            ZONE="us-central2-b", TPU="dmae-test", BUCKET=self.bucket, TYPE="v4-8", SPOT="1",
            WORKER_PYTHON=worker_python, POLL_SECONDS="0", **(bucket_env or {}),
            **{fake_gcloud.STATE_ENV: self.state,
               fake_gcloud.WORKER_ENV: json.dumps(worker_env)})
        self.env.update(env)

    def launch(self, *args: str) -> str:
        start = len(fake_gcloud.calls(self.state))
        proc = subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        self.last_calls = [c[2:4] for c in fake_gcloud.calls(self.state)[start:]]
        return proc.stdout

    def worker(self, i: int = 0) -> str:
        return fake_gcloud.workers_dir(self.state, "dmae-test", i)

    def node_state(self) -> str | None:
        node = fake_gcloud.read_state(self.state)["nodes"].get("dmae-test")
        return node and node["state"]


@pytest.fixture
def stub_python(tmp_path):
    """A worker "python" that records its arguments and environment and exits: the launch
    steps without the cost of a run."""
    path = tmp_path / "stub_python"
    path.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$HOME/stub_calls"\n'
                    'env | grep -E "^DMAE_" >> "$HOME/stub_calls"\n'
                    'case "$*" in *sys.version_info*) echo "python stub jax stub";; esac\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def cleanup_workers(tmp_path):
    yield
    fake_gcloud.end_all_processes(str(tmp_path / "gcloud"))


def test_a_direct_spot_node_is_created_reused_and_recreated_after_preemption(
        tmp_path, stub_python, cleanup_workers):
    cloud = _Cloud(tmp_path, stub_python, TYPE="v4-16")  # two TPU VMs
    out = cloud.launch("configs/pretrain_digits.py", "r")
    assert "TPU dmae-test is NOT_FOUND: create" in out
    assert cloud.last_calls == [["tpu-vm", "describe"], ["tpu-vm", "create"],
                                ["tpu-vm", "describe"], ["tpu-vm", "ssh"], ["tpu-vm", "scp"],
                                ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    for i in (0, 1):  # --worker=all: the code and the command reached both VMs
        assert os.path.exists(os.path.join(cloud.worker(i), "dmae_jax", "launch", "tpu_pod.sh"))
        with open(os.path.join(cloud.worker(i), "stub_calls")) as f:
            calls = f.read()
        assert "-m dmae_jax.main --config=configs/pretrain_digits.py" in calls
        assert f"DMAE_PROCESS_ID={i}" in calls and "DMAE_NUM_PROCESSES=2" in calls
    # READY: used as it is.
    out = cloud.launch("configs/pretrain_digits.py", "r")
    assert "TPU dmae-test is READY: use" in out and ["tpu-vm", "create"] not in cloud.last_calls
    # Preempted: deleted (its disks with it) and created again.
    fake_gcloud.preempt(cloud.state, "dmae-test")
    assert cloud.node_state() == "PREEMPTED"
    out = cloud.launch("configs/pretrain_digits.py", "r")
    assert "TPU dmae-test is PREEMPTED: delete, create again" in out
    assert cloud.last_calls[:4] == [["tpu-vm", "describe"], ["tpu-vm", "delete"],
                                    ["tpu-vm", "describe"], ["tpu-vm", "create"]]
    assert cloud.node_state() == "READY"


def test_a_queued_resource_is_waited_for_and_requested_again_when_suspended_or_failed(
        tmp_path, stub_python, cleanup_workers):
    cloud = _Cloud(tmp_path, stub_python, QUEUED="1")
    out = cloud.launch("configs/pretrain_digits.py", "r")
    for line in ("queued resource dmae-test-qr is NOT_FOUND: request",
                 "queued resource dmae-test-qr is WAITING_FOR_RESOURCES: wait",
                 "queued resource dmae-test-qr is PROVISIONING: wait",
                 "queued resource dmae-test-qr is ACTIVE: use its node"):
        assert line in out
    # Preempted: the service deletes the node and suspends the request; it cannot come back.
    fake_gcloud.preempt(cloud.state, "dmae-test")
    fake_gcloud.fail_next_request(cloud.state)  # and the next request is not granted
    out = cloud.launch("configs/pretrain_digits.py", "r")
    assert "is SUSPENDING: wait" in out and "is SUSPENDED: delete, request again" in out
    assert "is FAILED: delete, request again" in out
    assert out.count("is ACTIVE: use its node") == 1
    assert [c for c in cloud.last_calls if c[0] == "queued-resources" and c[1] != "describe"] \
        == [["queued-resources", "delete"], ["queued-resources", "create"],
            ["queued-resources", "delete"], ["queued-resources", "create"]]
    assert cloud.node_state() == "READY"


def _committed_steps(workdir: str) -> list[int]:
    """Checkpoint steps Orbax has finished under a workdir of the bucket (local or gs://)."""
    from dmae_jax import storage

    directory = f"{workdir}/checkpoints"
    return [int(d) for d in storage.listdir(directory)
            if d.isdigit() and storage.exists(f"{directory}/{d}/commit_success.txt")]


def test_a_preempted_run_launched_again_with_the_same_command_resumes_from_the_bucket(
        tmp_path, gcs, cleanup_workers):  # noqa: F811
    from dmae_jax.data import datasets

    cloud = _Cloud(tmp_path, sys.executable, bucket=f"{gcs.root}/launch", bucket_env=gcs.env)
    datasets.load_source("digits", "train", data_dir=f"{cloud.bucket}/tfds", image_size=16)
    command = ["configs/pretrain_digits.py", "digits", *TINY]
    work = f"{cloud.bucket}/runs/digits"
    out = cloud.launch(*command)
    assert "started digits on dmae-test" in out
    log = os.path.join(cloud.worker(0), "dmae_runs", "digits.log")
    helpers.wait_for(lambda: _committed_steps(work), 300, "a checkpoint in the bucket")
    fake_gcloud.preempt(cloud.state, "dmae-test")  # SIGTERM: the run saves and exits
    with open(log) as f:
        first = f.read()
    saved = _committed_steps(work)[-1]
    assert 3 <= saved < 40 and max(helpers.losses(first)) == saved, first[-2000:]

    out = cloud.launch(*command)  # the same command
    assert "TPU dmae-test is PREEMPTED: delete, create again" in out
    assert f"the run resumes from its newest checkpoint in {work}" in out
    log = os.path.join(cloud.worker(0), "dmae_runs", "digits.log")  # a new VM's disk
    helpers.wait_for(lambda: os.path.exists(log) and "step 40/40" in open(log).read(), 300,
                     "the resumed run to finish")
    with open(log) as f:
        second = f.read()
    assert f"resumed from step {saved} of 40" in second
    assert min(helpers.losses(second)) == saved + 1
    helpers.wait_for(lambda: not fake_gcloud._processes_under(cloud.worker(0)), 120,
                     "the run to exit")
    assert _committed_steps(work)[-1] == 40


def test_gpu_script_needs_a_gpu_build_and_installs_nothing(tmp_path):
    out = subprocess.run(
        ["bash", "launch/gpu.sh", "configs/pretrain_digits.py", str(tmp_path)],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=120)
    assert out.returncode == 1
    assert "JAX sees no GPU" in out.stderr and "pip install" in out.stderr
    with open(os.path.join(ROOT, "launch", "gpu.sh")) as f:
        body = [line for line in f if not line.lstrip().startswith(("#", "echo"))]
    assert not any("pip install" in line for line in body)
