"""A run's config checked where the run is launched from, before any machine is asked for.

  python launch/check_config.py --config=configs/NAME.py[:arg] [--config.field=value ...]

Loads the config with its overrides as `dmae_jax.main` does (`config.flags_parser`) and runs
the first steps of the run path, `dmae_jax.tasks.prepare` (the task's name, its derived
fields, every field of the task), so a mistyped `--config.field` or a bad value costs
seconds on the launcher instead of a slice. Prints `config ok: task NAME` and exits 0, or
prints main's one `error:` line and exits 2. It writes nothing and starts no computation; it
reads what validation reads (the meta.json of the exports a config names, so a `gs://`
export needs the launcher's credentials for the bucket).
"""

from __future__ import annotations

import os

from absl import app
from ml_collections import config_flags

from dmae_jax import config as config_lib
from dmae_jax import errors, quiet, tasks
from dmae_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to the config file.",
                                          lock_config=True)


@errors.reporting
def check(argv) -> None:
    """The checks `dmae_jax.main` makes before it starts the config's task."""
    del argv
    config = _CONFIG.value
    if config is None:
        raise ConfigError("--config=configs/NAME.py is required")
    quiet.install()
    task, _ = tasks.prepare(config)
    print(f"config ok: task {task.name}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(check, flags_parser=config_lib.flags_parser(_CONFIG))
