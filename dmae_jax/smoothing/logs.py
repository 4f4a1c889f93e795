"""Certification logs: Cohen et al.'s TSV, written crash-safely and read from any of its dialects.

Format (locuslab/smoothing `certify.py`): a header line, then one line per image,
tab-separated, first columns `idx label predict radius correct time`, then extra columns.
`predict` is -1 on abstain (radius 0.0), `correct` is int(predict == label), `time` is
`str(datetime.timedelta)`. We write the radius with full precision (repr of the float):
Cohen's `{:.3}` rounds 0.4996 up to 0.5, which inflates certified accuracy at grid radii.

Writing is append-only, one whole line at a time (a short write is continued, a failed one
is cut back to the end of the previous row and raised as `DiskError`), then fsync, so a
run killed at any moment, or stopped by a full disk, leaves at most one torn last line;
reopening the log truncates it away and the run resumes after the last complete row. An
index is never written twice.

On object storage (`gs://`), where nothing can be appended to, the log is a local file
written exactly as above and uploaded whole as one object at most every
`storage.SYNC_INTERVAL_S` seconds and at close (`storage.SyncedObject`): the log in the
bucket always holds complete rows only, and a kill loses at most the rows of the last
interval, which the resumed run certifies again.

Next to each log, `<log>.identity.json` records what produced its rows (task, sigmas,
models by content fingerprint, N0, N, alpha, data set, subset, seed, ...): a run resumes a
log only under the same identity (`compare_identity`).

Reading also accepts Cohen's logs (3 significant digits), the multi-scale code's logs
(extra columns, predict -2) and Carlini et al.'s diffusion-denoised-smoothing logs, whose
`correct` column is a running cumulative count: `read_log` always recomputes `correct` as
int(predict == label) after checking the file's column is either that or its running sum.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from dmae_jax import storage
from dmae_jax.errors import DiskError, IdentityError, LockError, LogFormatError

BASE_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
_INT_COLUMNS = ("idx", "label", "predict", "correct")
_TIMEDELTA = re.compile(
    r"^(?:(?P<days>-?\d+) days?, )?(?P<hours>\d+):(?P<minutes>\d{2}):(?P<seconds>\d{2}(?:\.\d+)?)$"
)


def format_value(value: Any) -> str:
    """One TSV field: ints as ints, floats at full precision, count vectors comma-separated."""
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return repr(float(value))
    if isinstance(value, np.ndarray | list | tuple):
        return ",".join(format_value(v) for v in np.asarray(value).ravel().tolist())
    text = str(value)
    if "\t" in text or "\n" in text or "\r" in text:
        raise ValueError(f"log values must not contain tabs or newlines, got {text!r}")
    return text


def format_time(seconds: float) -> str:
    """Elapsed time as Cohen's logs write it: str(datetime.timedelta), e.g. 0:02:32.717239."""
    return str(datetime.timedelta(seconds=float(seconds)))


def parse_time(text: str) -> float:
    """Seconds from a timedelta string (h:mm:ss[.ffffff], optional 'N days, ') or a number."""
    match = _TIMEDELTA.match(text.strip())
    if match:
        days = int(match["days"] or 0)
        return (
            days * 86400.0
            + int(match["hours"]) * 3600.0
            + int(match["minutes"]) * 60.0
            + float(match["seconds"])
        )
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"time must be a timedelta string or seconds, got {text!r}") from None


def format_sparse_counts(counts: np.ndarray) -> str:
    """Nonzero votes as `class:count` pairs, e.g. 3:9950,5:50 (`-` if none); short for K = 1000."""
    pairs = [f"{k}:{int(c)}" for k, c in enumerate(np.asarray(counts).tolist()) if c]
    return ",".join(pairs) or "-"


