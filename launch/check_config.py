"""A run's config checked where the run is launched from, before any machine is asked for.

  python launch/check_config.py --config=configs/NAME.py[:arg] [--config.field=value ...]

Loads the config with its overrides and runs the checks `dmae_jax.main` runs before it starts
a task (the task's name, its derived fields, the task's `validate`), so a mistyped
`--config.field` or a bad value costs seconds on the launcher instead of a slice. Prints
`config ok: task NAME` and exits 0, or prints main's one `error:` line and exits 2. It writes
nothing and starts no computation; it reads what validation reads (the exports a config names,
so a `gs://` export needs the launcher's credentials for the bucket).
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app

from dmae_jax import checks
from dmae_jax import config as config_lib
from dmae_jax import main as entry  # --config and the one-line error messages: main's own


def check(argv) -> None:
    """The checks `dmae_jax.main` makes before it starts the config's task."""
    del argv
    config = entry._CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/NAME.py is required")
    from dmae_jax import quiet

    quiet.install()
    task = checks.task(config)
    config = config_lib.resolve(config)
    importlib.import_module(entry._RUNNERS[task]).validate(config)
    print(f"config ok: task {task}", flush=True)


def _checked(argv) -> None:
    try:
        check(argv)
    except Exception as e:
        message = entry._user_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(_checked, flags_parser=entry._parse_flags)
