"""Certified accuracy and average certified radius (ACR) from certification logs.

    python -m dmae_jax.report LOG.tsv [LOG2.tsv ...] [--radii 0,0.25,...] [--labels a,b]
                              [--envelope] [--plot out.png] [--json out.json] [--csv out.csv]
                              [--alpha 0.01]

Certified accuracy at r is the fraction of *all* logged images that are correct with
radius >= r (inclusive, as Cohen et al.'s analyze.py); abstentions (predict -1, and the
cascade's -2) count as wrong at every r, so the value at r = 0 is the smoothed classifier's
clean accuracy. For a cascade log the report also counts the images that stopped at each
stage. Curves are labelled, and plots titled, from the identity recorded next to a log
(data set, sigma, N, alpha, mode) when there is one, else from its columns.
ACR = mean(correct * radius) over all rows (Jeong & Shin 2020; Zhai et al. 2020). The
envelope is the best certified accuracy over the logs at each radius: a max over several
classifiers (e.g. sigmas), not the certificate of any single one. Reads every log dialect
`dmae_jax.smoothing.read_log` does, including Cohen et al.'s and Carlini et al.'s.
`--alpha` recomputes the bounds of fixed-protocol CERTIFY logs at another alpha from their
counts; a sequential log (a `looks` column, or mode = sequential in its identity) is
refused: its counts stop where the answer at its own alpha was settled, and a bound
recomputed from them at another alpha would be optional stopping.

The log reader (`dmae_jax.smoothing`, which imports JAX and SciPy) is imported once every
argument has been checked and every log found, so a mistyped path or flag is an error in
well under a second.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from dmae_jax import errors, storage
from dmae_jax.errors import ConfigError

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
    """Fraction of rows where the smoothed classifier abstained (predict < 0: -1, or -2 for
    the cascade's ambiguous stop)."""
    if not rows:
        raise ValueError("rows must hold at least one certification result, got none")
    return float(np.mean([int(r["predict"]) < 0 for r in rows]))


def stage_counts(rows: Rows) -> list[tuple[int, float, int]] | None:
    """[(stage, sigma, images that stopped there)] of a cascade log; None for other logs."""
    if not rows or "stage" not in rows[0]:
        return None
    counts: dict[int, list] = {}
    for r in rows:
        entry = counts.setdefault(int(r["stage"]), [float(r.get("sigma", "nan")), 0])
        entry[1] += 1
    return [(stage, sigma, count) for stage, (sigma, count) in sorted(counts.items())]


def describe_stages(rows: Rows) -> str | None:
    """'stopped at stage 0 (sigma 1.0): 80, ...' for a cascade log; None for other logs."""
    counts = stage_counts(rows)
    if counts is None:
        return None
    return "stopped at " + ", ".join(f"stage {stage} (sigma {sigma:g}): {count}"
                                      for stage, sigma, count in counts)


def log_info(path: str | os.PathLike, rows: Rows) -> dict[str, Any]:
    """What produced a log: data set, sigma(s), N0, N, alpha, mode, task (None when unknown).

    From the identity recorded next to the log by the certify/cascade tasks; for a log
    without one (e.g. Cohen et al.'s), sigma and N from its columns when it has them.
    """
    from dmae_jax.smoothing import logs

    identity = logs.read_identity(path) or {}
    info: dict[str, Any] = {key: identity.get(key) for key in
                            ("task", "sigma", "sigmas", "n0", "n", "alpha", "mode")}
    info["dataset"] = identity.get("data.dataset", identity.get("dataset"))
    if info["sigma"] is None and info["sigmas"] is None and rows and "sigma" in rows[0]:
        sigmas = sorted({float(r["sigma"]) for r in rows}, reverse=True)
        info["sigma" if len(sigmas) == 1 else "sigmas"] = sigmas[0] if len(sigmas) == 1 \
            else sigmas
    if info["n"] is None and rows and "n" in rows[0] and "n_drawn" not in rows[0]:
        info["n"] = max(int(r["n"]) for r in rows)
    return info


def describe_log(info: dict[str, Any], fallback: str) -> str:
    """A curve label: 'sigma=0.25', 'cascade 1>0.5>0.25', with ', sequential' if so."""
    if info.get("sigmas"):
        sigmas = info["sigmas"]
        sigmas = sigmas if isinstance(sigmas, list | tuple) else str(sigmas).split(",")
        label = "cascade " + ">".join(f"{float(s):g}" for s in sigmas)
    elif info.get("sigma") is not None:
        label = f"sigma={float(info['sigma']):g}"
    else:
        return fallback
    return label + (", sequential" if info.get("mode") == "sequential" else "")


def plot_title(infos: Sequence[dict[str, Any]]) -> str:
    """Data set, N and alpha shared by the logs (sigma is in each curve's label)."""
    parts = []
    for key, name in (("dataset", ""), ("n", "N="), ("alpha", "alpha=")):
        values = {info.get(key) for info in infos}
        if len(values) == 1 and None not in values:
            value = values.pop()
            parts.append(f"{name}{value:,}" if key == "n" and isinstance(value, int)
                         else f"{name}{value}")
    sigmas = {info.get("sigma") for info in infos}
    if len(infos) == 1 and None not in sigmas:
        parts.append(f"sigma={sigmas.pop()}")
    if any(info.get("mode") == "sequential" for info in infos):
        parts.append("sequential (N is the cap's base)")
    return "certified accuracy" + (": " + ", ".join(parts) if parts else "")


def envelope(accuracies: Sequence[np.ndarray]) -> np.ndarray:
    """[R] best certified accuracy over several logs at each radius (not one classifier's)."""
    if not accuracies:
        raise ValueError("accuracies must hold at least one curve, got none")
    return np.max(np.stack([np.asarray(a) for a in accuracies]), axis=0)


def load(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of one certification log in any dialect `dmae_jax.smoothing.read_log` reads."""
    from dmae_jax.smoothing import logs

    return logs.read_log(path)


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
        if not rows:  # a log with its header only: nothing certified yet
            lines.append("| " + " | ".join([name, "0", *["-"] * (len(header) - 2)]) + " |")
            continue
        curve = certified_accuracy(rows, radii)
        curves.append(curve)
        cells = [name, str(len(rows)), f"{abstention_rate(rows):.3f}"]
        cells += [f"{a:.3f}" for a in curve] + [f"{acr(rows):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if with_envelope and curves:
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

    if max_radius is None:  # to the largest radius certified (correctly) in any log
        largest = max((float(r["radius"]) for rows in rows_per_log for r in rows
                       if r["correct"] and math.isfinite(float(r["radius"]))), default=0.0)
        max_radius = max(0.05 * math.ceil(largest / 0.05 + 1e-9), 0.25)
    radii = np.arange(0.0, max_radius + radius_step / 2, radius_step)
    figure, axes = plt.subplots(figsize=(6, 4))
    curves = []
    for name, rows in zip(names, rows_per_log, strict=True):
        if not rows:
            continue
        curve = certified_accuracy(rows, radii)
        curves.append(curve)
        axes.plot(radii, curve, label=name)
    if with_envelope and curves:
        axes.plot(radii, envelope(curves), "k--", label="envelope (max over logs)")
    axes.set(xlabel="L2 radius ([0, 1] pixel units)", ylabel="certified accuracy",
             ylim=(0.0, 1.0),
             xlim=(0.0, max_radius), title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150)
    plt.close(figure)
    storage.write_atomic(path, buffer.getvalue())


# -------------------------------------------------------------------------------------
# TensorBoard: each certification log as a run of its own.
# -------------------------------------------------------------------------------------


CERTIFY_RADIUS_STEPS = 100  # certified-accuracy curve: TensorBoard step = radius x 100


def write_tensorboard(workdir: str, log_name: str, rows: Rows, *,
                      table: str | None = None, title: str = "") -> None:
    """Certification results as their own TensorBoard run, `<workdir>/<log_name stem>/`.

    `certify/certified_accuracy` is the curve, with TensorBoard's step axis standing for the
    radius in hundredths (step 150 = radius 1.5), from 0 to just past the largest certified
    radius; `certify/acr`, `certify/abstain` and `certify/clean_accuracy` (radius 0) are at
    step 0, with the plot of the curve (when matplotlib is installed) and the markdown
    `table` if given. Writing again (a rerun) replaces what the previous run wrote.
    """
    from dmae_jax import metrics

    writer = metrics.create_writer(os.path.join(workdir, os.path.splitext(log_name)[0]))
    try:
        radius = np.asarray([float(r["radius"]) for r in rows], np.float64)
        finite = radius[np.isfinite(radius)]
        largest = float(finite.max()) if finite.size else 0.0
        steps = np.arange(0, int(np.floor(largest * CERTIFY_RADIUS_STEPS)) + 2)
        curve = certified_accuracy(rows, steps / CERTIFY_RADIUS_STEPS)
        writer.write_scalars(0, {"certify/acr": acr(rows),
                                 "certify/abstain": abstention_rate(rows),
                                 "certify/clean_accuracy": float(curve[0])})
        for step, accuracy in zip(steps, curve, strict=True):
            writer.write_scalars(int(step), {"certify/certified_accuracy": float(accuracy)})
        plot = _certification_plot(rows, log_name, title)
        if plot is not None:
            writer.write_images(0, {"certify/certified_accuracy_plot": plot})
        if table is not None:
            writer.write_texts(0, {"certify/report": table})
    finally:
        writer.close()


def _certification_plot(rows, name: str, title: str) -> np.ndarray | None:
    """report's certified-accuracy plot as uint8 [H, W, 3], or None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "plot.png")
        plot_certified_accuracy(path, [rows], [name], title=title)
        return np.asarray(Image.open(path).convert("RGB"))


# -------------------------------------------------------------------------------------
# Command line.
# -------------------------------------------------------------------------------------


def _parse_radii(text: str) -> list[float]:
    try:
        radii = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"--radii must be comma-separated numbers, got {text!r}") from None
    if not radii or any(not math.isfinite(r) or r < 0 for r in radii):
        raise ConfigError(f"--radii must be finite numbers >= 0, got {text!r}")
    return radii


def _output_path(flag: str, path: str | None) -> None:
    """An output file a flag names must be writable where it is: in an existing directory,
    not a directory itself; checked before any log is read (a gs:// object needs no
    directory: its bucket is checked by the write)."""
    if path is None or storage.is_gcs(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag}={path} is a directory; name a file in it")
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag}={path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag}={path}: the directory {parent} is not writable")