def parse_counts(text: str, num_classes: int | None = None) -> np.ndarray:
    """Votes int64 [K] from a dense `a,b,c` or sparse `class:count,...` (or `-`) log field."""
    text = str(text)
    if ":" not in text and text != "-":
        return np.asarray([int(v) for v in text.split(",")], dtype=np.int64)
    pairs = [] if text == "-" else [tuple(map(int, p.split(":"))) for p in text.split(",")]
    size = num_classes if num_classes is not None else max((k + 1 for k, _ in pairs), default=0)
    counts = np.zeros(size, dtype=np.int64)
    for k, c in pairs:
        if not 0 <= k < size:
            raise ValueError(f"class {k} in counts {text!r} is outside [0, {size})")
        counts[k] = c
    return counts


def _parse_extra(text: str) -> int | float | str:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _split_complete_lines(data: bytes) -> tuple[list[str], int]:
    """Complete lines of `data` and the byte length they span (a torn tail is left out)."""
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8").splitlines(), end


class CertifyLog:
    """An append-only certification TSV that resumes after a crash; use as a context manager."""

    def __init__(self, path: str | os.PathLike, extra_columns: Sequence[str] = ()) -> None:
        self.path = os.fspath(path)
        self.columns = BASE_COLUMNS + tuple(extra_columns)
        for column in extra_columns:
            if not column or any(c in column for c in "\t\n\r"):
                raise ValueError(
                    f"extra column names must be non-empty without tabs, got {column!r}"
                )
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"log columns must be unique, got {list(self.columns)}")
        self._header = "\t".join(self.columns)
        # On gs://, the local file written here is the object's copy (module docstring).
        self._remote = storage.SyncedObject(self.path) if storage.is_gcs(self.path) else None
        local = self._remote.local_path if self._remote else self.path
        created = not os.path.exists(local)
        self._file = open(local, "a+b")  # noqa: SIM115 (closed in close())
        try:
            self._lock()
            self._done = self._recover()
            if self._remote:
                self._remote.sync(force=True)  # the header (or a cut torn line) in the bucket
        except BaseException:
            self.close()
            raise
        if created and not self._remote:
            storage.fsync_dir(self.path)

    def _lock(self) -> None:
        # Two runs appending to the same log would duplicate rows; part files avoid that for
        # multi-process runs, and this lock catches the accident of starting a run twice.
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockError(
                f"{self.path} is being written by another process: wait for it to finish, "
                "or certify into another --workdir") from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def _recover(self) -> set[int]:
        """Truncates a torn last line, checks the header and returns the logged indices."""
        self._file.seek(0)
        data = self._file.read()
        lines, complete = _split_complete_lines(data)
        if complete != len(data):
            self._file.truncate(complete)
        if not lines:
            self._write(self._header + "\n")
            return set()
        if lines[0] != self._header:
            raise LogFormatError(
                f"{self.path} has header {lines[0].split(chr(9))}, expected "
                f"{list(self.columns)}: resume with the same extra_columns or use a new log path"
            )
        done: set[int] = set()
        for number, line in enumerate(lines[1:], start=2):
            fields = line.split("\t")
            if len(fields) != len(self.columns):
                raise LogFormatError(
                    f"{self.path}:{number} has {len(fields)} fields, expected {len(self.columns)}"
                )
            idx = parse_int(fields[0], self.path, number, "idx")
            if idx in done:
                raise LogFormatError(f"{self.path}:{number} repeats idx {idx}")
            done.add(idx)
        return done

    def _write(self, text: str) -> None:
        """Appends `text` whole, or cuts the file back to where it was and raises DiskError."""
        fd = self._file.fileno()
        start = os.fstat(fd).st_size
        data = memoryview(text.encode("utf-8"))
        try:
            while data:
                written = os.write(fd, data)
                if written <= 0:
                    raise OSError(errno.ENOSPC, "no bytes written")
                data = data[written:]
            os.fsync(fd)
        except OSError as error:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # the torn tail is then the last line, which reopening removes
            reason = error.strerror or str(error)
            raise DiskError(
                error.errno, f"could not write to {self.path} ({reason}); its complete rows "
                "are kept: free space and rerun the same command to resume") from error

    def done_indices(self) -> set[int]:
        """Indices already in the log (a restarted run skips them)."""
        return set(self._done)

    def append(self, row: dict[str, Any]) -> None:
        """Writes one row (every column, nothing else) as one whole line, then fsyncs."""
        missing = [c for c in self.columns if c not in row]
        unexpected = [c for c in row if c not in self.columns]
        if missing or unexpected:
            raise ValueError(
                f"log row must have exactly the columns {list(self.columns)}; "
                f"missing {missing}, unexpected {unexpected}"
            )
        idx = int(row["idx"])
        if idx in self._done:
            raise ValueError(f"idx {idx} is already in {self.path}")
        values = dict(row)
        if isinstance(values["time"], int | float | np.integer | np.floating):
            values["time"] = format_time(values["time"])
        values["radius"] = float(values["radius"])
        self._write("\t".join(format_value(values[c]) for c in self.columns) + "\n")
        self._done.add(idx)
        if self._remote:
            self._remote.sync()

    def close(self) -> None:
        """Releases the lock and closes the file (on gs://, after uploading the last rows)."""
        self._file.close()
        if self._remote:
            self._remote.close()

    def __enter__(self) -> CertifyLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def parse_int(text: str, path: str, number: int, column: str) -> int:
    """An integer log field; anything else is a LogFormatError naming file, line and column."""
    try:
        return int(text)
    except ValueError:
        raise LogFormatError(
            f"{path}:{number}: column {column} must be an integer, got {text!r}") from None


