"""The certification loop shared by single-sigma and multi-scale (cascade) certification.

One call certifies a sequence of images into a log, resuming where a previous run stopped:

    run_certification(items, certify_one, log_path=..., extra_columns=[...])

Work split: the k-th item of `items` (in order, counting every item) belongs to process
k % process_count. Splitting by position rather than by `idx % process_count` keeps the
shares equal when the indices are strided (every 50th ImageNet image has idx = 50 k, and
50 k % 4 is only ever 0 or 2). With one process the rows go straight into `log_path`; with
several, process i appends to `<log_path>.part-<i>-of-<n>`, and `merge_logs` (run by
process 0 once all are done, when they form one JAX distributed job) writes the rows of
the log and every part file, sorted by idx, into `log_path`. Indices already in the log or
in any part file are skipped, so a run may resume with a different number of processes.
Logs and part files may be `gs://` objects (`storage`): each process's part is its own
object, and the merged log replaces `log_path` in one upload.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from dmae_jax import storage
from dmae_jax.errors import IdentityError, LogFormatError
from dmae_jax.smoothing.logs import (
    BASE_COLUMNS,
    CertifyLog,
    parse_int,
    read_header_and_lines,
    read_log,
)

# (idx, image [H, W, C], label); image and label may be zero-argument loaders instead.
Item = tuple[int, Any, Any]
CertifyOne = Callable[[int, Any, int], dict[str, Any]]
_PART = re.compile(r"\.part-(\d+)-of-(\d+)$")


def part_path(log_path: str | os.PathLike, process_index: int, process_count: int) -> str:
    """The file process `process_index` of `process_count` writes its rows to."""
    return f"{os.fspath(log_path)}.part-{process_index}-of-{process_count}"


def _existing_parts(log_path: str) -> list[str]:
    return [p for p in storage.with_prefix(log_path + ".part-") if _PART.search(p)]


def _logged_indices(path: str) -> set[int]:
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        return set()
    if not data:
        return set()
    _, lines = read_header_and_lines(path)
    return {parse_int(line.split("\t", 1)[0], path, number, "idx")
            for number, line in enumerate(lines, start=2)}


def logged_indices(log_path: str | os.PathLike) -> set[int]:
    """Indices in a log and in its part files (complete rows only)."""
    return _all_logged_indices(os.fspath(log_path))


def _all_logged_indices(log_path: str) -> set[int]:
    done = _logged_indices(log_path)
    for part in _existing_parts(log_path):
        done |= _logged_indices(part)
    return done


def _process_split(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"process_count must be an integer >= 1, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"process_index must be an integer in [0, {count}), got {index!r}")
    return index, count


def remaining_indices(
    indices: Sequence[int],
    *,
    log_path: str | os.PathLike,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[int]:
    """The indices (in the order given) this process still has to certify into `log_path`."""
    index, count = _process_split(process_index, process_count)
    done = _all_logged_indices(os.fspath(log_path))
    return [int(i) for k, i in enumerate(indices) if k % count == index and int(i) not in done]


def run_certification(
    items: Iterable[Item],
    certify_one: CertifyOne,
    *,
    log_path: str | os.PathLike,
    extra_columns: Sequence[str] = (),
    process_index: int | None = None,
    process_count: int | None = None,
    progress_every: int = 10,
    total: int | None = None,
    print_fn: Callable[[str], None] = print,
) -> str:
    """Certifies this process's share of `items` into a resumable log; returns the log path.

    items: (idx, image, label) in a fixed order, the same on every process; image and label
    may be zero-argument callables that load them, so skipped items cost nothing.
    certify_one(idx, image, label) returns a dict with `predict`, `radius` and every extra
    column; idx, label, correct (int(predict == label)) and time (seconds spent in
    certify_one) are filled in unless it returns them.
    total: how many items this process owns (for the ETA); by default len(items) / processes.
    """
    log_path = os.fspath(log_path)
    index, count = _process_split(process_index, process_count)
    if type(progress_every) is not int or progress_every < 1:
        raise ValueError(f"progress_every must be an integer >= 1, got {progress_every!r}")
    write_path = log_path if count == 1 else part_path(log_path, index, count)
    if total is None and hasattr(items, "__len__"):
        total = len(range(index, len(items), count))

    with CertifyLog(write_path, extra_columns) as log:
        skip = log.done_indices() | _all_logged_indices(log_path)
        if isinstance(items, Sequence):
            check_subset(log_path, skip, {int(item[0]) for item in items})
        previous = read_log(write_path)
        logged, correct = len(previous), sum(r["correct"] for r in previous)
        skipped = 0  # items of this process logged by an earlier run
        new, start = 0, time.monotonic()
        for k, (idx, image, label) in enumerate(items):
            if k % count != index:
                continue
            if int(idx) in skip:
                skipped += 1
                continue
            image = image() if callable(image) else image
            label = label() if callable(label) else label
            before = time.monotonic()
            result = certify_one(int(idx), image, int(label))
            seconds = time.monotonic() - before
            if "predict" not in result or "radius" not in result:
                raise ValueError(
                    f"certify_one must return predict and radius, got keys {sorted(result)}"
                )
            row = {
                "idx": int(idx),
                "label": int(label),
                "correct": int(int(result["predict"]) == int(label)),
                "time": seconds,
                **result,
            }
            log.append(row)
            skip.add(int(idx))
            new, logged, correct = new + 1, logged + 1, correct + row["correct"]
            if new % progress_every == 0:
                print_fn(_progress(write_path, new, skipped, logged, correct, total, start))
        if new % progress_every:
            print_fn(_progress(write_path, new, skipped, logged, correct, total, start))

    if count == 1:
        return log_path
    if jax.process_count() == count:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dmae_jax.smoothing: certification parts written")
        if index == 0:
            merge_logs(log_path, count)
        multihost_utils.sync_global_devices("dmae_jax.smoothing: certification logs merged")
        return log_path
    print_fn(f"{write_path} done; once every process is, run merge_logs({log_path!r}, {count})")
    return write_path


def check_subset(log_path: str, logged: set[int], configured: set[int]) -> None:
    """Every logged idx must be one this run certifies (same subset, or a larger `max`)."""
    outside = sorted(logged - configured)
    if outside:
        shown = ", ".join(map(str, outside[:5])) + (", ..." if len(outside) > 5 else "")
        raise IdentityError(
            f"{log_path} holds rows for {len(outside)} images outside this run's subset "
            f"(idx {shown}): rerun with the subset it was certified with (config.skip, "
            f"config.max, the data set and split), or use another --workdir or "
            f"--config.log_name")


def _progress(
    path: str, new: int, skipped: int, logged: int, correct: int, total: int | None, start: float
) -> str:
    """Images done/total, certified-correct so far, rate and ETA."""
    elapsed = time.monotonic() - start
    rate = new / elapsed if elapsed > 0 else math.inf
    done = skipped + new
    text = f"{path}: {done}/{total if total is not None else '?'} images ({new} this run)"
    text += f", {rate:.3g} images/s"
    if total is not None and rate > 0:
        text += f", ETA {datetime.timedelta(seconds=round(max(total - done, 0) / rate))}"
    accuracy = f" ({correct / logged:.1%})" if logged else ""
    return f"{text}, certified correct {correct}/{logged}{accuracy}"


def merge_logs(
    log_path: str | os.PathLike, num_parts: int | None = None, *, remove_parts: bool = True
) -> int:
    """Merges `log_path` and every `<log_path>.part-*` into `log_path` sorted by idx; returns rows.

    num_parts, if given, requires the parts `part-i-of-num_parts` to exist (a missing one
    means a process never started). Torn last lines are dropped; an idx logged twice with
    the same line is kept once, with different lines it is an error. The merged log replaces
    `log_path` atomically before the part files are removed, so merging is idempotent.
    """
    log_path = os.fspath(log_path)
    parts = _existing_parts(log_path)
    if num_parts is not None:
        expected = [part_path(log_path, i, num_parts) for i in range(num_parts)]
        missing = [p for p in expected if p not in parts]
        if missing:
            raise ValueError(f"cannot merge {log_path}: part files missing: {missing}")
    sources = ([log_path] if storage.exists(log_path) else []) + parts
    if not sources:
        raise ValueError(f"nothing to merge: neither {log_path} nor its part files exist")
    header: list[str] | None = None
    rows: dict[int, str] = {}
    for source in sources:
        columns, lines = read_header_and_lines(source)
        if header is None:
            header = columns
        elif columns != header:
            raise ValueError(f"{source} has header {columns}, expected {header} as in {sources[0]}")
        for number, line in enumerate(lines, start=2):
            idx = parse_int(line.split("\t", 1)[0], source, number, "idx")
            if idx in rows and rows[idx] != line:
                raise LogFormatError(f"idx {idx} has different rows in the logs {sources}")
            rows[idx] = line
    if header is None or list(header[: len(BASE_COLUMNS)]) != list(BASE_COLUMNS):
        raise ValueError(f"{sources[0]} header must start with {list(BASE_COLUMNS)}, got {header}")
    storage.write_atomic(log_path, "\t".join(header) + "\n"
                         + "".join(rows[idx] + "\n" for idx in sorted(rows)))
    if remove_parts:
        for part in parts:
            storage.remove(part)
    return len(rows)
