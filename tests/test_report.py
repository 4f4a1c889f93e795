"""Specification of the certified-accuracy report on hand-made logs."""

import numpy as np
import pytest

from dmae_jax import report
from dmae_jax.smoothing import read_log

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
# idx, label, predict, radius: correct at 0.5, correct at 0.25, abstain, wrong at 0.9,
# correct at radius 0 (pA_lower exactly 0.5), correct at 1.2.
ROWS_A = [(0, 1, 1, 0.5), (1, 1, 1, 0.25), (2, 2, -1, 0.0), (3, 0, 1, 0.9), (4, 0, 0, 0.0),
          (5, 3, 3, 1.2)]
ROWS_B = [(0, 1, 1, 0.1), (1, 1, -1, 0.0), (2, 2, 2, 2.0), (3, 0, 0, 0.3), (4, 0, -1, 0.0),
          (5, 3, 3, 0.5)]


def write_log(path, rows, cohen_format=False):
    with open(path, "w") as f:
        print(HEADER, file=f)
        for idx, label, predict, radius in rows:
            radius_text = f"{radius:.3}" if cohen_format else repr(radius)
            print(f"{idx}\t{label}\t{predict}\t{radius_text}\t{int(predict == label)}\t0:00:01",
                  file=f)
    return str(path)


@pytest.fixture
def logs(tmp_path):
    return write_log(tmp_path / "a.tsv", ROWS_A), write_log(tmp_path / "b.tsv", ROWS_B, True)


def test_certified_accuracy_counts_abstentions_wrong_over_all_rows_with_inclusive_radius(logs):
    accuracy = report.certified_accuracy(read_log(logs[0]), [0.0, 0.25, 0.5, 0.75, 1.25])
    np.testing.assert_array_equal(accuracy, np.array([4, 3, 2, 1, 0]) / 6)


def test_acr_is_the_mean_of_correct_times_radius(logs):
    assert report.acr(read_log(logs[0])) == pytest.approx((0.5 + 0.25 + 0.0 + 1.2) / 6)
    assert report.acr(read_log(logs[1])) == pytest.approx((0.1 + 2.0 + 0.3 + 0.5) / 6)


def test_abstention_rate(logs):
    assert report.abstention_rate(read_log(logs[1])) == pytest.approx(2 / 6)


def test_envelope_is_the_best_log_at_each_radius(logs):
    radii = [0.0, 0.25, 0.5, 1.5]
    curves = [report.certified_accuracy(read_log(path), radii) for path in logs]
    np.testing.assert_array_equal(report.envelope(curves), np.array([4, 3, 2, 1]) / 6)


def test_markdown_table(logs):
    table = report.markdown_table([report.load(p) for p in logs], ["a", "b"], [0, 0.5],
                                  with_envelope=True)
    assert table.splitlines() == [
        "| log | images | abstain | r=0 | r=0.5 | ACR |",
        "|---|---|---|---|---|---|",
        "| a | 6 | 0.167 | 0.667 | 0.333 | 0.325 |",
        "| b | 6 | 0.333 | 0.667 | 0.333 | 0.483 |",
        "| envelope (max over logs) |  |  | 0.667 | 0.333 |  |",
    ]


def test_command_line_prints_the_table_and_writes_a_png(logs, tmp_path, capsys):
    plot = tmp_path / "curves.png"
    assert report.main([*logs, "--radii", "0,0.25", "--labels", "sigma=0.25,sigma=0.5",
                        "--envelope", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "| sigma=0.25 | 6 | 0.167 | 0.667 | 0.500 | 0.325 |" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_radii_are_0_to_3_in_steps_of_a_quarter(logs, capsys):
    report.main([logs[0]])
    header = capsys.readouterr().out.splitlines()[0]
    assert header.split(" | ")[3:-1] == [f"r={0.25 * i:g}" for i in range(13)]


def test_bad_arguments_are_clear_errors(logs, capsys):
    with pytest.raises(SystemExit):
        report.main([logs[0], "--radii", "0,a"])
    assert "--radii must be comma-separated numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([*logs, "--labels", "only_one"])
    assert "--labels needs 2 names" in capsys.readouterr().err
