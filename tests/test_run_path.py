"""The run path: lock first, check second, write records last; a refused run changes nothing.

Real processes: a run A takes its lock and is stopped (SIGSTOP) while it holds it, so a run B
started meanwhile meets it exactly as it would meet a run that is compiling or certifying.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests import helpers

CERTIFY = "configs/certify.py:dataset=digits"


@pytest.fixture(scope="module")
def tiny_classifiers(tmp_path_factory):
    return helpers.tiny_digits_classifiers(tmp_path_factory.mktemp("run_path"), (0.25,))


def _snapshot(paths) -> dict[str, bytes | None]:
    return {p: (open(p, "rb").read() if os.path.exists(p) else None) for p in paths}


def _start(cmd) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=helpers.REPO, env=helpers.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _held_by(lock_file: str, proc: subprocess.Popen) -> bool:
    try:
        return open(lock_file).read().startswith(f"pid {proc.pid} ")
    except FileNotFoundError:
        return False


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_a_refused_certification_leaves_the_running_one_its_records_and_rows(
        tmp_path, tiny_classifiers):
    data_dir, exports_at = tiny_classifiers
    work = str(tmp_path / "cert")
    log = os.path.join(work, "certify_sigma_0.25.tsv")
    records = [log, log + ".identity.json", log + ".config.json"]

    def command(n: int) -> list[str]:
        return helpers.main_command(
            CERTIFY, work, f"--config.n={n}", "--config.n0=10", "--config.max=12",
            "--config.batch_size=100", f"--config.checkpoint={exports_at[0.25]}",
            f"--config.data.data_dir={data_dir}")

    a = _start(command(200))
    try:
        # A holds the log's lock once it has recorded its identity; stopped there it is a run
        # that is compiling or certifying.
        helpers.wait_for(lambda: _held_by(log + ".lock", a)
                         and os.path.exists(log + ".identity.json"), 600, "A's records", a)
        a.send_signal(signal.SIGSTOP)
        before = _snapshot(records)
        assert json.loads(before[log + ".identity.json"])["identity"]["n"] == 200
        b = helpers.run(command(300), check=False)
        assert f"{log} is being written by another certification run (pid {a.pid} " \
            in _one_error_line(b)
        assert _snapshot(records) == before, "the refused run wrote A's records or rows"
    finally:
        a.send_signal(signal.SIGCONT)
    out, err = a.communicate(timeout=900)
    assert a.returncode == 0, err[-3000:]

    finished = _snapshot(records)
    assert json.loads(finished[log + ".config.json"])["n"] == 200
    rerun = helpers.run(command(200))  # A's own command resumes: nothing left to certify
    assert "Traceback" not in rerun.stderr
    other = helpers.run(command(300), check=False)
    assert "holds rows certified with n = 200, but this run has n = 300" in _one_error_line(other)
    assert _snapshot(records) == finished
    report = helpers.run([sys.executable, "-m", "dmae_jax.report", log, "--radii", "0"])
    assert "n=200" in report.stdout and "n=300" not in report.stdout


def test_a_refused_training_run_leaves_the_workdir_config_as_it_was(tmp_path):
    data_dir, work = str(tmp_path / "tfds"), str(tmp_path / "w")
    config_json = os.path.join(work, "config.json")

    def command(sigma: float, steps: int) -> list[str]:
        return helpers.main_command(
            "configs/pretrain_digits.py", work, f"--config.sigma={sigma}",
            f"--config.total_steps={steps}", "--config.ckpt_every_steps=2",
            "--config.log_every_steps=2", "--config.eval_every_steps=0",
            "--config.batch_size=16", f"--config.data.data_dir={data_dir}")

    a = _start(command(0.25, 4))
    try:
        helpers.wait_for(lambda: _held_by(os.path.join(work, "train.lock"), a)
                         and os.path.exists(config_json), 600, "A's config record", a)
        a.send_signal(signal.SIGSTOP)
        before = _snapshot([config_json])
        busy = helpers.run(command(0.5, 4), check=False)
        assert f"workdir {work} is in use by another training run (pid {a.pid} " \
            in _one_error_line(busy)
        assert _snapshot([config_json]) == before
    finally:
        a.send_signal(signal.SIGCONT)
    _, err = a.communicate(timeout=900)
    assert a.returncode == 0, err[-3000:]

    other = helpers.run(command(0.5, 6), check=False)  # A's checkpoints, another sigma
    assert "was written for a different configuration: sigma = 0.25 there, 0.5 here" \
        in _one_error_line(other)
    assert json.loads(_snapshot([config_json])[config_json])["sigma"] == 0.25
