"""Object storage as the workdir and data_dir: every guarantee, against a real GCS emulator.

The emulator (fake-gcs-server, tests/gcs_emulator.py) is started by this module; runs are
real `python -m dmae_jax.main` processes pointed at it by the environment alone, as a pod's
workers are pointed at the bucket by their credentials.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from dmae_jax import storage
from dmae_jax.errors import LockError
from tests import helpers
from tests.gcs_emulator import gcs  # noqa: F401 (the module's emulator fixture)

PRETRAIN = "configs/pretrain_digits.py"
CERTIFY = "configs/certify.py:dataset=digits,sigma=0.25"


def _env(emulator) -> dict[str, str]:
    return helpers.env(**emulator.env)


def _run(emulator, cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=helpers.REPO, env=_env(emulator), capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}"
                             f"\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def _start(emulator, cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=helpers.REPO, env=_env(emulator), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def data_dir(gcs):  # noqa: F811
    """digits (16 px) prepared straight into the bucket (locally, then uploaded)."""
    from dmae_jax.data import datasets

    path = f"{gcs.root}/tfds"
    datasets.load_source("digits", "train", data_dir=path, image_size=16)
    return path


def _pretrain_args(data_dir: str) -> list[str]:
    return [f"--config.data.data_dir={data_dir}", "--config.total_steps=6",
            "--config.log_every_steps=1", "--config.ckpt_every_steps=2",
            "--config.eval_every_steps=6", "--config.batch_size=16"]


@pytest.fixture(scope="module")
def pretrained(gcs, data_dir):  # noqa: F811
    """An uninterrupted pretraining run on a gs:// workdir: (workdir, stdout)."""
    work = f"{gcs.root}/pretrain_reference"
    out = _run(gcs, helpers.main_command(PRETRAIN, work, *_pretrain_args(data_dir))).stdout
    return work, out


def _committed_steps(workdir: str) -> list[int]:
    """Checkpoint steps Orbax has finished on gs:// (their commit_success.txt is there)."""
    directory = f"{workdir}/checkpoints"
    return [int(d) for d in storage.listdir(directory)
            if d.isdigit() and storage.exists(f"{directory}/{d}/commit_success.txt")]


def _export(workdir: str):
    import jax

    from dmae_jax import exports

    params, meta = exports.load(f"{workdir}/export")
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)]), meta


def test_pretraining_on_gcs_killed_resumes_bit_identically_and_a_second_trainer_is_refused(
        gcs, data_dir, pretrained, monkeypatch):  # noqa: F811
    reference, ref_out = pretrained
    # Every process here compiles afresh, as a resumed run on a user's machine does: the
    # exports must still be bit-identical (conftest.py's cache would hand them the
    # reference's compiled step).
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "false")
    for name in ("config.json", "events.out.tfevents.dmae_jax",
                 "reconstructions/step_000006.png", "export/meta.json"):
        assert storage.exists(f"{reference}/{name}"), name
    from dmae_jax import metrics

    events = storage.read_bytes(f"{reference}/events.out.tfevents.dmae_jax")
    assert metrics.valid_prefix_length(events) == len(events) > 0

    work = f"{gcs.root}/pretrain_interrupted"
    cmd = helpers.main_command(PRETRAIN, work, *_pretrain_args(data_dir))
    first = _start(gcs, cmd)
    helpers.wait_for(lambda: storage.exists(f"{work}/config.json"), 300, "the lock", first)
    # A second trainer on the same workdir: one line, exit 2, before it loads anything.
    second = _run(gcs, cmd, check=False)
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.strip().splitlines() == [
        line for line in second.stderr.strip().splitlines() if line.startswith("error: ")]
    assert f"error: workdir {work} is in use by another training run (pid {first.pid} " \
        in second.stderr
    assert json.loads(storage.read_text(f"{work}/train.lock"))["pid"] == first.pid

    helpers.wait_for(lambda: _committed_steps(work), 300, "a checkpoint in the bucket", first)
    first.kill()
    first.wait()
    killed_at = max(_committed_steps(work))
    assert killed_at < 6, "the run finished before it could be killed"

    out = _run(gcs, cmd).stdout  # takes over the lock of the killed run at once
    assert f"resumed from step {killed_at} of 6" in out
    assert min(helpers.losses(out)) == killed_at + 1
    ref_losses, got = helpers.losses(ref_out), helpers.losses(out)
    assert {s: got[s] for s in got} == {s: ref_losses[s] for s in got}
    np.testing.assert_array_equal(_export(work)[0], _export(reference)[0])
    assert json.loads(storage.read_text(f"{work}/train.lock"))["released"]


