"""The tasks `python -m dmae_jax.main` runs: the trainers, certification, the digits pipeline."""
