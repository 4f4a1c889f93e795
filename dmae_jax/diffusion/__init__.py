"""Diffusion denoisers: schedules, one-shot denoising, DDPM training objective."""

from dmae_jax.diffusion.denoise import (
    DenoisedClassifier,
    DiffusionDenoiser,
    denoise_then_classify,
    make_diffusion_denoise_fn,
    one_shot_denoise,
)
from dmae_jax.diffusion.losses import ddpm_loss, ddpm_loss_terms
from dmae_jax.diffusion.schedule import (
    DiffusionSchedule,
    make_schedule,
    model_timestep,
    timestep_for_sigma,
)

__all__ = [
    "DenoisedClassifier",
    "DiffusionDenoiser",
    "DiffusionSchedule",
    "ddpm_loss",
    "ddpm_loss_terms",
    "denoise_then_classify",
    "make_diffusion_denoise_fn",
    "make_schedule",
    "model_timestep",
    "one_shot_denoise",
    "timestep_for_sigma",
]
