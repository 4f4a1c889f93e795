"""Certified accuracy and average certified radius (ACR) from certification logs.

    python -m dmae_jax.report LOG.tsv [LOG2.tsv ...] [--radii 0,0.25,...] [--labels a,b]
                              [--envelope] [--plot out.png]

Certified accuracy at r is the fraction of *all* logged images that are correct with
radius >= r (inclusive, as Cohen et al.'s analyze.py); abstentions (predict -1) count as
wrong at every r, so the value at r = 0 is the smoothed classifier's clean accuracy.
ACR = mean(correct * radius) over all rows (Jeong & Shin 2020; Zhai et al. 2020). The
envelope is the best certified accuracy over the logs at each radius: a max over several
classifiers (e.g. sigmas), not the certificate of any single one. Reads every log dialect
`dmae_jax.smoothing.read_log` does, including Cohen et al.'s and Carlini et al.'s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from dmae_jax.smoothing import logs
from dmae_jax.smoothing.logs import read_log

DEFAULT_RADII = tuple(0.25 * i for i in range(13))  # 0, 0.25, ..., 3.0
Rows = Sequence[dict[str, Any]]


def _correct_and_radius(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    if not rows:
        raise ValueError("rows must hold at least one certification result, got none")
    correct = np.asarray([bool(r["correct"]) for r in rows])
    radius = np.asarray([float(r["radius"]) for r in rows], dtype=np.float64)
    return correct, radius


def certified_accuracy(rows: Rows, radii: Sequence[float]) -> np.ndarray:
    """[R] fraction of all rows with correct and radius >= r, for each r in radii."""
    correct, radius = _correct_and_radius(rows)
    # A NaN radius (old Cohen code when nA = 0) fails every >= test, as in analyze.py.
    return np.asarray([np.mean(correct & (radius >= r)) for r in radii], dtype=np.float64)


def acr(rows: Rows) -> float:
    """Average certified radius: mean over all rows of radius if correct else 0."""
    correct, radius = _correct_and_radius(rows)
    return float(np.mean(np.where(correct & np.isfinite(radius), radius, 0.0)))


def abstention_rate(rows: Rows) -> float:
    """Fraction of rows where the smoothed classifier abstained (predict == -1)."""
    if not rows:
        raise ValueError("rows must hold at least one certification result, got none")
    return float(np.mean([int(r["predict"]) == -1 for r in rows]))


def envelope(accuracies: Sequence[np.ndarray]) -> np.ndarray:
    """[R] best certified accuracy over several logs at each radius (not one classifier's)."""
    if not accuracies:
        raise ValueError("accuracies must hold at least one curve, got none")
    return np.max(np.stack([np.asarray(a) for a in accuracies]), axis=0)


def load(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of one certification log in any dialect `dmae_jax.smoothing.read_log` reads."""
    return read_log(path)


def markdown_table(
    rows_per_log: Sequence[Rows],
    names: Sequence[str],
    radii: Sequence[float] = DEFAULT_RADII,
    *,
    with_envelope: bool = False,
) -> str:
    """Markdown table: one line per log with its image count, accuracy at radii and ACR."""
    if len(names) != len(rows_per_log):
        raise ValueError(f"names must have one entry per log ({len(rows_per_log)}), got {names}")
    header = ["log", "images", "abstain", *(f"r={r:g}" for r in radii), "ACR"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    curves = []
    for name, rows in zip(names, rows_per_log, strict=True):
        curve = certified_accuracy(rows, radii)
        curves.append(curve)
        cells = [name, str(len(rows)), f"{abstention_rate(rows):.3f}"]
        cells += [f"{a:.3f}" for a in curve] + [f"{acr(rows):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if with_envelope:
        cells = ["envelope (max over logs)", "", ""]
        cells += [f"{a:.3f}" for a in envelope(curves)] + [""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_certified_accuracy(
    path: str | os.PathLike,
    rows_per_log: Sequence[Rows],
    names: Sequence[str],
    *,
    max_radius: float | None = None,
    radius_step: float = 0.01,
    with_envelope: bool = False,
    title: str = "",
) -> None:
    """PNG of certified accuracy against radius, one curve per log (headless Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if max_radius is None:
        largest = max(float(np.nanmax([r["radius"] for r in rows])) for rows in rows_per_log)
        max_radius = max(0.25 * math.ceil(largest / 0.25 + 1e-9), 0.25)
    radii = np.arange(0.0, max_radius + radius_step / 2, radius_step)
    figure, axes = plt.subplots(figsize=(6, 4))
    curves = []
    for name, rows in zip(names, rows_per_log, strict=True):
        curve = certified_accuracy(rows, radii)
        curves.append(curve)
        axes.plot(radii, curve, label=name)
    if with_envelope:
        axes.plot(radii, envelope(curves), "k--", label="envelope (max over logs)")
    axes.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(0.0, 1.0),
             xlim=(0.0, max_radius), title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=150)
    plt.close(figure)


def _parse_radii(text: str) -> list[float]:
    try:
        radii = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--radii must be comma-separated numbers, got {text!r}"
        ) from None
    if not radii or any(not math.isfinite(r) or r < 0 for r in radii):
        raise argparse.ArgumentTypeError(f"--radii must be finite numbers >= 0, got {text!r}")
    return radii


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: prints the markdown table and optionally writes the PNG plot."""
    parser = argparse.ArgumentParser(
        prog="python -m dmae_jax.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("logs", nargs="+", help="certification TSV logs")
    parser.add_argument("--radii", type=_parse_radii, default=list(DEFAULT_RADII),
                        help="comma-separated radii (default 0,0.25,...,3)")
    parser.add_argument("--labels", default=None, help="comma-separated names, one per log")
    parser.add_argument("--envelope", action="store_true",
                        help="add the best accuracy over the logs at each radius")
    parser.add_argument("--plot", default=None, help="write a PNG plot to this path")
    args = parser.parse_args(argv)

    if args.labels is None:
        names = [os.path.basename(p) for p in args.logs]
    else:
        names = args.labels.split(",")
        if len(names) != len(args.logs):
            parser.error(f"--labels needs {len(args.logs)} names, got {len(names)}: {args.labels}")
    try:
        rows_per_log = [load(path) for path in args.logs]
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if args.envelope and len({frozenset(r["idx"] for r in rows) for rows in rows_per_log}) > 1:
        print("warning: the logs certify different images; the envelope mixes test sets",
              file=sys.stderr)
    print(markdown_table(rows_per_log, names, args.radii, with_envelope=args.envelope))
    for name, path in zip(names, args.logs, strict=True):
        identity = logs.describe_identity(path)
        print(f"{name}: {identity or 'no identity recorded (not written by dmae_jax)'}")
    if args.plot:
        plot_certified_accuracy(args.plot, rows_per_log, names, with_envelope=args.envelope)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
