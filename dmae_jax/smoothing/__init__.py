"""Randomized smoothing: Monte Carlo PREDICT/CERTIFY, resumable certification logs and runs."""

from dmae_jax.smoothing.certify import (
    ABSTAIN,
    LOG_COLUMNS,
    CertifyResult,
    certify,
    certify_detailed,
    lower_confidence_bound,
    make_certify_one,
    place_replicated,
    predict,
    radius_from_bound,
    sample_counts,
    sample_counts_many,
)
from dmae_jax.smoothing.logs import (
    BASE_COLUMNS,
    CertifyLog,
    format_sparse_counts,
    parse_counts,
    read_log,
)
from dmae_jax.smoothing.runner import merge_logs, part_path, remaining_indices, run_certification

__all__ = [
    "ABSTAIN",
    "BASE_COLUMNS",
    "CertifyLog",
    "CertifyResult",
    "LOG_COLUMNS",
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
    "remaining_indices",
    "run_certification",
    "sample_counts",
    "sample_counts_many",
]
