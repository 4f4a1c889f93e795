r"""Denoiser calibration (task calibrate_denoiser) on digits, against a fixed clean classifier.

Brier loss towards the label where the majority of M one-step denoisings is already right
("recoverable"), anti-consistency (the wrong majority class's smoothed confidence, squared)
where it is not, plus the DDPM loss on clean images; sigma from the cascade's set
{0.25, 0.5, 1.0}, one equal chunk of the batch per sigma (formulas:
dmae_jax/diffusion/calibration.py). About 2.3 s/step on 2 idle cores, 300 steps in ~12 minutes:

  python -m dmae_jax.main --config=configs/calibrate_denoiser_digits.py \
      --workdir=runs/denoise/calib --config.denoiser=runs/denoise/ddpm/export \
      --config.classifier=runs/denoise/clf/export

Eval prints, per sigma, majority-vote accuracy and the over-confident / over-smoothed rates
(vote share above / at most p0) on every eval_skip-th test image. On digits (clean ViT-mu
classifier, 97.6%; the configs/train_denoiser_digits.py UNet; every 2nd test image, N = 200) it
raised the cascade's ACR from 1.187 to 1.215 and its clean accuracy from 92.6% to 93.9%.
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """runlocal: a few-step smoke run."""
    args = config_lib.parse_arg(arg, runlocal=False)
    cfg = defaults.digits_calibrate_denoiser()
    if args.runlocal:
        cfg.update(total_steps=4, batch_size=12, num_noise_samples=2, log_every_steps=2,
                   ckpt_every_steps=2, eval_every_steps=4, eval_batch_size=16,
                   eval_noise_draws=2, eval_skip=37)
        cfg.optim.warmup_steps = 0
    return cfg
