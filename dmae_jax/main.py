r"""Entry point: `python -m dmae_jax.main --config=configs/NAME.py[:arg] --workdir=DIR`.

Parses the ml_collections config (overrides as `--config.key=value`), joins the other
processes of a multi-host job, and runs `config.task`:

  pretrain            DMAE pretraining (dmae_jax/tasks/pretrain.py)
  finetune            smoothed-classifier fine-tuning / linear probing (tasks/finetune.py)
  certify             Cohen et al. CERTIFY over a data set (tasks/certification.py)
  cascade             multi-scale cascaded certification (tasks/certification.py)
  train_denoiser      DDPM training of a diffusion denoiser (tasks/train_denoiser.py)
  calibrate_denoiser  denoiser calibration against a fixed classifier (tasks/calibrate_denoiser.py)
  end_to_end          the whole digits pipeline end to end (tasks/end_to_end.py)
"""

from __future__ import annotations

import errno
import importlib
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dmae_jax import checks
from dmae_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to the config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and reports go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process GPU/CPU runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

_RUNNERS = {
    "pretrain": "dmae_jax.tasks.pretrain",
    "finetune": "dmae_jax.tasks.finetune",
    "certify": "dmae_jax.tasks.certification",
    "cascade": "dmae_jax.tasks.certification",
    "train_denoiser": "dmae_jax.tasks.train_denoiser",
    "calibrate_denoiser": "dmae_jax.tasks.calibrate_denoiser",
    "end_to_end": "dmae_jax.tasks.end_to_end",
}
_TRAINERS = ("pretrain", "finetune", "train_denoiser", "calibrate_denoiser")


def main(argv) -> None:
    """Checks the workdir and config, initialises distributed JAX, dispatches the task."""
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/NAME.py is required")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir=DIR is required (checkpoints and logs go there)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not flags.FLAGS["verbosity"].present:
        # Progress, evaluation and reports are printed; absl INFO (Orbax's per-save chatter)
        # only with --verbosity=0.
        logging.set_verbosity(logging.WARNING)
        from dmae_jax import quiet

        quiet.install()
    checks.workdir_usable(_WORKDIR.value)
    task = checks.task(config)
    config = config_lib.resolve(config)
    module = importlib.import_module(_RUNNERS[task])
    module.validate(config)

    from dmae_jax import parallel

    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("task %s, workdir %s\n%s", task, _WORKDIR.value, config)
    if task in _TRAINERS or task == "end_to_end":
        # One training run per workdir: a second one stops here, before it writes anything.
        from dmae_jax.storage import WorkdirLock

        with WorkdirLock(_WORKDIR.value):
            config_lib.save_resolved(config, os.path.join(_WORKDIR.value, "config.json"))
            module.run(config, _WORKDIR.value)
        return
    config_lib.save_resolved(config, os.path.join(_WORKDIR.value, "config.json"))
    module.run(config, _WORKDIR.value)


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# How a full disk reads once libraries have wrapped the OSError (TensorStore: the status code).
_DISK_FULL = ("No space left on device", "Disk quota exceeded", "RESOURCE_EXHAUSTED: Error writing")


class _DiskFullReports(std_logging.Filter):
    """Drops the tracebacks Orbax's save threads log for a full disk: main says it once."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno < std_logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return not any(marker in text for marker in _DISK_FULL)


def _without_closed_loop_reports(hook):
    """sys.unraisablehook minus TensorStore's write completions into a closed event loop.

    When a checkpoint save fails (a full disk), Orbax closes its asyncio loop while
    TensorStore still completes the other writes; each completion is reported as an
    unraisable `RuntimeError: Event loop is closed`, hundreds of tracebacks in front of the
    one line that says what happened.
    """

    def unraisablehook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        hook(unraisable)

    return unraisablehook


def _user_error(error: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None (keep the traceback).

    Our own errors derive from `UserError` (the innermost one is reported: config_flags
    re-raises a config file's error with the traceback text in its message); a full disk
    is recognised anywhere in the exception's chain, since libraries (Orbax, TensorStore)
    wrap the OSError.
    """
    from dmae_jax.errors import UserError

    message, chain, seen = None, error, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, UserError):
            message = str(chain)
        elif message is None and isinstance(chain, OSError) and chain.errno in _DISK_ERRNOS:
            message = f"cannot write to disk: {chain}"
        elif message is None and any(marker in str(chain) for marker in _DISK_FULL):
            message = ("cannot write to disk: No space left on device (or quota exceeded); "
                       "free space and rerun the same command to resume")
        chain = chain.__cause__ or chain.__context__
    return message


def _config_path(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return "?"


def _flag_error(error: Exception, argv: list[str]) -> str | None:
    """One line for a bad --config file, :arg or --config.field, or None (not ours)."""
    message = _user_error(error)
    if message is not None:
        return message
    if isinstance(error, AttributeError | KeyError):
        # ml_collections' error for a --config.field the config does not have.
        field = str(error).split("\\n")[0].split("\n")[0].strip("'\"\\")
        flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                     and a.split("=", 1)[0].endswith("." + field)), f"--config.{field}")
        close = re.search(r'Did you mean "([^"]+)"', str(error))
        hint = f"; did you mean {close.group(1)!r}?" if close else ""
        return f"{flag}: the config has no field {field!r}{hint}"
    if isinstance(error, flags.Error) and "\n" not in str(error).strip():
        return str(error)
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a bad config file, :arg or field is one line on stderr."""
    try:
        remaining = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            _CONFIG.value.get("task")  # raises here when the config file failed to load
        return remaining
    except Exception as e:
        message = _flag_error(e, argv)
        if message is None and "No such file or directory" in str(e):
            message = f"--config: no such config file {_config_path(argv)!r}"
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def _guarded(argv) -> None:
    """main, with the project's user-facing errors as one line on stderr and exit status 2."""
    try:
        main(argv)
    except Exception as e:
        message = _user_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def _run() -> None:
    std_logging.getLogger("absl").addFilter(_DiskFullReports())
    sys.unraisablehook = _without_closed_loop_reports(sys.unraisablehook)
    app.run(_guarded, flags_parser=_parse_flags)


if __name__ == "__main__":
    _run()
