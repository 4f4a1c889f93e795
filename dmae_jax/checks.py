"""Config checks that fail at start with the field, the bad value and what is valid.

Each task validates its whole config with these before touching data or devices, so a
typo in a pod launch costs seconds, not a queue slot.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import ml_collections

from dmae_jax.errors import ConfigError

__all__ = [
    "ConfigError", "TASKS", "get", "image_size_fits_model", "in_range", "mask_keeps_patches",
    "one_of", "positive", "sigmas", "task", "training_loop", "workdir_usable",
]

TASKS = (
    "pretrain",
    "finetune",
    "certify",
    "cascade",
    "train_denoiser",
    "calibrate_denoiser",
    "end_to_end",
)



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
    """The workdir is (or is created as) a directory, or a gs:// bucket, this process can write."""
    if not workdir:
        raise ConfigError("--workdir must name a directory, got ''")
    if "://" in workdir:
        from dmae_jax import storage

        storage.check_writable(workdir, "--workdir")
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
