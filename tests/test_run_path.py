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

    def command(n: int, data: str = data_dir) -> list[str]:
        return helpers.main_command(
            CERTIFY, work, f"--config.n={n}", "--config.n0=10", "--config.max=12",
            "--config.batch_size=100", f"--config.checkpoint={exports_at[0.25]}",
            f"--config.data.data_dir={data}")

    a = _start(command(200))
    try:
        # A holds the log's lock once it has recorded its identity; stopped there it is a run
        # that is compiling or certifying.
        helpers.wait_for(lambda: _held_by(log + ".lock", a)
                         and os.path.exists(log + ".identity.json"), 600, "A's records", a)
        a.send_signal(signal.SIGSTOP)
        before = _snapshot(records)
        assert json.loads(before[log + ".identity.json"])["identity"]["n"] == 200
        # B's data directory does not exist: had B read data before the lock, it would have
        # prepared digits there (the busy log is said before any data or model is loaded).
        unread = str(tmp_path / "tfds_of_b")
        b = helpers.run(command(300, unread), check=False)
        assert f"{log} is being written by another certification run (pid {a.pid} " \
            in _one_error_line(b)
        assert _snapshot(records) == before, "the refused run wrote A's records or rows"
        assert not os.path.exists(unread)
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


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, tiny_classifiers):
    """Inputs a user may hand a command by mistake: a log with a non-UTF-8 byte, a log whose
    identity record is not JSON, a DMAE export of another architecture than digits'."""
    from flax import nnx

    from dmae_jax import defaults, exports
    from dmae_jax.models import create_dmae

    root = tmp_path_factory.mktemp("damaged")
    header = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    bad_bytes = root / "bytes.tsv"
    bad_bytes.write_bytes(header.encode() + b"0\t1\t1\t0.5\t1\t0:00:01\xff\n")
    cert = root / "cert"
    cert.mkdir()
    log = cert / "certify_sigma_0.25.tsv"
    log.write_text(header.replace("\n", "\tsigma\tnA\tcAHat\tn\tpA_lower\tcounts"
                                        "\tabstained_early\timage\n"))
    (cert / "certify_sigma_0.25.tsv.identity.json").write_text("{not json")
    model = defaults.model("tiny", img_size=16, patch_size=4, decoder_width=64,
                           decoder_depth=1, decoder_heads=4)
    dmae = str(root / "dmae_tiny")
    exports.save(dmae, nnx.state(create_dmae(model, rngs=nnx.Rngs(0)), nnx.Param)
                 .to_pure_dict(), {"kind": "dmae", "model": model.to_dict()})
    return {"bytes": str(bad_bytes), "log": str(log), "cert": str(cert), "dmae": dmae,
            "out": str(root / "no" / "such" / "dir" / "r.json"), "dir": str(root)}


