"""Specification of certification logs and the resumable, multi-process certification runner."""

import os

import jax
import numpy as np
import pytest

from dmae_jax import smoothing

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


def row(idx, label=3, predict=3, radius=0.4996, **extra):
    return dict(idx=idx, label=label, predict=predict, radius=radius,
                correct=int(predict == label), time=1.5, **extra)


def test_new_log_has_cohen_header_then_extra_columns(tmp_path):
    path = tmp_path / "log.tsv"
    with smoothing.CertifyLog(path, ["sigma", "counts"]) as log:
        log.append(row(0, sigma=0.25, counts=np.array([3, 97])))
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER + "\tsigma\tcounts"
    assert lines[1] == "0\t3\t3\t0.4996\t1\t0:00:01.500000\t0.25\t3,97"


def test_radius_is_written_with_full_precision(tmp_path):
    path = tmp_path / "log.tsv"
    radius = 0.1 + 0.2  # 0.30000000000000004: any rounding would show
    with smoothing.CertifyLog(path) as log:
        log.append(row(0, radius=np.float64(radius)))
    assert smoothing.read_log(path)[0]["radius"] == radius


def test_resume_truncates_a_torn_last_line_and_keeps_complete_rows(tmp_path):
    path = tmp_path / "log.tsv"
    with smoothing.CertifyLog(path) as log:
        log.append(row(0))
        log.append(row(1))
    with open(path, "a") as f:  # a run killed in the middle of writing row 2
        f.write("2\t3\t3\t0.12")
    with smoothing.CertifyLog(path) as log:
        assert log.done_indices() == {0, 1}
        log.append(row(2))
    assert [r["idx"] for r in smoothing.read_log(path)] == [0, 1, 2]
    assert path.read_text().count("\n") == 4


