r"""Entry point: `python -m dmae_jax.main --config=configs/NAME.py[:arg] --workdir=DIR`.

Parses the ml_collections config (overrides as `--config.key=value`), resolves and validates
it (`dmae_jax.tasks.prepare`), joins the other processes of a multi-host job, and runs
`config.task` through the run path (`dmae_jax.tasks.execute`: lock, check, record, run).
The tasks are listed in `dmae_jax.tasks`.

Anything the user can fix (a bad value, a mistyped flag, a stray argument, a busy workdir, a
full disk) is one `error: ...` line on stderr and exit status 2; a bug keeps its traceback.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from dmae_jax import config as config_lib
from dmae_jax import errors, quiet
from dmae_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to the config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and reports go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process GPU/CPU runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv) -> None:
    """Validates the config and workdir, initialises distributed JAX, runs the task."""
    del argv
    config = _CONFIG.value
    if config is None:
        raise ConfigError("--config=configs/NAME.py is required")
    if not _WORKDIR.value:
        raise ConfigError("--workdir=DIR is required (checkpoints and logs go there)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not flags.FLAGS["verbosity"].present:
        # Progress, evaluation and reports are printed; absl INFO (Orbax's per-save chatter)
        # only with --verbosity=0.
        logging.set_verbosity(logging.WARNING)
        quiet.install()
    # Imported in stages, each once the previous one has passed: neither parsing the flags
    # nor validation (the models' rules are plain Python, `dmae_jax.architectures`) imports
    # JAX, so a bad value costs about a second; the run path imports JAX, Orbax, SciPy and the
    # task's libraries.
    from dmae_jax import tasks

    task, config = tasks.prepare(config, _WORKDIR.value)
    from dmae_jax import parallel
    from dmae_jax.tasks import execute

    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    execute.execute(task, config, _WORKDIR.value)


def _run() -> None:
    from dmae_jax import host

    host.configure()  # before JAX starts its threads
    errors.quiet_disk_full_reports()
    app.run(errors.reporting(main), flags_parser=config_lib.flags_parser(_CONFIG))


if __name__ == "__main__":
    _run()