def test_finetuning_starts_from_a_gcs_export_and_exports_to_gcs(gcs, data_dir, pretrained):  # noqa: F811
    work = f"{gcs.root}/finetune"
    args = [f"--config.data.data_dir={data_dir}", f"--config.init_from={pretrained[0]}/export",
            "--config.total_steps=2", "--config.log_every_steps=1",
            "--config.ckpt_every_steps=2", "--config.eval_every_steps=0",
            "--config.batch_size=16"]
    out = _run(gcs, helpers.main_command("configs/finetune_digits.py:sigma=0.25", work, *args))
    assert sorted(helpers.losses(out.stdout)) == [1, 2]
    _, meta = _export(work)
    assert meta["kind"] == "classifier"
    assert json.loads(storage.read_text(f"{work}/config.json"))["init_from"] == \
        f"{pretrained[0]}/export"


def _classifier_export(path: str) -> str:
    from flax import nnx

    from dmae_jax import defaults, exports
    from dmae_jax.models import create_classifier

    model_cfg = defaults.model("mu", img_size=16, patch_size=4)
    model = create_classifier(model_cfg, 10, rngs=nnx.Rngs(0))
    exports.save(path, nnx.state(model, nnx.Param).to_pure_dict(),
                 {"kind": "classifier", "model": model_cfg.to_dict(), "num_classes": 10,
                  "sigma": 0.25})
    return path


def _rows(data: bytes) -> list[str]:
    return data.decode().splitlines()[1:]


def _without_time(line: str) -> list[str]:
    fields = line.split("\t")
    return fields[:5] + fields[6:]


def test_certification_into_gcs_killed_resumes_with_byte_identical_rows_and_report_reads_it(
        gcs, data_dir, capsys):  # noqa: F811
    export = _classifier_export(f"{gcs.root}/classifier/export")
    args = [f"--config.checkpoint={export}", f"--config.data.data_dir={data_dir}",
            # Small batches: each row takes many dispatches, so the run outlasts the log's
            # 2 s upload interval and the kill lands mid-run also on idle cores.
            "--config.n0=20", "--config.n=400", "--config.max=60", "--config.batch_size=20"]
    reference = f"{gcs.root}/certify_reference"
    _run(gcs, helpers.main_command(CERTIFY, reference, *args))
    log_name = "certify_sigma_0.25.tsv"
    ref_rows = _rows(storage.read_bytes(f"{reference}/{log_name}"))
    assert len(ref_rows) == 30

    work = f"{gcs.root}/certify_interrupted"
    log = f"{work}/{log_name}"
    cmd = helpers.main_command(CERTIFY, work, *args)
    proc = _start(gcs, cmd)

    def some_rows_uploaded():
        return storage.exists(log) and len(_rows(storage.read_bytes(log))) >= 3

    helpers.wait_for(some_rows_uploaded, 300, "rows in the bucket", proc)
    proc.kill()
    proc.wait()
    at_kill = _rows(storage.read_bytes(log))
    assert 3 <= len(at_kill) < 30, "the run finished before it could be killed"
    assert storage.read_bytes(log).endswith(b"\n"), "a torn row reached the bucket"

    _run(gcs, cmd)
    final = _rows(storage.read_bytes(log))
    assert final[:len(at_kill)] == at_kill  # uploaded rows are never rewritten: same bytes
    assert [_without_time(r) for r in final] == [_without_time(r) for r in ref_rows]
    assert storage.exists(f"{log}.identity.json") and storage.exists(f"{log}.config.json")

    from dmae_jax import report

    outputs = {kind: f"{gcs.root}/report/certified.{kind}" for kind in ("json", "csv", "png")}
    assert report.main([log, f"{reference}/{log_name}", "--labels=resumed,reference",
                        "--json", outputs["json"], "--csv", outputs["csv"],
                        "--plot", outputs["png"]]) == 0
    table = capsys.readouterr().out
    assert "| resumed |" in table and "| reference |" in table
    records = json.loads(storage.read_text(outputs["json"]))["logs"]
    assert records[0]["certified_accuracy"] == records[1]["certified_accuracy"]
    assert storage.read_bytes(outputs["png"]).startswith(b"\x89PNG")
    assert storage.read_text(outputs["csv"]).startswith("log,images,abstain,")


def test_data_dir_on_gcs_is_read_by_array_record_and_grain(gcs, data_dir):  # noqa: F811
    from dmae_jax.data import datasets, digits, pipeline

    builder = digits.builder(16, data_dir)
    assert builder.is_prepared() and os.fspath(builder.data_dir).startswith("gs://")
    for name in storage.TFDS_COMMIT_FILES:
        assert storage.exists(f"{data_dir}/digits/16px/1.0.0/{name}")
    # The on-disk records, not the in-memory copy load_source makes of small digits.
    records = datasets.ImageLabelSource(builder.as_data_source(split="test"), "digits", "test")
    assert len(records) == 296 and records[5]["image"].shape == (16, 16, 3)
    batch = next(iter(pipeline.train_iterator(
        records, global_batch_size=8, seed=0, augment="none", image_size=16,
        process_index=0, process_count=1, worker_count=0)))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].shape == (8,)


