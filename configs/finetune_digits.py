r"""Smoothed-classifier fine-tuning on digits (2 CPU cores), the official CIFAR-10 recipe.

From a DMAE export (e.g. the digits pipeline's pretraining) or from scratch:
  python -m dmae_jax.main --config=configs/finetune_digits.py:sigma=0.5 \
      --workdir=runs/ft_digits_050 --config.init_from=runs/digits/pretrain/export
sigma=0 trains a clean classifier (one copy, no consistency term), the classifier that
denoise-and-classify puts behind a denoiser.
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """sigma=0.25|0.5|1.0|0 (clean)."""
    args = config_lib.parse_arg(arg, sigma=0.25)
    cfg = defaults.digits_finetune(args.sigma)
    if args.sigma == 0:
        cfg.num_noise_samples, cfg.con_reg = 1, False
    return cfg
