"""Config checks that fail at start with the field, the bad value and what is valid.

Each task validates its whole config before touching data or devices, so a typo in a pod
launch costs seconds, not a queue slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ml_collections

TASKS = (
    "pretrain",
    "finetune",
    "certify",
    "cascade",
    "train_denoiser",
    "finetune_denoiser",
    "pipeline",
)


class ConfigError(ValueError):
    """A config field has a value the run cannot use."""


def get(config: ml_collections.ConfigDict, field: str) -> Any:
    """`config.a.b.c` by dotted name, with a clear error when it is missing."""
    node = config
    for part in field.split("."):
        if not hasattr(node, part) and not (isinstance(node, dict) and part in node):
            raise ConfigError(f"config.{field} is missing")
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def positive(config, field: str, *, allow_zero: bool = False) -> None:
    """The field is a number > 0 (or >= 0)."""
    value = get(config, field)
    ok = isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config.{field} must be {bound}, got {value!r}")


def in_range(config, field: str, low: float, high: float, *, closed_high: bool = False) -> None:
    """The field lies in [low, high) (or [low, high])."""
    value = get(config, field)
    ok = isinstance(value, (int, float)) and low <= value and (
        value <= high if closed_high else value < high
    )
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ConfigError(f"config.{field} must be in [{low}, {high}{bracket}, got {value!r}")


def one_of(config, field: str, valid: Iterable[Any]) -> None:
    """The field is one of `valid`."""
    value = get(config, field)
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(f"config.{field} must be one of {list(valid)}, got {value!r}")


def sigmas(config, field: str) -> tuple[float, ...]:
    """A non-empty list of noise levels, each > 0."""
    value = get(config, field)
    if isinstance(value, (int, float)):
        value = (value,)
    value = tuple(value)
    if not value or any(not isinstance(s, (int, float)) or s <= 0 for s in value):
        raise ConfigError(f"config.{field} must be a non-empty list of sigmas > 0, got {value!r}")
    return tuple(float(s) for s in value)


def task(config) -> str:
    """The task name, checked."""
    one_of(config, "task", TASKS)
    return config.task


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """big_vision-style `--config=file.py:key=value,flag` argument parsing with types."""
    result = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, raw = item.partition("=")
        if key not in defaults:
            raise ConfigError(
                f"unknown config argument {key!r}; valid arguments: {sorted(defaults)}"
            )
        default = defaults[key]
        if not raw:
            result[key] = True
        elif isinstance(default, bool):
            result[key] = raw.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                result[key] = type(default)(raw)
            except ValueError as e:
                raise ConfigError(
                    f"config argument {key} must be a {type(default).__name__}, got {raw!r}"
                ) from e
        else:
            result[key] = raw
    return ml_collections.ConfigDict(result)
