"""Config arguments, the command line, derived fields: how a config file reads its `:arg`,
how `--config=FILE[:arg] --config.field=value` is parsed, how the run path fills in the
fields derived from others, and where the resolved config is saved.

A config file parses its `:arg` with `parse_arg` (typed; unknown names are an error); the
commands parse their flags with `flags_parser` (a bad file, `:arg`, field or stray argument
is one `error:` line); the run path fills the derived fields with `resolve` (so
`--config.sigma=0.5` and `:sigma=0.5` mean the same) and checks the result with
`dmae_jax.checks`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from absl import flags

from dmae_jax import errors, storage
from dmae_jax.errors import ConfigError

__all__ = ["ConfigError", "OneOf", "flags_parser", "parse_arg", "resolve", "save_resolved",
           "stage"]

# ---------------------------------------------------------------------------------------
# `--config=file.py:arg` parsing.
# ---------------------------------------------------------------------------------------


class OneOf:
    """A `:arg` default that takes one of a fixed set of strings; the first is the default."""

    def __init__(self, *choices: str):
        if not choices:
            raise ValueError("OneOf needs at least one choice")
        self.choices = tuple(choices)

    def __repr__(self) -> str:
        return "|".join(self.choices)


def _describe(name: str, default: Any) -> str:
    if isinstance(default, OneOf):
        return f"{name}={default!r}"
    if isinstance(default, bool):
        return f"{name}[=true|false]"
    if isinstance(default, tuple):
        return f"{name}=" + "/".join(str(v) for v in default)
    return f"{name}=<{type(default).__name__}>"


def _convert(name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
        raise ConfigError(f"config argument {name} must be true or false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(
            f"config argument {name} must be a {kind.__name__}, got {raw!r}") from None


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `--config=file.py:key=value,flag` into the declared, typed arguments.

    Each keyword declares one argument by its default: a bool (`flag` alone means True), an
    int, a float, a str, a `OneOf(...)` (one of its choices, the first by default) or a
    non-empty tuple (values separated by '/', each of the first element's type). An unknown
    name, a repeated name or a value of the wrong type is a ConfigError naming it.
    """
    result = {k: (v.choices[0] if isinstance(v, OneOf) else v) for k, v in defaults.items()}
    usage = ", ".join(_describe(k, v) for k, v in defaults.items()) or "none"
    seen: set[str] = set()
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        key, has_value, raw = (part.strip() for part in item.partition("="))
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r}; valid arguments: {usage}")
        if key in seen:
            raise ConfigError(f"config argument {key} is given twice in {arg!r}")
        seen.add(key)
        default = defaults[key]
        if not has_value:
            if not isinstance(default, bool):
                raise ConfigError(
                    f"config argument {key} needs a value ({_describe(key, default)})")
            result[key] = True
        elif isinstance(default, OneOf):
            if raw not in default.choices:
                raise ConfigError(
                    f"config argument {key} must be one of {list(default.choices)}, "
                    f"got {raw!r}")
            result[key] = raw
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else str
            values = tuple(_convert(key, v, kind) for v in raw.split("/") if v)
            if not values:
                raise ConfigError(f"config argument {key} needs at least one value, got {raw!r}")
            result[key] = values
        elif isinstance(default, bool | int | float):
            result[key] = _convert(key, raw, type(default))
        else:
            result[key] = raw
    return ml_collections.ConfigDict(result)


# ---------------------------------------------------------------------------------------
# The command line: --config=FILE[:arg] --config.field=value.
# ---------------------------------------------------------------------------------------


def _config_path(argv: list[str]) -> str:
    """The file of `--config=FILE[:arg]` in `argv`, or "?"."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return "?"


def _flag_error(error: Exception, argv: list[str]) -> str | None:
    """One line for a bad --config file, :arg or --config.field or flag, or None (not ours)."""
    message = errors.one_line(error)
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
    if "No such file or directory" in str(error):
        return f"--config: no such config file {_config_path(argv)!r}"
    return None


def flags_parser(config_flag) -> Callable[[list[str]], list[str]]:
    """absl's `flags_parser` for `app.run`: parses argv, loads the config file of
    `config_flag`; a bad file, `:arg`, `--config.field`, flag value or stray argument is one
    `error:` line and exit status 2 (an error inside a config file's own code keeps its
    traceback)."""

    def parse(argv: list[str]) -> list[str]:
        try:
            path = _config_path(argv)
            if os.path.isdir(path):
                raise ConfigError(f"--config={path} is a directory; name a config file in "
                                  "it, e.g. --config=configs/digits.py")
            remaining = flags.FLAGS(argv)
            if config_flag.value is not None:
                config_flag.value.get("task")  # raises here when the config failed to load
            errors.no_stray_arguments(remaining[1:])
            return remaining
        except Exception as e:  # noqa: BLE001 - absl and config_flags raise many kinds
            message = _flag_error(e, argv)
            if message is None:
                raise
            errors.exit_with(message)

    return parse


# ---------------------------------------------------------------------------------------
# Derived fields, filled by the task when it starts.
# ---------------------------------------------------------------------------------------


def _finetune_eta(cfg: ml_collections.ConfigDict) -> None:
    # The official per-sigma entropy weight: eta = 0.1 at sigma >= 1.0, else 0.5.
    if cfg.get("eta") is None:
        cfg.eta = 0.1 if cfg.sigma >= 1.0 else 0.5


def _certify_log_name(cfg: ml_collections.ConfigDict) -> None:
    if not cfg.get("log_name"):
        cfg.log_name = f"certify_sigma_{cfg.sigma}.tsv"


def _cascade_log_name(cfg: ml_collections.ConfigDict) -> None:
    if not cfg.get("log_name"):
        cfg.log_name = "cascade_" + "_".join(str(s) for s in cfg.sigmas) + ".tsv"


_RESOLVERS = {
    "finetune": _finetune_eta,
    "certify": _certify_log_name,
    "cascade": _cascade_log_name,
}


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with its derived fields filled (values the user set are kept).

    finetune: `eta` (None: 0.1 at sigma >= 1.0, else 0.5, the official values);
    certify: `log_name` ("": certify_sigma_<sigma>.tsv); cascade: `log_name` (""):
    cascade_<sigma>_<sigma>....tsv). Other tasks have no derived fields.
    """
    cfg = ml_collections.ConfigDict(config.to_dict())
    resolver = _RESOLVERS.get(cfg.get("task"))
    if resolver is not None:
        resolver(cfg)
    return cfg


def stage(block: ml_collections.ConfigDict, *, drop: tuple[str, ...] = (),
          **updates: Any) -> ml_collections.ConfigDict:
    """One stage of a pipeline config: a copy of its `block` less `drop`, with `updates`,
    resolved (so a value the user set in the block is kept and derived ones follow)."""
    cfg = ml_collections.ConfigDict(block.to_dict())
    for key in drop:
        del cfg[key]
    for key, value in updates.items():
        cfg[key] = value
    return resolve(cfg)


def save_resolved(config: ml_collections.ConfigDict, path: str | os.PathLike) -> str:
    """Writes the run's resolved config as JSON to `path`, atomically (local or gs://); the
    run path calls it on process 0."""
    path = os.fspath(path)
    storage.write_atomic(path, json.dumps(config.to_dict(), indent=2, sort_keys=True,
                                          default=str) + "\n")
    return path


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"a.b.c": value}, the dotted names `--config.a.b.c` takes."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
