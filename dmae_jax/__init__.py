"""dmae_jax: DMAE pretraining, smoothed-classifier fine-tuning and certification in JAX."""

__version__ = "0.1.0"
