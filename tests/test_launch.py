"""Launch scripts: the TPU script's dry run prints every command, overrides reach the workers
intact; the GPU script installs nothing and stops without a GPU build of JAX."""

import os
import shlex
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDE = '--config.checkpoints=("gs://b/ft 025","gs://b/ft_050")'


def _dry_run(**env) -> list[list[str]]:
    """The commands `tpu_pod.sh --dry-run` prints, each split as the local shell would."""
    full = dict(os.environ, ZONE="us-central2-b", TPU="dmae-test", BUCKET="gs://b", **env)
    out = subprocess.run(
        ["bash", "launch/tpu_pod.sh", "--dry-run", "configs/cascade.py", "casc", OVERRIDE,
         "--config.n=100"],
        cwd=ROOT, env=full, capture_output=True, text=True, timeout=30, check=True).stdout
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _remote(command: list[str]) -> str:
    return command[command.index("--command") + 1]


def test_tpu_dry_run_queued_spot_and_quoted_overrides():
    commands = _dry_run(QUEUED="1", SPOT="1", TYPE="v5p-128")
    create = commands[0]
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--spot" in create and "v5p-128" in create
    assert create[create.index("--runtime-version") + 1] == "v2-alpha-tpuv5"
    assert not any("git" in c and "clone" in c for c in commands)  # this checkout, copied
    assert any(c[:2] == ["git", "-C"] and "archive" in c for c in commands)
    setup = _remote(commands[-2])
    assert "uv venv" in setup and "--python 3.11" in setup
    # The run: detached, logged, and the remote shell sees each argument as typed here.
    run = _remote(commands[-1])
    assert "nohup setsid" in run and "> ~/dmae_runs/casc.log 2>&1" in run
    argv = shlex.split(run.split("dmae_jax.main", 1)[1].split(">", 1)[0])
    assert argv == ["--config=configs/cascade.py", "--workdir=gs://b/runs/casc",
                    "--config.data.data_dir=gs://b/tfds", OVERRIDE, "--config.n=100"]


def test_tpu_dry_run_direct_create():
    commands = _dry_run()
    assert commands[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert "--spot" not in commands[0]
    assert commands[0][commands[0].index("--version") + 1] == "tpu-ubuntu2204-base"


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