def summary(rows_per_log: Sequence[Rows], names: Sequence[str], paths: Sequence[str],
            radii: Sequence[float]) -> list[dict[str, Any]]:
    """One JSON-ready record per log: what produced it, accuracy at radii, ACR, stage counts."""
    records = []
    for name, rows, path in zip(names, rows_per_log, paths, strict=True):
        stages = stage_counts(rows)
        records.append({
            "name": name, "path": os.fspath(path), "images": len(rows),
            "info": log_info(path, rows),
            "abstain": abstention_rate(rows) if rows else None,
            "radii": [float(r) for r in radii],
            "certified_accuracy": certified_accuracy(rows, radii).tolist() if rows else None,
            "acr": acr(rows) if rows else None,
            "stages": None if stages is None else [
                {"stage": st, "sigma": sg, "images": c} for st, sg, c in stages],
        })
    return records


def at_alpha(path: str | os.PathLike, rows: Rows, alpha: float) -> list[dict[str, Any]]:
    """A log's rows with their bounds recomputed at `alpha` (`certify.recompute_at_alpha`).

    A log whose identity says it is sequential or was sampled with sound noise is refused
    too, even if its rows lost their marks.
    """
    from dmae_jax.smoothing import logs
    from dmae_jax.smoothing.certify import recompute_at_alpha

    identity = logs.read_identity(path) or {}
    if identity.get("mode") == "sequential":
        raise ValueError("the log is sequential (its identity says mode = sequential): "
                         "recomputing its bounds at another alpha is optional stopping")
    if identity.get("noise") == "sound":
        raise ValueError("the log was sampled with sound noise, whose bounds carry margins "
                         "for its images: certify again at that alpha")
    return recompute_at_alpha(rows, alpha)


