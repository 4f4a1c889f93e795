"""What a certification log's rows were produced by, so a resume never mixes two runs.

A log's identity is every resolved config field that changes its rows (task, sigma or
sigmas, N0, N, alpha, p0, mode, seed, data set, split, image size, skip, dtype, ...), with
each model export (classifier(s), denoiser) replaced by a fingerprint of its content: a
moved export still resumes, a retrained one does not. Left out are the fields that only
change speed or where things go (batch_size, log_name, data_dir) and `max`, which may grow
(rows outside the subset are refused by the runner instead).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from dmae_jax import config as config_lib
from dmae_jax.smoothing import logs

# Config fields that never change a log's rows, or that are compared otherwise.
NOT_IDENTITY = ("batch_size", "log_name", "data.data_dir", "max")
# Config fields that name model exports: compared by content, not by path.
EXPORT_FIELDS = ("checkpoint", "checkpoints", "denoiser")


def fingerprint(directory: str | os.PathLike) -> str:
    """`sha256:<hex>` of an export directory's files (relative names and bytes, sorted)."""
    from etils import epath

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
    """(identity, hints): the log's identity and, per export field, how to pass the old one."""
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


def check_log(config: ml_collections.ConfigDict, log_path: str, *,
              warn: Callable[[str], None] = print) -> dict[str, Any]:
    """Records or enforces the identity of `log_path` for this run; warns on a sigma mismatch.

    Raises IdentityError when the log has rows from another identity. Returns the identity.
    """
    from dmae_jax.smoothing import runner

    identity, paths = certification_identity(config)
    record = logs.read_identity_record(log_path) or {}
    old_paths = record.get("notes", {}).get("paths", {})
    hints = {field: f"--config.{field}={old_paths[field]} (the export it was certified with)"
             for field in EXPORT_FIELDS if field in old_paths}
    logs.check_identity(log_path, identity, has_rows=bool(runner.logged_indices(log_path)),
                        notes={"paths": paths}, hints=hints, warn=warn)
    _warn_on_sigma_mismatch(config, warn)
    return identity


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
        trained = _export_sigma(path)
        if trained is not None and trained != sigma:
            warn(f"warning: {field} = {path} was fine-tuned at sigma = {trained}, "
                 f"certified here at sigma = {sigma}")


def _export_sigma(path: str) -> float | None:
    from etils import epath

    meta = epath.Path(path) / "meta.json"
    if not meta.exists():
        return None
    sigma = json.loads(meta.read_text()).get("sigma")
    return None if sigma is None else float(sigma)