def test_every_command_reports_each_user_error_in_one_line(tmp_path, tiny_classifiers,
                                                           damaged):
    data_dir, exports_at = tiny_classifiers
    work = str(tmp_path / "w")
    main = [sys.executable, "-m", "dmae_jax.main", f"--workdir={work}"]
    report = [sys.executable, "-m", "dmae_jax.report"]
    aot = [sys.executable, "-m", "dmae_jax.aot"]
    cases = [
        (main + ["--config=configs"], "--config=configs is a directory"),
        (main + ["--config=configs/pretrain_digits.py", "config.sigma=0.5"],
         "unexpected argument 'config.sigma=0.5': flags start with '--'"),
        (main + ["--config=configs/pretrain_digits.py", "\u2014config.sigma=0.5"],
         "(U+2014), not '--'"),
        (main + ["--config=configs/pretrain_digits.py", "--config.data.image_size=100000",
                 "--config.model.img_size=100000"],
         "config.data.image_size must be an integer in [8, 512] for digits"),
        (main + ["--config=configs/finetune_digits.py", f"--config.init_from={damaged['dmae']}"],
         "is a DMAE with model.width = 192, this run's config.model.width is 128"),
        (main[:-1] + [f"--workdir={damaged['cert']}", f"--config={CERTIFY}",
                      f"--config.checkpoint={exports_at[0.25]}",
                      f"--config.data.data_dir={data_dir}"],
         ".identity.json is damaged ("),
        (report, "the following arguments are required: logs"),
        (report + [damaged["bytes"]], f"cannot read {damaged['bytes']}"),
        (report + [damaged["log"]], ".identity.json is damaged ("),
        (report + [damaged["bytes"], "--json", damaged["out"]], "does not exist"),
        (report + [damaged["bytes"], "--csv", damaged["dir"]], "is a directory"),
        (report + [damaged["bytes"], "--plot", damaged["out"]], "does not exist"),
        (report + [damaged["bytes"], "\u2014json=r.json"], "(U+2014), not '--'"),
        (report + [damaged["bytes"], "--jsn=r.json"], "unrecognized arguments: --jsn=r.json"),
        ([sys.executable, "-m", "dmae_jax.prepare"],
         "the following arguments are required: --dataset"),
        ([sys.executable, "-m", "dmae_jax.prepare", "--dataset=digits", "--image_size=100000",
          f"--data_dir={tmp_path / 'tfds'}"],
         "--image_size must be an integer in [8, 512] for digits"),
        ([sys.executable, "-m", "dmae_jax.prepare", "dataset=digits"],
         "unexpected argument 'dataset=digits': flags start with '--': --dataset=digits"),
        ([sys.executable, "-m", "dmae_jax.prepare", "--dataset=digits", "\u2013image_size=8"],
         "(U+2013), not '--'"),
        ([sys.executable, "-m", "dmae_jax.convert", "--model=base"],
         "the following arguments are required: --checkpoint, --out"),
        ([sys.executable, "-m", "dmae_jax.convert", "--model=base", "checkpoint=x.pth"],
         "unexpected argument 'checkpoint=x.pth'"),
        ([sys.executable, "-m", "dmae_jax.diffusion.convert", "--preset=digits", "stray"],
         "unexpected argument 'stray'"),
        ([sys.executable, "-m", "dmae_jax.diffusion.convert", f"--checkpoint={tmp_path}",
          "--preset=digits", f"--out={tmp_path / 'o'}"], "is a directory, not a .pt file"),
        (aot + ["--topology=v4-8"], "--config=configs/NAME.py and --topology=v4-32 are required"),
        (aot + ["--config=configs/pretrain_digits.py", "--config.sigmaa=1", "--topology=v4-8"],
         "--config.sigmaa: the config has no field 'sigmaa'"),
        (aot + ["--config=configs/pretrain_digits.py", "--topology=v4-12"],
         "--topology 'v4-12': v4 slices come in"),
        (aot + ["--config=configs/pretrain_digits.py", "--topology=v4-8", "extra"],
         "unexpected argument 'extra'"),
    ]
    procs = [_start(cmd) for cmd, _ in cases]
    for proc, (cmd, expected) in zip(procs, cases, strict=True):
        out, err = proc.communicate(timeout=600)
        line = _one_error_line(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
        assert expected in line, (cmd, line)
    assert not os.path.exists(work), "a refused run created its workdir"
    assert open(damaged["log"] + ".identity.json").read() == "{not json"


def test_preparing_a_download_without_network_stops_at_once(tmp_path, monkeypatch, capsys):
    """`prepare --dataset=cifar10` on a machine without network: one line, not a wait of
    many minutes in TFDS's download (its host is made one no route leads to)."""
    import time

    from dmae_jax import prepare

    monkeypatch.setitem(prepare.DOWNLOAD_HOSTS, "cifar10", ("192.0.2.1", 443))  # TEST-NET-1
    monkeypatch.setattr(prepare, "NETWORK_TIMEOUT_S", 2.0)
    monkeypatch.setattr(prepare, "_check_tensorflow", lambda name: None)  # the check before
    start = time.monotonic()
    with pytest.raises(SystemExit) as e:
        prepare.main(["--dataset=cifar10", f"--data_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: preparing 'cifar10' downloads it from 192.0.2.1, which "
                          "cannot be reached"), err
    assert time.monotonic() - start < 60  # a hang guard, not a speed claim


def test_a_disk_filled_during_training_is_one_line_and_keeps_the_checkpoints(tmp_path):
    """Pretraining on a 64 MiB file system (tmpfs, in a mount namespace of its own) that is
    filled up once the first checkpoint is on it: the run stops with the one line, without
    Orbax's, TensorStore's or asyncio's tracebacks, and the saved checkpoint stays."""
    import shlex

    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("mounting a small file system needs user and mount namespaces "
                    "(unshare -rm)")
    disk = tmp_path / "disk"
    disk.mkdir()
    work = f"{disk}/w"
    train = shlex.join(helpers.main_command(
        "configs/pretrain_digits.py", work, "--config.total_steps=400",
        "--config.ckpt_every_steps=2", "--config.log_every_steps=2",
        "--config.eval_every_steps=0", "--config.batch_size=16",
        f"--config.data.data_dir={tmp_path / 'tfds'}"))
    script = f"""
        mount -t tmpfs -o size=64m tmpfs {disk}
        {train} &
        run=$!
        until [ -e {work}/checkpoints/2/checksums.json ] || ! kill -0 $run 2>/dev/null; do
            sleep 0.2
        done
        dd if=/dev/zero of={disk}/filler bs=1M 2>/dev/null
        wait $run
        status=$?
        echo "checkpoints: $(ls {work}/checkpoints)"
        exit $status
    """
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=helpers.REPO,
                          env=helpers.env(), capture_output=True, text=True, timeout=900)
    line = _one_error_line(proc)
    assert line.startswith("error: cannot write to disk: ") and "rerun the same command" in line
    assert "2" in proc.stdout.split("checkpoints:")[1].split(), proc.stdout[-2000:]
