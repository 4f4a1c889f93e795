"""What a certification log's rows were produced by, so a resume never mixes two runs.

A log's identity is every resolved config field that changes its rows (task, sigma or
sigmas, N0, N, alpha, p0, mode, seed, data set, split, image size, skip, dtype, ...), with
each model export (classifier(s), denoiser) replaced by a fingerprint of its content: a
moved export still resumes, a retrained one does not. Left out are the fields that only
change speed or where things go (batch_size, log_name, data_dir) and `max`, which may grow
(a logged image outside the configured subset is refused instead).

`check` compares and writes nothing; `record` writes the identity once the run is accepted
(the run path, `dmae_jax.tasks.execute`, calls them in that order under the log's lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from etils import epath

from dmae_jax import config as config_lib
from dmae_jax import exports, storage
from dmae_jax.errors import IdentityError
from dmae_jax.smoothing import logs, runner

# Config fields that never change a log's rows, or that are compared otherwise.
NOT_IDENTITY = ("batch_size", "log_name", "data.data_dir", "max")
# Config fields that name model exports: compared by content, not by path.
EXPORT_FIELDS = ("checkpoint", "checkpoints", "denoiser")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fingerprint(directory: str | os.PathLike) -> str:
    """`sha256:<hex>` of an export directory's files (relative names and bytes, sorted)."""
    root = epath.Path(directory)
    digest = hashlib.sha256()
    files, pending = [], [root]
    while pending:
        for path in pending.pop().iterdir():
            (pending if path.is_dir() else files).append(path)
    for path in sorted(files, key=lambda p: str(p.relative_to(root))):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                digest.update(block)
        digest.update(b"\0")
    return f"sha256:{digest.hexdigest()[:32]}"


def certification_identity(
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, Any], dict[str, str]]:
    """(identity, paths): the log's identity and, per export field, the path as passed."""
    flat = config_lib.flatten(config.to_dict())
    identity = {k: v for k, v in flat.items() if k not in NOT_IDENTITY + EXPORT_FIELDS}
    paths: dict[str, str] = {}
    for field in EXPORT_FIELDS:
        value = flat.get(field)
        if isinstance(value, list | tuple):
            identity[field] = [fingerprint(p) for p in value]
            paths[field] = "(" + ",".join(f'"{p}"' for p in value) + ")"
        elif value:
            identity[field] = fingerprint(value)
            paths[field] = str(value)
        elif field in flat:
            identity[field] = value
    identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
    return identity, paths


def check(config: ml_collections.ConfigDict, log_path: str, *,
          warn: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """The identity record this run will write for `log_path`; writes nothing.

    IdentityError when the log has rows from another identity, when its identity record
    cannot be read (it is what says what the rows are: a damaged one is not a missing one),
    or when the log has rows and a config record but no identity record (one was deleted).
    A log with rows and no records at all (not written by dmae_jax) is adopted with a
    warning. Warns (stderr) when a classifier is certified at another sigma than it was
    fine-tuned at.
    """
    identity, paths = certification_identity(config)
    has_rows = bool(runner.logged_indices(log_path))  # the log and its part files
    recorded = logs.read_identity_record(log_path)
    if has_rows and recorded is None:
        if storage.exists(log_path + ".config.json"):
            raise IdentityError(
                f"{log_path} has rows and a config record but its identity record "
                f"{logs.identity_path(log_path)} is missing, so what its rows were certified "
                "with is unknown: restore that file, or certify anew with another --workdir "
                "or --config.log_name")
        warn(f"warning: {log_path} has rows but no identity record; assuming they come from "
             f"this run's configuration and recording it in {logs.identity_path(log_path)}")
    elif has_rows:
        old_paths = recorded.get("notes", {}).get("paths", {})
        hints = {field: f"--config.{field}={old_paths[field]} (the export it was certified "
                        "with)" for field in EXPORT_FIELDS if field in old_paths}
        logs.compare_identity(log_path, recorded["identity"], identity, hints=hints)
    _warn_on_sigma_mismatch(config, warn)
    return {"identity": identity, "notes": {"paths": paths}}


def record(log_path: str, record_: dict[str, Any]) -> None:
    """Writes the identity record `check` returned next to the log."""
    logs.write_identity(log_path, record_["identity"], record_["notes"])


def _warn_on_sigma_mismatch(config: ml_collections.ConfigDict,
                            warn: Callable[[str], None]) -> None:
    """A classifier fine-tuned at one sigma and certified at another (unless denoised)."""
    if config.get("denoiser"):
        return  # denoise-and-classify certifies a clean classifier on purpose
    if config.task == "certify":
        pairs = [(config.checkpoint, float(config.sigma), "config.checkpoint")]
    else:
        sigmas = [float(s) for s in config.sigmas]
        paths = list(config.get("checkpoints") or []) or [config.checkpoint] * len(sigmas)
        pairs = [(p, s, "config.checkpoints" if config.get("checkpoints") else
                  "config.checkpoint") for p, s in zip(paths, sigmas, strict=True)]
    for path, sigma, field in pairs:
        trained = exports.read_meta(path, kind="classifier", field=field).get("sigma")
        if trained is not None and float(trained) != sigma:
            warn(f"warning: {field} = {path} was fine-tuned at sigma = {float(trained)}, "
                 f"certified here at sigma = {sigma}")
