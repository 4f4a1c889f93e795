"""Diffusion denoisers: schedules, one-shot denoising, DDPM training objective.

  schedule     DDPM noise schedules and t*(sigma) (plain NumPy)
  denoise      Carlini et al.'s one-shot denoiser, denoise-then-classify
  losses       the DDPM training objective (L_simple, L_hybrid)
  calibration  denoiser calibration against a fixed classifier (Jeong & Shin)
  loading      denoisers from parameter exports, for certification
  convert      the official PyTorch UNet checkpoints -> parameter exports

Import the module you need (`from dmae_jax.diffusion import denoise`): the package itself
imports nothing, so validation can read a schedule without importing JAX.
"""