def test_torn_header_is_rewritten(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("idx\tlab")
    with smoothing.CertifyLog(path) as log:
        assert log.done_indices() == set()
    assert path.read_text() == HEADER + "\n"


def test_header_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "log.tsv"
    smoothing.CertifyLog(path, ["sigma"]).close()
    with pytest.raises(ValueError, match="resume with the same extra_columns"):
        smoothing.CertifyLog(path, ["stage"])


def test_an_index_is_never_written_twice(tmp_path):
    path = tmp_path / "log.tsv"
    with smoothing.CertifyLog(path) as log:
        log.append(row(7))
        with pytest.raises(ValueError, match="idx 7 is already in"):
            log.append(row(7))
    with smoothing.CertifyLog(path) as log, pytest.raises(ValueError, match="idx 7"):
        log.append(row(7))


def test_rows_must_have_exactly_the_columns(tmp_path):
    with smoothing.CertifyLog(tmp_path / "log.tsv", ["sigma"]) as log:
        with pytest.raises(ValueError, match=r"missing \['sigma'\], unexpected \['stage'\]"):
            log.append(row(0, stage=1))


def test_a_log_is_written_by_one_process_at_a_time(tmp_path):
    path = tmp_path / "log.tsv"
    with smoothing.CertifyLog(path), pytest.raises(RuntimeError, match="another process"):
        smoothing.CertifyLog(path)


def test_reads_cohen_certify_logs(tmp_path):
    # Written exactly as locuslab/smoothing code/certify.py formats its rows.
    path = tmp_path / "cohen.tsv"
    rows = [(0, 3, 3, 0.97812, 1, "0:02:32.717239"), (20, 8, -1, 0.0, 0, "0:02:31.1"),
            (40, 8, 1, 1.9612, 0, "1 day, 0:00:01.5")]
    with open(path, "w") as f:
        print(HEADER, file=f)
        for r in rows:
            print("{}\t{}\t{}\t{:.3}\t{}\t{}".format(*r), file=f)
    parsed = smoothing.read_log(path)
    assert [(r["idx"], r["label"], r["predict"], r["radius"], r["correct"]) for r in parsed] == [
        (0, 3, 3, 0.978, 1), (20, 8, -1, 0.0, 0), (40, 8, 1, 1.96, 0)
    ]
    assert [r["time"] for r in parsed] == [152.717239, 151.1, 86401.5]


def test_reads_carlini_logs_whose_correct_column_is_cumulative(tmp_path):
    # ethz-spylab/diffusion_denoised_smoothing writes the running count of correct images.
    path = tmp_path / "dds.tsv"
    path.write_text(HEADER + "\n0\t1\t1\t0.5\t1\t0:00:01\n1\t2\t0\t0.3\t1\t0:00:01\n"
                    "2\t2\t2\t0.25\t2\t0:00:01\n")
    assert [r["correct"] for r in smoothing.read_log(path)] == [1, 0, 1]


def test_inconsistent_correct_column_is_an_error(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text(HEADER + "\n0\t1\t1\t0.5\t0\t0:00:01\n")
    with pytest.raises(ValueError, match="neither int\\(predict == label\\)"):
        smoothing.read_log(path)


def test_read_log_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text(HEADER + "\n0\t1\t1\t0.5\t1\t0:00:01\n1\t2\t2\t0.")
    assert len(smoothing.read_log(path)) == 1


# --- The runner -------------------------------------------------------------------------------


def fake_items(count, skip=50):
    """Strided dataset indices (every 50th image, as the ImageNet protocol), loaded lazily."""
    return [(k * skip, lambda: np.full((2, 2, 1), 0.5, np.float32), lambda k=k: k % 3)
            for k in range(count)]


def fake_certify(idx, image, label):
    return {"predict": idx % 2, "radius": idx / 1000, "stage": idx % 4}


def strip_time(path):
    return [{k: v for k, v in r.items() if k != "time"} for r in smoothing.read_log(path)]


def test_run_resumes_without_losing_or_duplicating_rows(tmp_path):
    path = str(tmp_path / "log.tsv")
    calls = []

    def crashes_at_idx_200(idx, image, label):
        if idx == 200:
            raise KeyboardInterrupt
        calls.append(idx)
        return fake_certify(idx, image, label)

    with pytest.raises(KeyboardInterrupt):
        smoothing.run_certification(fake_items(6), crashes_at_idx_200, log_path=path,
                                    extra_columns=["stage"], print_fn=lambda s: None)
    with open(path, "a") as f:
        f.write("200\t2\t0\t0.2")  # and the kill tore a line
    messages = []
    smoothing.run_certification(fake_items(6), fake_certify, log_path=path,
                                extra_columns=["stage"], print_fn=messages.append)
    assert calls == [0, 50, 100, 150]
    assert [r["idx"] for r in smoothing.read_log(path)] == [0, 50, 100, 150, 200, 250]
    assert strip_time(path)[4] == {"idx": 200, "label": 1, "predict": 0, "radius": 0.2,
                                   "correct": 0, "stage": 0}
    assert messages[-1].startswith(f"{path}: 6/6 images (2 this run)")
    assert "certified correct" in messages[-1] and "ETA" in messages[-1]


def test_processes_share_strided_indices_evenly_and_merge_sorted(tmp_path):
    single = str(tmp_path / "single.tsv")
    merged = str(tmp_path / "merged.tsv")
    items = fake_items(10)
    smoothing.run_certification(items, fake_certify, log_path=single, extra_columns=["stage"],
                                process_index=0, process_count=1, print_fn=lambda s: None)
    shares = []
    for i in range(4):
        shares.append(smoothing.remaining_indices([idx for idx, _, _ in items], log_path=merged,
                                                  process_index=i, process_count=4))
        written = smoothing.run_certification(
            items, fake_certify, log_path=merged, extra_columns=["stage"], process_index=i,
            process_count=4, print_fn=lambda s: None,
        )
        assert written == smoothing.part_path(merged, i, 4)
    # Every 50th index is 0 or 2 modulo 4: splitting by position keeps the shares even.
    assert [len(s) for s in shares] == [3, 3, 2, 2]
    assert smoothing.merge_logs(merged, 4) == 10
    assert not [p for p in os.listdir(tmp_path) if ".part-" in p]
    assert strip_time(merged) == strip_time(single)
    assert smoothing.merge_logs(merged) == 10  # idempotent


def test_resume_with_another_process_count_skips_rows_of_every_part(tmp_path):
    path = str(tmp_path / "log.tsv")
    items = fake_items(6)
    smoothing.run_certification(items, fake_certify, log_path=path, extra_columns=["stage"],
                                process_index=1, process_count=2, print_fn=lambda s: None)
    calls = []
    smoothing.run_certification(items, lambda *a: calls.append(a[0]) or fake_certify(*a),
                                log_path=path, extra_columns=["stage"], process_index=0,
                                process_count=1, print_fn=lambda s: None)
    assert calls == [0, 100, 200]
    assert smoothing.merge_logs(path) == 6


def test_merge_refuses_conflicting_rows_and_missing_parts(tmp_path):
    path = str(tmp_path / "log.tsv")
    for i, radius in enumerate((0.5, 0.7)):
        with smoothing.CertifyLog(smoothing.part_path(path, i, 3)) as log:
            log.append(row(0, radius=radius))
    with pytest.raises(ValueError, match="part files missing"):
        smoothing.merge_logs(path, 3)
    with pytest.raises(ValueError, match="idx 0 has different rows"):
        smoothing.merge_logs(path)


def test_same_rng_gives_the_same_log(tmp_path):
    logits = lambda images: images.reshape(images.shape[0], 4)
    items = [(idx, np.linspace(0.1, 0.4, 4, dtype=np.float32).reshape(2, 2, 1), 3)
             for idx in (0, 1, 2)]
    certify_one = smoothing.make_certify_one(
        logits, smoothing.Settings(sigma=0.25, n0=16, n=200, alpha=0.001, batch_size=200,
                                   num_classes=4), rng=jax.random.key(0))
    logs = []
    for name in ("a.tsv", "b.tsv"):
        path = str(tmp_path / name)
        smoothing.run_certification(items, certify_one, log_path=path,
                                    extra_columns=smoothing.LOG_COLUMNS, print_fn=lambda s: None)
        logs.append(strip_time(path))
    assert logs[0] == logs[1]
    first = logs[0][0]
    assert parse_counts_total(first["counts_selection"]) == 16
    assert smoothing.parse_counts(first["counts_estimation"], 4)[first["cAHat"]] == first["nA"]
    pA_lower = smoothing.lower_confidence_bound(first["nA"], 200, 0.001)
    assert first["pA_lower"] == pA_lower
    expected = ((first["cAHat"], smoothing.radius_from_bound(pA_lower, 0.25))
                if pA_lower >= 0.5 else (-1, 0.0))
    assert (first["predict"], first["radius"]) == expected


def parse_counts_total(text):
    return int(smoothing.parse_counts(text, 4).sum())


def test_count_fields_round_trip_dense_and_sparse():
    counts = np.array([0, 9950, 0, 50])
    assert smoothing.format_sparse_counts(counts) == "1:9950,3:50"
    np.testing.assert_array_equal(smoothing.parse_counts("1:9950,3:50", 4), counts)
    np.testing.assert_array_equal(smoothing.parse_counts("0,9950,0,50"), counts)
    np.testing.assert_array_equal(smoothing.parse_counts("-", 4), np.zeros(4))


def test_early_abstain_rows_record_it(tmp_path):
    constant = lambda images: jax.numpy.tile(jax.numpy.array([0.0, 1.0]), (images.shape[0], 1))
    certify_one = smoothing.make_certify_one(
        constant, smoothing.Settings(sigma=0.25, n0=16, n=200, alpha=0.001, batch_size=200,
                                     num_classes=2), rng=jax.random.key(0), early_abstain=True)
    path = str(tmp_path / "log.tsv")
    image = np.zeros((2, 2, 1), np.float32)
    smoothing.run_certification([(0, image, 0), (1, image, 1)], certify_one, log_path=path,
                                extra_columns=smoothing.LOG_COLUMNS, print_fn=lambda s: None)
    wrong, right = smoothing.read_log(path)
    assert (wrong["predict"], wrong["abstained_early"], wrong["n_drawn"]) == (-1, 1, 16)
    assert (right["predict"], right["abstained_early"], right["n_drawn"]) == (1, 0, 216)


# ---------------------------------------------------------------------------------------
# Checked writes, malformed rows, identity.
# ---------------------------------------------------------------------------------------


def test_short_writes_are_continued_so_every_row_is_whole(tmp_path, monkeypatch):
    path = tmp_path / "log.tsv"
    real_write = os.write

    def short_write(fd, data):  # the kernel may write fewer bytes than asked
        return real_write(fd, bytes(data[:7]))

    with smoothing.CertifyLog(path) as log:
        monkeypatch.setattr(os, "write", short_write)
        for i in range(3):
            log.append(row(i))
    monkeypatch.undo()
    assert [r["idx"] for r in smoothing.read_log(path)] == [0, 1, 2]


def test_a_full_disk_never_tears_a_middle_row(tmp_path, monkeypatch):
    from dmae_jax.errors import DiskError

    path = tmp_path / "log.tsv"
    real_write = os.write
    calls = {"n": 0}

    def full_disk(fd, data):  # row 1 gets 10 bytes in, then the disk is full
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    with smoothing.CertifyLog(path) as log:
        log.append(row(0))
        monkeypatch.setattr(os, "write", full_disk)
        with pytest.raises(DiskError, match="No space left on device.*rerun the same command"):
            log.append(row(1))
        monkeypatch.undo()
        log.append(row(2))  # a later row (after space was freed) follows a complete row
    assert [r["idx"] for r in smoothing.read_log(path)] == [0, 2]
    with smoothing.CertifyLog(path) as log:
        assert log.done_indices() == {0, 2}


def test_a_malformed_row_names_file_and_line(tmp_path):
    from dmae_jax.errors import LogFormatError

    path = tmp_path / "log.tsv"
    path.write_text(HEADER + "\n0\t3\t3\t0.5\t1\t0:00:01\nabc\t3\t3\t0.5\t1\t0:00:01\n")
    with pytest.raises(LogFormatError, match=f"{path}:3: column idx must be an integer, got 'abc'"):
        smoothing.CertifyLog(path)
    with pytest.raises(LogFormatError, match=f"{path}:3: column idx cannot be read from 'abc'"):
        smoothing.read_log(path)
    path.write_text(HEADER + "\n0\t3\t3\tbig\t1\t0:00:01\n")
    with pytest.raises(LogFormatError, match=f"{path}:2: column radius cannot be read from 'big'"):
        smoothing.read_log(path)


def test_identity_is_recorded_then_enforced_naming_field_values_and_way_out(tmp_path):
    from dmae_jax.errors import IdentityError
    from dmae_jax.smoothing import logs

    path = str(tmp_path / "log.tsv")
    identity = {"task": "certify", "sigma": 0.25, "n": 200}
    logs.write_identity(path, identity)
    recorded = logs.read_identity(path)
    assert recorded == identity
    logs.compare_identity(path, recorded, dict(identity))  # same identity: resumes
    with pytest.raises(IdentityError) as e:
        logs.compare_identity(path, recorded, dict(identity, n=300))
    assert str(e.value) == (
        f"{path} holds rows certified with n = 200, but this run has n = 300. To resume it, "
        "rerun with --config.n=200; to certify anew, use another --workdir or "
        "--config.log_name")
    assert logs.read_identity(path) == identity  # comparing writes nothing


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"notes": {}}', "\xff\xfe"])
def test_a_damaged_identity_record_is_an_error_not_a_missing_one(tmp_path, text):
    from dmae_jax.errors import IdentityError
    from dmae_jax.smoothing import logs

    path = str(tmp_path / "log.tsv")
    with open(logs.identity_path(path), "w", encoding="latin-1") as f:
        f.write(text)
    with pytest.raises(IdentityError) as e:
        logs.read_identity_record(path)
    message = str(e.value)
    assert message.startswith(f"{logs.identity_path(path)} is damaged (")
    assert "restore the file from a copy, or certify anew" in message
    assert "delete" not in message and "\n" not in message


def test_rows_outside_the_configured_subset_are_an_error(tmp_path):
    from dmae_jax.errors import IdentityError

    path = tmp_path / "log.tsv"
    items = [(i, np.zeros((2, 2, 1)), 0) for i in range(0, 10, 2)]
    certify_one = lambda idx, image, label: {"predict": 0, "radius": 0.5}  # noqa: E731
    smoothing.run_certification(items, certify_one, log_path=path, process_index=0,
                                process_count=1, print_fn=lambda s: None)
    with pytest.raises(IdentityError, match=r"3 images outside this run's subset \(idx 4, 6, 8\)"):
        smoothing.run_certification(items[:2], certify_one, log_path=path, process_index=0,
                                    process_count=1, print_fn=lambda s: None)
