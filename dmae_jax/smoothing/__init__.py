"""Randomized smoothing: one sampling engine (`sampling`, `Settings`) under CERTIFY/PREDICT,
the multi-scale cascade and the sequential engine; resumable certification logs and runs."""

from dmae_jax.smoothing.certify import (
    ABSTAIN,
    LOG_COLUMNS,
    CertifyResult,
    certify,
    certify_detailed,
    lower_confidence_bound,
    make_certify_one,
    predict,
    radius_from_bound,
    recompute_at_alpha,
)
from dmae_jax.smoothing.logs import (
    BASE_COLUMNS,
    CertifyLog,
    format_sparse_counts,
    parse_counts,
    read_log,
)
from dmae_jax.smoothing.runner import merge_logs, part_path, remaining_indices, run_certification
from dmae_jax.smoothing.sampling import place_replicated, sample_counts, sample_counts_many
from dmae_jax.smoothing.settings import NOISES, Settings

__all__ = [
    "ABSTAIN",
    "BASE_COLUMNS",
    "CertifyLog",
    "CertifyResult",
    "LOG_COLUMNS",
    "NOISES",
    "Settings",
    "certify",
    "certify_detailed",
    "format_sparse_counts",
    "lower_confidence_bound",
    "make_certify_one",
    "merge_logs",
    "parse_counts",
    "part_path",
    "place_replicated",
    "predict",
    "radius_from_bound",
    "read_log",
    "recompute_at_alpha",
    "remaining_indices",
    "run_certification",
    "sample_counts",
    "sample_counts_many",
]
