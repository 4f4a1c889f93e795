"""Keeps third-party start-up chatter off the user's terminal.

Training and certification print their own progress, evaluation and report lines. What
libraries print besides (TensorFlow's C++ start-up lines, TFDS's "OpenCV is not
installed" and "no dataset_info.json" warnings) says nothing a user can act on; `install()`
turns those off, and `dmae_jax.main` calls it unless `--verbosity` is given. (TFDS's
escape-code progress bars are off wherever dmae_jax prepares a data set, see
`dmae_jax.data.digits.prepare` and `dmae_jax.prepare`.)
"""

from __future__ import annotations

import logging
import os

from absl import logging as absl_logging

# Messages (prefixes or fragments) of third-party log records that are dropped.
NOISE = (
    "OpenCV is not installed",  # TFDS decodes with PIL instead: same pixels.
    "has no dataset_info.json",  # TFDS, about a data set it is about to prepare.
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a record whose arguments do not fit its format
            message = str(record.msg)
        return not any(fragment in message for fragment in NOISE)


def install() -> None:
    """Silences TensorFlow's C++ logging and the NOISE log records (idempotent)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Libraries log through absl's logger or their own Python loggers; all of it reaches the
    # terminal through absl's handler, so the filter sits on both.
    for target in (absl_logging.get_absl_logger(), absl_logging.get_absl_handler()):
        if not any(isinstance(f, _DropNoise) for f in target.filters):
            target.addFilter(_DropNoise())
