"""Errors a user can fix: `main` prints each as one line, other exceptions keep their traceback.

Raise a subclass of `UserError` only where the message alone tells the user what to change
(a config value, a missing data set, an unreadable checkpoint, a busy workdir, a full disk);
a bug in our code or in a library must keep its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user fixes by changing the command, the config, the files or the disk."""


class ConfigError(UserError, ValueError):
    """A config field has a value the run cannot use."""


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
