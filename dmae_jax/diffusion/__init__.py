"""Diffusion denoisers: schedules, one-shot denoising, DDPM training objective."""