# ------------------------------------------------------------------ the lock object


def test_lock_object_refuses_a_live_holder_takes_over_a_dead_or_expired_one(gcs):  # noqa: F811
    work = f"{gcs.root}/locks"
    lock = storage.WorkdirLock(work)
    with pytest.raises(LockError, match=rf"workdir {work} is in use .*pid {os.getpid()} "):
        storage.WorkdirLock(work)  # not nested, even in the same process
    lock.release()
    record = json.loads(storage.read_text(f"{work}/train.lock"))
    assert record["released"] and record["pid"] == os.getpid()

    # Its holder was killed on this machine: taken over at once.
    code = (f"import os; from dmae_jax import storage; storage.WorkdirLock({work!r}); "
            "os._exit(0)")
    subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, env=_env(gcs), check=True)
    storage.WorkdirLock(work).release()

    # A live-looking holder on another machine keeps it until its lease runs out.
    record = json.loads(storage.read_text(f"{work}/train.lock"))
    record.update(released=False, machine="another-vm/boot/1", lease_s=1.5)
    storage.write_atomic(f"{work}/train.lock", json.dumps(record))
    with pytest.raises(LockError, match="lease renewed"):
        storage.WorkdirLock(work)
    time.sleep(2.0)
    storage.WorkdirLock(work).release()


def test_a_holder_that_lost_its_lease_stops_before_writing_more(gcs):  # noqa: F811
    work = f"{gcs.root}/lost"
    code = (f"import time; from dmae_jax import storage\n"
            f"lock = storage.WorkdirLock({work!r}, lease_s=2.0)\n"
            "print('held', flush=True)\ntime.sleep(30)\nprint('still running')")
    proc = _start(gcs, [sys.executable, "-c", code])
    helpers.wait_for(lambda: storage.exists(f"{work}/train.lock"), 120, "the lock", proc)
    # Another run takes the object over (as after an expiry it failed to notice).
    storage.write_atomic(f"{work}/train.lock", json.dumps({"holder": "someone else"}))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == storage.LOST_LEASE_EXIT, out
    assert "error: this run lost its lock" in out and "still running" not in out


def test_emulator_enforces_the_generation_preconditions_the_lock_rests_on(gcs):  # noqa: F811
    from google.api_core.exceptions import PreconditionFailed

    blob = storage._blob(f"{gcs.root}/precondition")
    blob.upload_from_string(b"first", if_generation_match=0)
    stale = blob.generation
    blob.upload_from_string(b"second", if_generation_match=stale)
    with pytest.raises(PreconditionFailed):  # a lock written without them would not fail
        storage._blob(f"{gcs.root}/precondition").upload_from_string(
            b"third", if_generation_match=stale)
    with pytest.raises(PreconditionFailed):
        storage._blob(f"{gcs.root}/precondition").upload_from_string(
            b"fourth", if_generation_match=0)
    assert storage.read_bytes(f"{gcs.root}/precondition") == b"second"


def test_a_log_on_gcs_holds_whole_rows_and_detects_a_second_writer(gcs):  # noqa: F811
    from dmae_jax.smoothing import logs

    path = f"{gcs.root}/logs/certify.tsv"
    row = dict(label=1, predict=1, radius=0.5, correct=1, time=1.0)
    with logs.CertifyLog(path) as log:
        assert storage.read_text(path) == "\t".join(logs.BASE_COLUMNS) + "\n"
        log.append(dict(row, idx=0))
    assert len(_rows(storage.read_bytes(path))) == 1
    with logs.CertifyLog(path) as log:
        assert log.done_indices() == {0}
        storage.write_atomic(path, storage.read_bytes(path) + b"7\t1\t1\t0.5\t1\t0:00:01\n")
        log.append(dict(row, idx=1))
        with pytest.raises(LockError, match="changed by another process"):
            log._remote.sync(force=True)
        log._remote.sync = lambda force=False: None  # leave the other writer's object be
    assert [r["idx"] for r in logs.read_log(path)] == [0, 7]


def test_an_unreadable_checkpoint_can_be_set_aside_on_gcs(gcs):  # noqa: F811
    # What TrainCheckpointer does with a step it cannot read: GCS has no rename (and etils'
    # rename refuses a destination "folder" that does not exist, as none do on GCS).
    step = f"{gcs.root}/aside/checkpoints/3"
    for name in ("state/manifest.ocdbt", "state/commit_success.txt", "commit_success.txt"):
        storage.write_atomic(f"{step}/{name}", name)
    storage.move_tree(step, f"{gcs.root}/aside/checkpoints_unreadable/3")
    assert storage.listdir(f"{gcs.root}/aside/checkpoints") == []
    assert storage.read_text(f"{gcs.root}/aside/checkpoints_unreadable/3/state/manifest.ocdbt") \
        == "state/manifest.ocdbt"
