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


CASCADE_HEADER = HEADER + "\tr_neg\tpred_uc\tcorr_uc\tstage\tsigma\tnum_samples"


def write_cascade_log(path, rows, final_newline=True):
    """rows: (idx, label, predict, radius, stage, sigma)."""
    lines = [CASCADE_HEADER]
    for idx, label, predict, radius, stage, sigma in rows:
        lines.append(f"{idx}\t{label}\t{predict}\t{radius!r}\t{int(predict == label)}\t0:00:01"
                     f"\t-100.0\t{predict}\t{int(predict == label)}\t{stage}\t{sigma}\t1200")
    with open(path, "w") as f:
        f.write("\n".join(lines) + ("\n" if final_newline else ""))
    return str(path)


CASCADE_ROWS = [(0, 5, -2, 0.0, 1, 0.5), (1, 7, 7, 0.58, 1, 0.5), (2, 1, 1, 1.3, 0, 1.0),
                (3, 2, -1, 0.0, 2, 0.25), (4, 3, 3, 0.2, 2, 0.25)]


def test_abstention_counts_the_cascades_ambiguous_minus_two(tmp_path):
    rows = read_log(write_cascade_log(tmp_path / "c.tsv", CASCADE_ROWS))
    assert report.abstention_rate(rows) == pytest.approx(2 / 5)


def test_a_complete_last_line_without_newline_is_read_as_analyze_py_does(tmp_path):
    path = write_cascade_log(tmp_path / "c.tsv", CASCADE_ROWS, final_newline=False)
    rows = read_log(path)
    assert [r["idx"] for r in rows] == [0, 1, 2, 3, 4]
    torn = tmp_path / "torn.tsv"  # a last line cut short is still ignored
    torn.write_text(open(path).read()[:-12])
    assert [r["idx"] for r in read_log(torn)] == [0, 1, 2, 3]


def test_header_only_log_gives_a_clear_message_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "empty.tsv"
    path.write_text(CASCADE_HEADER)  # not even a newline
    assert report.main([str(path), "--radii", "0,0.5", "--json", str(tmp_path / "r.json"),
                        "--plot", str(tmp_path / "p.png")]) == 0
    captured = capsys.readouterr()
    assert "| empty.tsv | 0 | - | - | - | - |" in captured.out
    assert "has a header but no rows yet" in captured.out
    assert "no plot written" in captured.err


def test_cascade_stage_counts_json_csv_and_labels_from_the_log(tmp_path, capsys):
    path = write_cascade_log(tmp_path / "c.tsv", CASCADE_ROWS)
    rows = read_log(path)
    assert report.stage_counts(rows) == [(0, 1.0, 1), (1, 0.5, 2), (2, 0.25, 2)]
    out_json, out_csv, plot = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "p.png"
    assert report.main([path, "--radii", "0,0.5", "--json", str(out_json), "--csv",
                        str(out_csv), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    name = "cascade 1>0.5>0.25"  # from the sigma column: no file name as the label
    assert f"{name}: stopped at stage 0 (sigma 1): 1, stage 1 (sigma 0.5): 2, " \
           "stage 2 (sigma 0.25): 2" in out
    import json
    record = json.loads(out_json.read_text())["logs"][0]
    assert record["name"] == name and record["images"] == 5 and record["abstain"] == 0.4
    assert record["certified_accuracy"] == pytest.approx([3 / 5, 2 / 5])
    assert record["stages"][1] == {"stage": 1, "sigma": 0.5, "images": 2}
    assert out_csv.read_text().splitlines() == [
        "log,images,abstain,r=0,r=0.5,ACR",
        f"{name},5,0.4,0.6,0.4,{record['acr']!r}"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_title_names_data_set_n_alpha_and_sigma():
    info = {"dataset": "digits", "n": 500, "alpha": 0.001, "sigma": 0.25, "mode": "fixed"}
    assert report.plot_title([info]) == \
        "certified accuracy: digits, N=500, alpha=0.001, sigma=0.25"
    assert report.describe_log(info, "x.tsv") == "sigma=0.25"
    assert report.describe_log({**info, "mode": "sequential"}, "x") == "sigma=0.25, sequential"
