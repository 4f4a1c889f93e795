"""Run identity: a resume never mixes two runs, in certification logs or training workdirs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from dmae_jax import config as config_lib
from dmae_jax import defaults
from dmae_jax.errors import IdentityError
from dmae_jax.smoothing import logs, runner
from dmae_jax.tasks import identity
from tests import helpers


def _fake_export(path, sigma: float, content: bytes = b"weights") -> str:
    """A directory shaped like a classifier export (identity only reads its files)."""
    os.makedirs(os.path.join(path, "params"), exist_ok=True)
    with open(os.path.join(path, "params", "data"), "wb") as f:
        f.write(content)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"kind": "classifier", "sigma": sigma, "num_classes": 10}, f)
    return str(path)


def _certify_config(checkpoint: str, sigma: float = 0.25, **overrides):
    cfg = defaults.certify("digits", sigma)
    cfg.checkpoint = checkpoint
    cfg.update(overrides)
    return config_lib.resolve(cfg)


def _log_rows(log_path: str, indices) -> None:
    items = [(i, np.zeros((2, 2, 1)), 0) for i in indices]
    runner.run_certification(items, lambda idx, image, label: {"predict": 0, "radius": 0.5},
                             log_path=log_path, process_index=0, process_count=1,
                             print_fn=lambda s: None)


def _check_and_record(config, log_path: str, **kwargs) -> None:
    """What the run path does for a log: check, then record."""
    identity.record(log_path, identity.check(config, log_path, **kwargs))


def _started_log(tmp_path, config) -> str:
    log_path = str(tmp_path / "work" / config.log_name)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    _check_and_record(config, log_path, warn=lambda s: None)
    _log_rows(log_path, [0, 2, 4])
    return log_path


def test_sigma_given_by_override_certifies_into_its_own_log(tmp_path):
    first = _certify_config(_fake_export(tmp_path / "ft_025", 0.25))
    log_025 = _started_log(tmp_path, first)
    # --config.sigma=1.0 --config.checkpoint=<the sigma=1.0 export> on the same workdir:
    second = _certify_config(_fake_export(tmp_path / "ft_100", 1.0, b"other"), sigma=1.0)
    log_100 = os.path.join(os.path.dirname(log_025), second.log_name)
    assert log_100 != log_025 and second.log_name == "certify_sigma_1.0.tsv"
    _check_and_record(second, log_100, warn=pytest.fail)  # a fresh log, no warning
    assert logs.read_identity(log_100)["sigma"] == 1.0


def test_resume_with_another_n_is_an_error_naming_n(tmp_path):
    config = _certify_config(_fake_export(tmp_path / "ft", 0.25), n=200)
    log_path = _started_log(tmp_path, config)
    with pytest.raises(IdentityError) as e:
        identity.check(_certify_config(config.checkpoint, n=300), log_path)
    assert (f"{log_path} holds rows certified with n = 200, but this run has n = 300. "
            "To resume it, rerun with --config.n=200") in str(e.value)
    identity.check(_certify_config(config.checkpoint, n=200), log_path)  # same: resumes


@pytest.mark.parametrize("field, value", [
    ("alpha", 0.01), ("n0", 50), ("seed", 1), ("skip", 4), ("early_abstain", True),
    ("compute_dtype", "bfloat16"), ("log_name", "certify_sigma_0.25.tsv"),
])
def test_every_field_that_changes_the_rows_is_part_of_the_identity(tmp_path, field, value):
    config = _certify_config(_fake_export(tmp_path / "ft", 0.25))
    log_path = _started_log(tmp_path, config)
    changed = _certify_config(config.checkpoint, **{field: value})
    if field == "log_name":  # the name says where rows go, not what they are
        identity.check(changed, log_path)
        return
    with pytest.raises(IdentityError, match=f"certified with {field} = "):
        identity.check(changed, log_path)


def test_another_checkpoint_is_an_error_a_moved_one_is_not(tmp_path):
    export = _fake_export(tmp_path / "ft", 0.25)
    config = _certify_config(export)
    log_path = _started_log(tmp_path, config)
    moved = shutil.copytree(export, tmp_path / "moved")
    identity.check(_certify_config(str(moved)), log_path)  # same content: resumes
    other = _fake_export(tmp_path / "other", 0.25, b"retrained")
    with pytest.raises(IdentityError) as e:
        identity.check(_certify_config(other), log_path)
    message = str(e.value)
    assert "certified with checkpoint = 'sha256:" in message
    assert f"rerun with --config.checkpoint={export} (the export it was certified with)" in message


def test_cascade_identity_covers_sigmas_p0_and_every_checkpoint(tmp_path):
    exports = [_fake_export(tmp_path / f"ft_{s}", s, str(s).encode()) for s in (1.0, 0.5)]
    config = defaults.cascade("digits", (1.0, 0.5))
    config.checkpoints = tuple(exports)
    config = config_lib.resolve(config)
    log_path = _started_log(tmp_path, config)
    for field, value in (("p0", 0.6), ("checkpoints", tuple(reversed(exports)))):
        changed = config_lib.resolve(config)
        changed[field] = value
        with pytest.raises(IdentityError, match=f"certified with {field} = "):
            identity.check(changed, log_path, warn=lambda s: None)
    changed = config_lib.resolve(config)
    changed.sigmas = (1.0, 0.5, 0.25)
    with pytest.raises(IdentityError, match=r"rerun with --config.sigmas='\(1.0,0.5\)'"):
        identity.check(changed, log_path, warn=lambda s: None)


def test_identity_is_readable_next_to_a_cohen_compatible_log(tmp_path):
    config = _certify_config(_fake_export(tmp_path / "ft", 0.25))
    log_path = _started_log(tmp_path, config)
    assert open(log_path).readline().startswith("idx\tlabel\tpredict\tradius\tcorrect\ttime")
    recorded = logs.read_identity(log_path)
    assert recorded["task"] == "certify" and recorded["n"] == 500 and recorded["alpha"] == 0.001
    assert recorded["data.dataset"] == "digits" and recorded["data.split"] == "test"
    assert recorded["checkpoint"].startswith("sha256:")


def test_certifying_at_another_sigma_than_fine_tuned_warns_once(tmp_path):
    warnings = []
    config = _certify_config(_fake_export(tmp_path / "ft", 0.25), sigma=0.5)
    identity.check(config, str(tmp_path / "log.tsv"), warn=warnings.append)
    assert warnings == [f"warning: config.checkpoint = {config.checkpoint} was fine-tuned at "
                        "sigma = 0.25, certified here at sigma = 0.5"]
    config.denoiser = _fake_export(tmp_path / "denoiser", 0.0, b"unet")
    warnings.clear()
    identity.check(config, str(tmp_path / "log2.tsv"), warn=warnings.append)
    assert warnings == []  # denoise-and-classify certifies a clean classifier on purpose


def test_a_log_without_identity_is_adopted_with_a_warning(tmp_path):
    config = _certify_config(_fake_export(tmp_path / "ft", 0.25))
    log_path = str(tmp_path / config.log_name)
    _log_rows(log_path, [0, 2])
    warnings = []
    _check_and_record(config, log_path, warn=warnings.append)
    assert len(warnings) == 1 and "has rows but no identity record" in warnings[0]
    assert logs.read_identity(log_path) is not None


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"notes": {}}', b'{"identity": 3}',
                                     b'{"identity": {}, "x": "\xff"}'])
def test_a_damaged_identity_record_is_an_error_not_a_missing_one(tmp_path, content):
    config = _certify_config(_fake_export(tmp_path / "ft", 0.25))
    log_path = _started_log(tmp_path, config)
    with open(logs.identity_path(log_path), "wb") as f:
        f.write(content)
    with pytest.raises(IdentityError, match=r"\.identity\.json is damaged \(.*restore the file "
                                            "from a copy, or certify anew"):
        identity.check(config, log_path)
    with open(logs.identity_path(log_path), "rb") as f:
        assert f.read() == content  # never "delete it and anything resumes"


def test_warnings_go_to_stderr(tmp_path, capsys):
    config = _certify_config(_fake_export(tmp_path / "ft", 0.25), sigma=0.5)
    identity.check(config, str(tmp_path / "log.tsv"))  # the default warn
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("warning: config.checkpoint = ")


# ---------------------------------------------------------------------------------------
# Training workdirs: config fingerprint, keep_ckpts, unreadable checkpoints.
# ---------------------------------------------------------------------------------------


def _checkpointer(workdir, **fingerprint):
    from dmae_jax.checkpoints import TrainCheckpointer

    return TrainCheckpointer(str(workdir), max_to_keep=3,
                             fingerprint=fingerprint or {"model": {"depth": 2}, "sigma": 0.25})


def _state(step: int) -> dict:
    return {"w": np.arange(64, dtype=np.float32) * step, "step": np.int32(step)}


def _abstract():
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                        _state(0))


def _saved(workdir, steps=(2, 4)):
    ckpt = _checkpointer(workdir)
    for step in steps:
        ckpt.save(step, _state(step), {"position": step})
    ckpt.close()


def _state_files(workdir, step):
    root = os.path.join(workdir, "checkpoints", str(step), "state")
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files
            if os.path.basename(d) == "d"]  # the array data files


def _truncate(workdir):
    for path in _state_files(workdir, 4):
        os.truncate(path, 10)


def _garbage(workdir):
    for path in _state_files(workdir, 4):
        with open(path, "r+b") as f:
            f.write(b"\xff" * os.path.getsize(path))


def _no_metadata(workdir):
    os.remove(os.path.join(workdir, "checkpoints", "4", "state", "_METADATA"))


def _no_manifest(workdir):
    for d, _, files in os.walk(os.path.join(workdir, "checkpoints", "4", "state")):
        for f in files:
            if f == "manifest.ocdbt":
                os.remove(os.path.join(d, f))


# TensorStore may still complete reads of the unreadable step into Orbax's closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_truncate, _garbage, _no_metadata, _no_manifest])
def test_unreadable_latest_checkpoint_resumes_from_the_previous_one(tmp_path, corrupt, capsys):
    workdir = str(tmp_path)
    _saved(workdir)
    corrupt(workdir)
    ckpt = _checkpointer(workdir)
    step, state, extra = ckpt.restore(_abstract())
    assert step == 2 and int(state["step"]) == 2 and extra["position"] == 2
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"warning: checkpoint step 4 at {workdir}/checkpoints/4 is "
                              "unreadable (")
    assert warning.endswith(f"moved to {workdir}/checkpoints_unreadable/4. Resuming from "
                            "step 2, the newest intact checkpoint")
    assert "\n" not in warning and "tensorstore_spec" not in warning
    ckpt.save(4, _state(4), {"position": 4})  # training goes on through step 4 again
    ckpt.close()
    assert _checkpointer(workdir).restore(_abstract())[0] == 4


def test_a_flipped_bit_is_found_by_the_checksums_and_only_by_them(tmp_path, capsys):
    import jax

    from dmae_jax.checkpoints import CHECKSUMS

    def state(step):  # random values: stored as they are, not compressed away
        return {"w": np.random.default_rng(step).standard_normal(4096).astype(np.float32),
                "step": np.int32(step)}

    workdir = str(tmp_path)
    ckpt = _checkpointer(workdir)
    for step in (2, 4):
        ckpt.save(step, state(step), {"position": step})
    ckpt.close()
    sums = os.path.join(workdir, "checkpoints", "4", CHECKSUMS)
    assert os.path.exists(sums)
    # 8 bytes flipped in the middle of the step's largest file, where its array values are
    # stored: every file still parses.
    root = os.path.join(workdir, "checkpoints", "4", "state")
    largest = max((os.path.join(d, f) for d, _, files in os.walk(root) for f in files),
                  key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        data = f.read(8)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                            state(0))
    # The control: without its recorded checksums the changed step restores as if intact,
    # as another model (with a warning that it is unverified).
    os.rename(sums, str(tmp_path / "sums"))
    step, restored, _ = _checkpointer(workdir).restore(abstract)
    assert step == 4 and not np.array_equal(np.asarray(restored["w"]), state(4)["w"])
    assert "has no checksums" in capsys.readouterr().err
    os.rename(str(tmp_path / "sums"), sums)
    step, restored, _ = _checkpointer(workdir).restore(abstract)
    assert step == 2 and np.array_equal(np.asarray(restored["w"]), state(2)["w"])
    warning = capsys.readouterr().err
    assert "bytes changed since it was saved: state/" in warning and "\n" not in warning.strip()
    assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", "4"))


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    from dmae_jax.errors import CheckpointError

    _saved(str(tmp_path), steps=(4,))
    _no_metadata(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* can be read \(step 4: "
                       r"CorruptCheckpointError: missing since it was saved: state/_METADATA\)"
                       r"\. Not starting from scratch"):
        _checkpointer(tmp_path).restore(_abstract())


def test_checkpoint_of_another_config_names_the_fields_that_differ(tmp_path):
    from dmae_jax.errors import CheckpointError

    _saved(str(tmp_path))
    other = _checkpointer(tmp_path, model={"depth": 1}, sigma=0.25)
    with pytest.raises(CheckpointError) as e:
        other.restore(_abstract())
    assert str(e.value) == (
        f"the checkpoint at {tmp_path}/checkpoints/4 was written for a different "
        "configuration: model.depth = 2 there, 1 here. Rerun with the checkpoint's values, "
        "or use another --workdir")


def test_training_fingerprint_holds_every_field_that_changes_the_computation():
    from dmae_jax.train import common

    base = common.fingerprint(defaults.digits_pretrain())
    assert base["sigma"] == 0.25 and base["mask_ratio"] == 0.5 and "model" in base
    for field, value in [("sigma", 0.5), ("mask_ratio", 0.75), ("optim.base_lr", 1e-3),
                         ("seed", 1), ("data.augment", "rrc_flip")]:
        cfg = defaults.digits_pretrain()
        *parents, leaf = field.split(".")
        node = cfg
        for name in parents:
            node = node[name]
        node[leaf] = value
        assert common.fingerprint(cfg) != base, field
    # A resumed run may train longer, log, save and evaluate at other periods.
    cfg = defaults.digits_pretrain()
    cfg.update(num_epochs=99, total_steps=7, log_every_steps=3, ckpt_every_steps=5,
               eval_every_steps=9, keep_ckpts=1)
    cfg.data.worker_count = 4
    assert common.fingerprint(cfg) == base


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_ckpts_below_one_is_rejected(keep):
    from dmae_jax import checks

    config = defaults.digits_pretrain()
    config.keep_ckpts = keep
    with pytest.raises(checks.ConfigError,
                       match=f"config.keep_ckpts must be an integer >= 1, got {keep}"):
        checks.training_loop(config)


def test_report_shows_each_logs_identity(tmp_path, capsys):
    from dmae_jax import report

    config = _certify_config(_fake_export(tmp_path / "ft", 0.25))
    log_path = _started_log(tmp_path, config)
    report.main([log_path, "--radii", "0"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "checkpoint=sha256:" in line)
    assert "alpha=0.001" in line and "n=500" in line and "sigma=0.25" in line
    assert "checkpoint=sha256:" in line and "data.dataset=digits" in line


# ---------------------------------------------------------------------------------------
# End to end: certify, then resume under another identity.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_classifiers(tmp_path_factory):
    """Two randomly initialised 16x16 digits classifiers, exported "at" sigma 0.25 and 1.0."""
    return helpers.tiny_digits_classifiers(tmp_path_factory.mktemp("identity_e2e"), (0.25, 1.0))


def test_certify_resume_under_another_identity_is_refused(tmp_path, tiny_classifiers):
    from dmae_jax.tasks import execute

    data_dir, exports_at = tiny_classifiers

    def config(**overrides):
        cfg = defaults.certify("digits", 0.25, n=20)
        cfg.update(n0=10, max=6, batch_size=20, checkpoint=exports_at[0.25])
        cfg.data.data_dir = data_dir
        cfg.update(overrides)
        return cfg

    work = str(tmp_path / "cert")
    execute.run(config(), work)
    first = os.path.join(work, "certify_sigma_0.25.tsv")
    assert [r["idx"] for r in logs.read_log(first)] == [0, 2, 4]
    assert json.load(open(first + ".config.json"))["n"] == 20

    # --config.sigma=1.0 --config.checkpoint=<the sigma=1.0 export>: its own log, not a resume.
    execute.run(config(sigma=1.0, checkpoint=exports_at[1.0]), work)
    second = os.path.join(work, "certify_sigma_1.0.tsv")
    assert len(logs.read_log(second)) == 3 and len(logs.read_log(first)) == 3

    with pytest.raises(IdentityError, match="certified with n = 20, but this run has n = 30"):
        execute.run(config(n=30, max=12), work)
    with pytest.raises(IdentityError, match="certified with checkpoint = 'sha256:"):
        execute.run(config(checkpoint=exports_at[1.0], max=12), work)
    assert len(logs.read_log(first)) == 3  # nothing was appended by the refused runs
