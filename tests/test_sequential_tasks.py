"""The certify and cascade tasks with mode=sequential, end to end on tiny digits classifiers."""

from __future__ import annotations

import os

import pytest

from dmae_jax import defaults, report
from dmae_jax.smoothing import logs
from dmae_jax.smoothing.cascade import CASCADE_COLUMNS
from dmae_jax.smoothing.certify import LOG_COLUMNS
from tests import helpers

COHEN = ("idx", "label", "predict", "radius", "correct", "time")


@pytest.fixture(scope="module")
def tiny_classifiers(tmp_path_factory):
    """Two randomly initialised 16x16 digits classifiers, exported "at" sigma 0.25 and 0.5."""
    return helpers.tiny_digits_classifiers(tmp_path_factory.mktemp("sequential_e2e"), (0.25, 0.5))


def _header(path):
    with open(path) as f:
        return tuple(f.readline().rstrip("\n").split("\t"))


def _common(cfg, data_dir):
    cfg.update(n0=8, n=40, n_max=96, max=6, batch_size=32, mode="sequential")
    cfg.data.data_dir = data_dir
    return cfg


def test_certify_task_sequential_writes_contract_rows_the_report_reads(tmp_path,
                                                                        tiny_classifiers):
    from dmae_jax.tasks import execute

    data_dir, paths = tiny_classifiers
    cfg = _common(defaults.certify("digits", 0.25), data_dir)
    cfg.checkpoint = paths[0.25]
    work = str(tmp_path / "cert")
    execute.run(cfg, work)
    path = os.path.join(work, "certify_sigma_0.25.tsv")
    assert _header(path)[:6] == COHEN
    assert _header(path)[6:] == (*LOG_COLUMNS, "image", "looks")
    rows = logs.read_log(path)
    assert [r["idx"] for r in rows] == [0, 2, 4]
    for r in rows:
        # n0 selection + the estimation samples actually drawn, never past the cap.
        assert int(r["n_drawn"]) == 8 + int(r["n"])
        assert 0 < int(r["n"]) <= 96 and 0 <= int(r["nA"]) <= int(r["n"])
        assert r["predict"] == -1 or r["predict"] == int(r["cAHat"])
        assert int(r["abstained_early"]) == 0
    loaded = report.load(path)
    table = report.markdown_table([loaded], ["seq"])
    assert "| seq | 3 |" in table


def test_cascade_task_sequential_writes_contract_rows_the_report_reads(tmp_path,
                                                                        tiny_classifiers):
    from dmae_jax.tasks import execute

    data_dir, paths = tiny_classifiers
    cfg = _common(defaults.cascade("digits", sigmas=(0.5, 0.25)), data_dir)
    cfg.checkpoints = (paths[0.5], paths[0.25])
    work = str(tmp_path / "cascade")
    execute.run(cfg, work)
    (name,) = [f for f in os.listdir(work) if f.endswith(".tsv")]
    path = os.path.join(work, name)
    assert _header(path)[:6] == COHEN
    # The looks column marks the log as sequential (report refuses --alpha on it).
    assert _header(path)[6:] == (*CASCADE_COLUMNS, "image", "pA_lower", "looks")
    rows = logs.read_log(path)
    assert [r["idx"] for r in rows] == [0, 2, 4]
    for r in rows:
        stage = int(r["stage"])
        assert stage in (0, 1)
        assert float(r["sigma"]) == (0.5, 0.25)[stage]
        # Every visited stage drew n0 selection samples and at most n_max estimation ones.
        assert 8 * (stage + 1) < int(r["num_samples"]) <= (8 + 96) * (stage + 1)
        assert int(r["predict"]) in range(-2, 10)
        assert 0.0 <= float(r["pA_lower"]) <= 1.0
        if int(r["predict"]) >= 0:  # a prediction's radius comes from that bound
            assert float(r["pA_lower"]) >= 0.5
    table = report.markdown_table([report.load(path)], ["seq"])
    assert "| seq | 3 |" in table
