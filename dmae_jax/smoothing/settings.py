"""The one settings object of the smoothing engine, checked once when it is built.

Every algorithm (CERTIFY and PREDICT, the multi-scale cascade, the sequential engine) and
the compile-only mode take a `Settings`: the noise level(s), the sample counts and alpha of
the protocol, and how the noisy samples are drawn (batch size, classes, dtype, devices,
float or sound noise). Its fields are checked in `__post_init__`, so an algorithm never
checks them again; every error names the field, its value and what is valid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# "float": x + sigma * N(0, I) in float32 (Cohen et al.; every paper's numbers).
# "sound": inputs quantised to k / levels and an exactly sampled rounded Gaussian added in
# integer arithmetic, with every bound rounded in the safe direction (module `sound`).
NOISES = ("float", "sound")


def check_positive_int(name: str, value: Any) -> None:
    """`value` is an int (not a bool, not a float) >= 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_alpha(alpha: Any, name: str = "alpha") -> None:
    """`alpha` is a number in (0, 1)."""
    if not isinstance(alpha, int | float | np.floating) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {alpha!r}")


def check_sigma(sigma: Any, name: str = "sigma") -> None:
    """`sigma` is a finite number > 0."""
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, int | float | np.floating)
        or not math.isfinite(float(sigma))
        or float(sigma) <= 0.0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {sigma!r}")


def check_num_classes(num_classes: Any) -> None:
    """`num_classes` is an int >= 2."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def _check_compute_dtype(compute_dtype: Any) -> None:
    if compute_dtype is None:
        return
    try:
        floating = jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ValueError(f"compute_dtype must be None or a floating dtype (e.g. jnp.bfloat16), "
                         f"got {compute_dtype!r}")


def _sigma_field(sigma: Any) -> float | tuple[float, ...]:
    """One noise level as a float, several (the cascade's) as a tuple of distinct floats."""
    if isinstance(sigma, Sequence | np.ndarray) and not isinstance(sigma, str):
        sigmas = list(sigma)
        if not sigmas:
            raise ValueError("sigma must hold at least one noise level, got []")
        for i, s in enumerate(sigmas):
            check_sigma(s, f"sigma[{i}]")
        if len(set(float(s) for s in sigmas)) != len(sigmas):
            raise ValueError(f"sigma must hold distinct noise levels, got {sigmas}")
        return tuple(float(s) for s in sigmas)
    check_sigma(sigma)
    return float(sigma)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What every smoothing algorithm samples with; the defaults are Cohen et al.'s protocol.

    sigma: the noise level (a tuple of several for the cascade, visited largest first);
    n0 / n: selection / estimation samples per image (the sequential engine: n is its cap);
    alpha: the probability that a certificate is wrong; batch_size: noisy samples per device
    step, split over `devices` (default: every local device); num_classes: classes of the
    logits; compute_dtype: the dtype the classifier sees (None: float32); noise: "float" or
    "sound" (see NOISES); levels: the sound noise's grid, inputs are k / levels.
    """

    sigma: float | tuple[float, ...]
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch_size: int
    num_classes: int
    compute_dtype: Any = None
    devices: tuple[jax.Device, ...] | None = None
    noise: str = "float"
    levels: int = 255

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", _sigma_field(self.sigma))
        check_positive_int("n0", self.n0)
        check_positive_int("n", self.n)
        check_alpha(self.alpha)
        check_positive_int("batch_size", self.batch_size)
        check_num_classes(self.num_classes)
        _check_compute_dtype(self.compute_dtype)
        devices = tuple(jax.local_devices() if self.devices is None else self.devices)
        if not devices:
            raise ValueError("devices must name at least one device, got an empty list")
        object.__setattr__(self, "devices", devices)
        if self.batch_size % len(devices):
            raise ValueError(
                f"batch_size must be a multiple of the number of devices ({len(devices)}) so "
                f"the noise samples split evenly, got {self.batch_size}")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}")
        check_positive_int("levels", self.levels)

    @property
    def sigmas(self) -> tuple[float, ...]:
        """Every noise level, in the order given."""
        return self.sigma if isinstance(self.sigma, tuple) else (self.sigma,)

    def one_sigma(self, algorithm: str) -> float:
        """The noise level of a single-sigma algorithm; several are an error naming it."""
        if isinstance(self.sigma, tuple):
            if len(self.sigma) == 1:
                return self.sigma[0]
            raise ValueError(f"{algorithm} takes one sigma, got {self.sigma} (the cascade "
                             f"takes several)")
        return self.sigma
