"""Errors a user can fix, and how every entry point reports them: one line, exit status 2.

Raise a subclass of `UserError` only where the message alone tells the user what to change
(a config value, a missing data set, an unreadable checkpoint, a busy workdir, a full disk);
a bug in our code or in a library must keep its traceback. Every command (`main`, `report`,
`prepare`, `convert`, `diffusion.convert`, `aot`) runs under `reporting`, which prints
`error: <message>` on stderr and exits with status 2 for these, and lets anything else
raise.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class UserError(Exception):
    """A problem the user fixes by changing the command, the config, the files or the disk."""


class ConfigError(UserError, ValueError):
    """A config field (or a command-line argument) has a value the run cannot use."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model being built."""


class IdentityError(UserError, ValueError):
    """A run would resume a log or workdir that another configuration wrote."""


class LockError(UserError, RuntimeError):
    """Another live process is writing the same workdir or log."""


class DiskError(UserError, OSError):
    """A write did not reach the disk whole (disk full, quota, read-only file system)."""


class LogFormatError(UserError, ValueError):
    """A certification log line cannot be parsed; the message names the file and line."""


class LaunchError(UserError, RuntimeError):
    """The processes of a job cannot start together as the environment describes it."""


# ---------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------

_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# How a full disk reads once libraries have wrapped the OSError (TensorStore: the status code).
_DISK_FULL = ("No space left on device", "Disk quota exceeded", "RESOURCE_EXHAUSTED: Error writing")


def _is_disk_full(error: BaseException) -> bool:
    return (isinstance(error, OSError) and error.errno in _DISK_ERRNOS) or any(
        marker in str(error) for marker in _DISK_FULL)


def one_line(error: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None (keep the traceback).

    Our own errors derive from `UserError` (the innermost one is reported: config_flags
    re-raises a config file's error with the traceback text in its message); a full disk
    is recognised anywhere in the exception's chain, since libraries (Orbax, TensorStore)
    wrap the OSError. The chain is the one a traceback shows: `raise ... from None` ends it
    (a message that restates an inner error, e.g. with the field as the user names it).
    """
    message, chain, seen = None, error, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, UserError):
            message = " ".join(str(chain).split())
        elif message is None and isinstance(chain, OSError) and chain.errno in _DISK_ERRNOS:
            message = (f"cannot write to disk: {chain}; free space and rerun the same command "
                       "to resume")
        elif message is None and _is_disk_full(chain):
            message = ("cannot write to disk: No space left on device (or quota exceeded); "
                       "free space and rerun the same command to resume")
        chain = chain.__cause__ or (None if chain.__suppress_context__ else chain.__context__)
    return message


def exit_with(message: str) -> NoReturn:
    """Prints `error: <message>` on stderr and exits with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def reporting(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` where a user error is one `error:` line and exit status 2; bugs keep tracebacks."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            message = one_line(e)
            if message is None:
                raise
            exit_with(message)

    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands: a bad or missing argument is a ConfigError (one line under
    `reporting`) instead of argparse's usage text and exit status 2."""

    def __init__(self, **kwargs):
        self._required_flags: list[argparse.Action] = []
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (python -m {self.prog.removeprefix('python -m ')} "
                          "--help lists the arguments)")

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.required and action.option_strings:
            self._required_flags.append(action)
        return action

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):
        """argparse's, where an argument no flag of ours takes is named (`no_stray_arguments`),
        also when it left a required flag missing (`dataset=digits` for `--dataset=digits`)."""
        args = list(sys.argv[1:] if args is None else args)
        no_stray_arguments([a for a in args if a[:1] in _DASHES])
        try:
            parsed, extra = self.parse_known_args(args, namespace)
        except ConfigError:
            extra = self._not_taken(args)
            if not any(not a.startswith("-") for a in extra):
                raise
        # Named outside the handler: `one_line` reports the innermost error of a chain.
        no_stray_arguments([a for a in extra if not a.startswith("-")])
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def _not_taken(self, args: list[str]) -> list[str]:
        """The arguments no flag takes, parsing with the required flags made optional."""
        for action in self._required_flags:
            action.required = False
        try:
            return self.parse_known_args(args)[1]
        except ConfigError:
            return []
        finally:
            for action in self._required_flags:
                action.required = True


_DASHES = "\u2013\u2014\u2212"  # en dash, em dash, minus sign: what rendered docs show for --


def no_stray_arguments(arguments: Sequence[str]) -> None:
    """ConfigError naming any positional argument (every argument of ours is a --flag)."""
    if not arguments:
        return
    stray = arguments[0]
    dash = next((c for c in stray[:2] if c in _DASHES), None)
    if dash is not None:
        why = (f"it starts with {dash!r} (U+{ord(dash):04X}), not '--': pasted from rendered "
               "text? Type the two hyphens")
    elif "=" in stray or stray.startswith("config"):
        why = f"flags start with '--': --{stray.lstrip('-')}"
    else:
        why = "every argument is a --flag"
    more = f" (and {len(arguments) - 1} more)" if len(arguments) > 1 else ""
    raise ConfigError(f"unexpected argument {stray!r}{more}: {why}")


class _DiskFullReports(logging.Filter):
    """Drops what Orbax's, TensorStore's and asyncio's threads log about a full disk: the
    entry point says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return not any(marker in text for marker in _DISK_FULL)


def quiet_disk_full_reports() -> None:
    """Keeps a full disk to the one line `reporting` prints.

    When a checkpoint save fails for lack of space, Orbax's save threads log the error with
    its traceback, asyncio reports the failed tasks, and TensorStore completes its other
    writes into Orbax's closed event loop (each an unraisable `RuntimeError: Event loop is
    closed`): hundreds of lines in front of the one that says what happened.
    """
    quiet = _DiskFullReports()
    for name in ("absl", "asyncio", "orbax", ""):
        logging.getLogger(name).addFilter(quiet)
    sys.unraisablehook = without_disk_full_reports(sys.unraisablehook)
    threading.excepthook = without_disk_full_reports(threading.excepthook)


def without_disk_full_reports(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """`sys.unraisablehook` or `threading.excepthook` `hook`, silent for a full disk and for
    writes completed into a closed event loop (what a failed save leaves behind)."""

    def quiet_hook(report) -> None:
        error = report.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        if error is not None and _is_disk_full(error):
            return
        hook(report)

    return quiet_hook