def identity_path(log_path: str | os.PathLike) -> str:
    """Where the identity of a log's rows is recorded: `<log>.identity.json`."""
    return os.fspath(log_path) + ".identity.json"


def read_identity_record(log_path: str | os.PathLike) -> dict[str, Any] | None:
    """The whole identity record of a log ({"identity": ..., "notes": ...}), or None.

    A record that is not a JSON object with an "identity" object is an IdentityError: it is
    what says which configuration the rows were certified with, so a damaged one is not
    treated as a missing one.
    """
    path = identity_path(log_path)
    if not storage.exists(path):
        return None
    try:
        record = json.loads(storage.read_text(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        record = e
    if not isinstance(record, dict) or not isinstance(record.get("identity"), dict):
        why = record if isinstance(record, Exception) else "not an object with an identity"
        raise IdentityError(
            f"{path} is damaged ({why}), so which configuration certified the rows of "
            f"{os.fspath(log_path)} is unknown: restore the file from a copy, or certify "
            "anew with another --workdir or --config.log_name")
    return record


def read_identity(log_path: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded identity of a log ({field: value}), or None if none was recorded."""
    record = read_identity_record(log_path)
    return None if record is None else record["identity"]


def describe_identity(log_path: str | os.PathLike) -> str | None:
    """One line `field=value, ...` of a log's recorded identity, or None if none was recorded."""
    identity = read_identity(log_path)
    if identity is None:
        return None
    return ", ".join(f"{field}={value}" for field, value in sorted(identity.items()))


def write_identity(log_path: str | os.PathLike, identity: dict[str, Any],
                   notes: dict[str, Any] | None = None) -> str:
    """Records `identity` next to the log (atomically); `notes` are kept but never compared."""
    path = identity_path(log_path)
    record = {"identity": identity, "notes": notes or {}}
    try:
        storage.write_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    except OSError as error:
        raise DiskError(error.errno, f"could not write {path}: {error.strerror}") from error
    return path


def compare_identity(log_path: str | os.PathLike, recorded: dict[str, Any],
                     identity: dict[str, Any], *, hints: dict[str, str] | None = None) -> None:
    """Lets a run append to `log_path` only if its rows were made under `identity`.

    Every field must equal the `recorded` one, else IdentityError names the first differing
    field, the logged and the new value, and the way out (`hints[field]` says how to pass
    the old value). Writes nothing.
    """
    fresh = json.loads(json.dumps(identity, sort_keys=True, default=str))
    for field in sorted(set(recorded) | set(fresh)):
        old, new = recorded.get(field, "<absent>"), fresh.get(field, "<absent>")
        if old != new:
            hint = (hints or {}).get(field) or f"--config.{field}={_flag_value(old)}"
            raise IdentityError(
                f"{os.fspath(log_path)} holds rows certified with {field} = {old!r}, but this "
                f"run has {field} = {new!r}. To resume it, rerun with {hint}; to certify "
                "anew, use another --workdir or --config.log_name")


def _flag_value(value: Any) -> str:
    """`value` as a `--config.field=` command-line value (tuples as '(a,b)')."""
    if isinstance(value, list | tuple):
        return "'(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")'"
    return str(value)


def read_header_and_lines(
    path: str | os.PathLike, *, keep_final_line: bool = False
) -> tuple[list[str], list[str]]:
    """Header columns and complete data lines of a log; a torn last line is ignored.

    keep_final_line=True keeps a last line without a trailing newline when it has as many
    fields as the header (a log written by another tool, read as Cohen's analyze.py does).
    """
    data = storage.read_bytes(path)
    lines, end = _split_complete_lines(data)
    tail = data[end:].decode("utf-8", errors="replace")
    lines = [line for line in lines if line.strip()]
    if keep_final_line and tail.strip() and not lines:
        lines, tail = [tail], ""  # a header without its newline
    if not lines:
        raise LogFormatError(f"{os.fspath(path)} is empty; a log starts with a header line")
    split = (lambda s: s.split("\t")) if "\t" in lines[0] else (lambda s: s.split())
    if keep_final_line and tail.strip() and len(split(tail)) == len(split(lines[0])):
        lines.append(tail)
    return split(lines[0]), lines[1:]


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a certification log (ours, Cohen et al.'s, multi-scale's or Carlini et al.'s).

    Each row has int idx, label, predict, correct (= int(predict == label)), float radius,
    float time in seconds (when the log has it), and extra columns as int, float or str.
    """
    path = os.fspath(path)
    columns, lines = read_header_and_lines(path, keep_final_line=True)
    required = ("idx", "label", "predict", "radius")
    if any(c not in columns for c in required):
        raise LogFormatError(
            f"{path} must have the columns {list(required)}, got header {columns}")
    separator = "\t" if "\t" in "\t".join(columns) else None
    rows: list[dict[str, Any]] = []
    logged_correct: list[int] = []
    seen: set[int] = set()
    for number, line in enumerate(lines, start=2):
        fields = line.split("\t") if separator else line.split()
        if len(fields) != len(columns):
            raise LogFormatError(
                f"{path}:{number} has {len(fields)} fields, expected {len(columns)}")
        row: dict[str, Any] = {}
        for column, text in zip(columns, fields, strict=True):
            try:
                if column in _INT_COLUMNS:
                    row[column] = int(text)
                elif column == "radius":
                    row[column] = float(text)
                elif column == "time":
                    row[column] = parse_time(text)
                else:
                    row[column] = _parse_extra(text)
            except ValueError:
                raise LogFormatError(
                    f"{path}:{number}: column {column} cannot be read from {text!r}") from None
        if row["idx"] in seen:
            raise LogFormatError(f"{path}:{number} repeats idx {row['idx']}")
        seen.add(row["idx"])
        if "correct" in row:
            logged_correct.append(row["correct"])
        row["correct"] = int(row["predict"] == row["label"])
        rows.append(row)
    if "correct" in columns:
        _check_correct_column(path, logged_correct, [r["correct"] for r in rows])
    return rows


def _check_correct_column(path: str, logged: list[int], recomputed: list[int]) -> None:
    """The file's `correct` must be per-row 0/1 or (Carlini et al.) its running sum."""
    if logged == recomputed:
        return
    if logged == np.cumsum(recomputed, dtype=np.int64).tolist():
        return
    first = next(i for i, (a, b) in enumerate(zip(logged, recomputed, strict=True)) if a != b)
    raise LogFormatError(
        f"{path}: column correct is neither int(predict == label) per row nor its running "
        f"count (first mismatch at data row {first + 1}: {logged[first]} vs {recomputed[first]})"
    )

