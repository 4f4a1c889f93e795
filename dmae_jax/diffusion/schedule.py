"""DDPM noise schedules (float64 numpy, as improved/guided-diffusion) and sigma -> timestep.

Plain NumPy: validation checks a UNet's sigmas against its schedule before JAX is imported.

x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t = 0 .. T-1 (t = 0 is one step
of noise, as in the official code).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Ho et al.'s linear betas, rescaled so any T behaves like T = 1000: [T] float64."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, betas clipped at max_beta: [T] float64."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ],
        dtype=np.float64,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionSchedule:
    """Every per-timestep coefficient the denoiser and the DDPM loss use, each [T] float64."""

    name: str
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @property
    def num_timesteps(self) -> int:
        """T."""
        return int(self.betas.shape[0])


def make_schedule(name: str, num_timesteps: int) -> DiffusionSchedule:
    """The "linear" or "cosine" schedule with T = num_timesteps steps."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if name == "linear":
        betas = linear_betas(num_timesteps)
    elif name == "cosine":
        betas = cosine_betas(num_timesteps)
    else:
        raise ValueError(f"noise schedule must be 'linear' or 'cosine', got {name!r}")
    # The official create_gaussian_diffusion always wraps the schedule in SpacedDiffusion,
    # which (even keeping every step) recomputes betas from alphas_cumprod; doing the same
    # round trip makes every coefficient, and so t*, bit-identical to theirs.
    abar = np.cumprod(1.0 - betas)
    betas = 1.0 - abar / np.append(1.0, abar[:-1])
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    return DiffusionSchedule(
        name=name,
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
        posterior_variance=posterior_variance,
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        posterior_log_variance_clipped=np.log(
            np.append(posterior_variance[1], posterior_variance[1:])
        ),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )


def timestep_for_sigma(schedule: DiffusionSchedule, sigma: float) -> tuple[int, float]:
    """(t*, sqrt(alpha_bar_t*)): the first t with sqrt(alpha_bar_t) <= 1 / sqrt(1 + 4 sigma^2).

    sigma is the smoothing noise std in [0, 1]-pixel units. In the model's [-1, 1] space the
    noise is 2 sigma, and x_t / sqrt(alpha_bar_t) = x_0 + s_t eps with
    s_t = sqrt(1 / alpha_bar_t - 1), so t* is the first step whose noise level s_t reaches
    2 sigma (Jeong & Shin's `find_timestep`; Carlini et al.'s loop gives the same t*).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    target = 1.0 / math.sqrt(1.0 + (2.0 * sigma) ** 2)
    hits = np.nonzero(schedule.sqrt_alphas_cumprod <= target)[0]
    if hits.size == 0:
        # The official loop silently falls back to t = T-1 here; we refuse instead, since the
        # denoiser would then be told a smaller noise level than the true one.
        s_max = float(schedule.sqrt_recipm1_alphas_cumprod[-1]) / 2.0
        raise ValueError(
            f"sigma = {sigma} exceeds the largest noise level of this {schedule.name} "
            f"schedule (T = {schedule.num_timesteps}): sigma must be <= {s_max:.4g}"
        )
    t_star = int(hits[0])
    return t_star, float(schedule.sqrt_alphas_cumprod[t_star])

