"""Config arguments, derived fields, and checks that name the field, the value and what is valid.

A config file parses its `:arg` with `parse_arg` (typed; unknown names are an error), the
task fills the fields derived from others with `resolve` when it starts (so
`--config.sigma=0.5` and `:sigma=0.5` mean the same), and each task validates its whole
config before touching data or devices, so a typo in a pod launch costs seconds, not a
queue slot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import ml_collections

from dmae_jax.errors import ConfigError

__all__ = [
    "ConfigError", "OneOf", "TASKS", "get", "in_range", "one_of", "parse_arg", "positive",
    "resolve", "save_resolved", "sigmas", "task", "training_loop", "image_size_fits_model",
    "mask_keeps_patches", "workdir_usable",
]

TASKS = (
    "pretrain",
    "finetune",
    "certify",
    "cascade",
    "train_denoiser",
    "calibrate_denoiser",
    "pipeline",
)


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


def save_resolved(config: ml_collections.ConfigDict, path: str | os.PathLike) -> str:
    """Writes the run's resolved config as JSON to `path` (process 0 only; atomic if local)."""
    import jax
    from etils import epath

    path = os.fspath(path)
    if jax.process_index() != 0:
        return path
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str) + "\n"
    if "://" in path:
        epath.Path(path).write_text(text)
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------
# Field checks.
# ---------------------------------------------------------------------------------------


def get(config: ml_collections.ConfigDict, field: str) -> Any:
    """`config.a.b.c` by dotted name, with a clear error when it is missing."""
    node = config
    for part in field.split("."):
        if not hasattr(node, part) and not (isinstance(node, dict) and part in node):
            raise ConfigError(f"config.{field} is missing")
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def positive(config, field: str, *, allow_zero: bool = False) -> None:
    """The field is a number > 0 (or >= 0)."""
    value = get(config, field)
    ok = _is_number(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config.{field} must be {bound}, got {value!r}")


def in_range(config, field: str, low: float, high: float, *, closed_high: bool = False) -> None:
    """The field lies in [low, high) (or [low, high])."""
    value = get(config, field)
    ok = _is_number(value) and low <= value and (
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
    if _is_number(value):
        value = (value,)
    value = tuple(value)
    if not value or any(not _is_number(s) or s <= 0 for s in value):
        raise ConfigError(f"config.{field} must be a non-empty list of sigmas > 0, got {value!r}")
    return tuple(float(s) for s in value)


def task(config) -> str:
    """The task name, checked."""
    one_of(config, "task", TASKS)
    return config.task


def training_loop(config) -> None:
    """The loop fields every trainer shares: step counts, periods, checkpoints kept."""
    for field in ("log_every_steps", "ckpt_every_steps", "keep_ckpts", "accum_steps"):
        value = get(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.{field} must be an integer >= 1, got {value!r}")
    value = get(config, "eval_every_steps")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"config.eval_every_steps must be an integer >= 1, or 0 for no evaluation, "
            f"got {value!r}")
    value = config.get("total_steps") or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"config.total_steps must be an integer >= 1, or 0 to train num_epochs, "
            f"got {value!r}")
    if not value:
        positive(config, "num_epochs")


def image_size_fits_model(config) -> None:
    """A valid ViT model block whose resolution is at least the input's (smaller is upsampled)."""
    from dmae_jax.models import vit

    vit.resolve_model_config(get(config, "model"))
    size, model_size = get(config, "data.image_size"), get(config, "model.img_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= model_size:
        raise ConfigError(
            f"config.data.image_size must be an integer in [1, config.model.img_size = "
            f"{model_size}] (smaller images are upsampled inside the model), got {size!r}")


def mask_keeps_patches(config) -> None:
    """DMAE's mask ratio leaves at least one visible patch: int(L * (1 - ratio)) >= 1."""
    in_range(config, "mask_ratio", 0.0, 1.0)
    num_patches = (get(config, "model.img_size") // get(config, "model.patch_size")) ** 2
    if int(num_patches * (1 - config.mask_ratio)) < 1:
        raise ConfigError(
            f"config.mask_ratio = {config.mask_ratio} keeps no patch visible out of "
            f"{num_patches}: it must be below {1 - 1 / num_patches}")


def workdir_usable(workdir: str) -> None:
    """The workdir is (or is created as) a directory this process can write (local paths)."""
    if not workdir:
        raise ConfigError("--workdir must name a directory, got ''")
    if "://" in workdir:
        return
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir={workdir} is a file, not a directory")
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror})") from None