def write_csv(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
    """The table as CSV: log, images, abstain, one column per radius, ACR."""
    radii = records[0]["radii"] if records else []
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["log", "images", "abstain", *(f"r={r:g}" for r in radii), "ACR"])
    for record in records:
        accuracy = record["certified_accuracy"] or [""] * len(radii)
        writer.writerow([record["name"], record["images"], record["abstain"],
                         *accuracy, record["acr"]])
    storage.write_atomic(path, text.getvalue())


def _write(flag: str, path: str, write) -> None:
    try:
        write(path)
    except OSError as e:
        raise ConfigError(f"{flag}={path}: cannot write it ({e.strerror or e})") from e
    print(f"wrote {path}")


@errors.reporting
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: prints the markdown table; optionally writes the plot, JSON and CSV.

    A missing or unreadable log, a bad argument or an output path that cannot be written is
    one `error:` line and exit status 2, before anything is written.
    """
    parser = errors.ArgumentParser(
        prog="python -m dmae_jax.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="certification TSV logs")
    parser.add_argument("--radii", default=None,
                        help="comma-separated radii (default 0,0.25,...,3)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated names, one per log (default: from each log's "
                             "recorded identity or sigma column)")
    parser.add_argument("--envelope", action="store_true",
                        help="add the best accuracy over the logs at each radius")
    parser.add_argument("--plot", default=None, help="write a PNG plot to this path")
    parser.add_argument("--json", default=None, help="write the results as JSON to this path")
    parser.add_argument("--csv", default=None, help="write the table as CSV to this path")
    parser.add_argument("--alpha", type=float, default=None,
                        help="recompute each CERTIFY log's bounds at this alpha from its counts "
                             "(refused for sequential and sound-noise logs)")
    args = parser.parse_args(argv)
    radii = list(DEFAULT_RADII) if args.radii is None else _parse_radii(args.radii)
    for flag in ("plot", "json", "csv"):
        _output_path(f"--{flag}", getattr(args, flag))
    if args.labels is not None and len(args.labels.split(",")) != len(args.logs):
        raise ConfigError(f"--labels needs {len(args.logs)} names, got "
                          f"{len(args.labels.split(','))}: {args.labels}")
    for path in args.logs:
        if not storage.exists(path):
            raise ConfigError(f"cannot read {path} (No such file or directory)")

    from dmae_jax.smoothing import logs

    rows_per_log = []
    for path in args.logs:
        try:
            rows_per_log.append(load(path))
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise ConfigError(f"cannot read {path} ({reason})") from None
    if args.alpha is not None:
        for i, path in enumerate(args.logs):
            try:
                rows_per_log[i] = at_alpha(path, rows_per_log[i], args.alpha)
            except ValueError as e:
                raise ConfigError(f"--alpha={args.alpha}: {path}: {e}") from None
    infos = [log_info(path, rows) for path, rows in zip(args.logs, rows_per_log, strict=True)]
    if args.labels is None:
        names = [describe_log(info, os.path.basename(p)) for info, p in
                 zip(infos, args.logs, strict=True)]
        if len(set(names)) != len(names):  # same settings twice: tell them apart by file
            names = [f"{n} ({os.path.basename(p)})" for n, p in
                     zip(names, args.logs, strict=True)]
    else:
        names = args.labels.split(",")
    if args.envelope and len({frozenset(r["idx"] for r in rows) for rows in rows_per_log}) > 1:
        print("warning: the logs certify different images; the envelope mixes test sets",
              file=sys.stderr)
    print(markdown_table(rows_per_log, names, radii, with_envelope=args.envelope))
    for name, path, rows in zip(names, args.logs, rows_per_log, strict=True):
        identity = logs.describe_identity(path)
        print(f"{name}: {identity or 'no identity recorded (not written by dmae_jax)'}")
        if not rows:
            print(f"{name}: {path} has a header but no rows yet: nothing certified")
        stages = describe_stages(rows)
        if stages:
            print(f"{name}: {stages}")
    records = summary(rows_per_log, names, args.logs, radii)
    if args.json:
        _write("--json", args.json, lambda path: _write_json(path, records))
    if args.csv:
        _write("--csv", args.csv, lambda path: write_csv(path, records))
    if args.plot:
        if not any(rows_per_log):
            print("no rows in any log: no plot written", file=sys.stderr)
        else:
            _write("--plot", args.plot, lambda path: plot_certified_accuracy(
                path, rows_per_log, names, with_envelope=args.envelope,
                title=plot_title(infos)))
    return 0


def _write_json(path: str, records) -> None:
    storage.write_atomic(path, json.dumps({"logs": records}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
