r"""Diffusion calibration on digits: fine-tune the DDPM against a frozen clean classifier.

Brier loss towards the label where the majority of M one-step denoisings is already right
("recoverable"), anti-consistency (the wrong majority class's smoothed confidence, squared)
where it is not, plus the DDPM loss on clean images; sigma from the cascade's set
{0.25, 0.5, 1.0}, one equal chunk of the batch per sigma (formulas:
dmae_jax/train/denoiser.py). About 2.3 s/step on 2 idle cores, 300 steps in ~12 minutes:

  python -m dmae_jax.main --config=configs/calibrate_digits.py --workdir=runs/denoise/calib \
      --config.denoiser=runs/denoise/ddpm/export --config.classifier=runs/denoise/clf/export

Eval prints, per sigma, majority-vote accuracy and the over-confident / over-smoothed rates
(vote share above / at most p0) on every eval_skip-th test image. On digits (clean ViT-mu
classifier, 97.6%; the configs/denoiser_digits.py UNet; every 2nd test image, N = 200) it
raised the cascade's ACR from 1.187 to 1.215 and its clean accuracy from 92.6% to 93.9%.
"""

import ml_collections

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """`runlocal` for a few-step smoke run."""
    args = config_lib.parse_arg(arg, runlocal=False)
    cfg = ml_collections.ConfigDict()
    cfg.task = "finetune_denoiser"
    cfg.seed = 0
    cfg.denoiser = ""             # UNet export to start from (train_denoiser or converted)
    cfg.classifier = ""           # frozen classifier export (trained on clean images)
    cfg.model = ml_collections.ConfigDict(dict(dtype="float32"))
    cfg.data = defaults.data("digits", image_size=16, augment="none", eval_split="test")
    cfg.sigmas = (0.25, 0.5, 1.0)
    cfg.num_noise_samples = 4     # M one-step denoisings per image and step
    cfg.lambda_brier = 1.0
    cfg.lambda_ac = 1.0
    cfg.lambda_mse = 1.0          # DDPM loss on the clean batch: keeps it a denoiser
    cfg.p0 = 0.5                  # eval only: the cascade's confidence threshold
    cfg.batch_size = 48           # distinct images per step: 16 per sigma, x M draws
    cfg.num_epochs = 0
    cfg.total_steps = 300
    cfg.accum_steps = 1
    cfg.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, warmup_steps=20))
    cfg.ema_decay = 0.0
    cfg.eval_batch_size = 152
    cfg.eval_noise_draws = 16
    cfg.eval_skip = 2
    cfg.log_every_steps = 25
    cfg.ckpt_every_steps = 100
    cfg.keep_ckpts = 2
    cfg.eval_every_steps = 150
    cfg.mesh = ml_collections.ConfigDict(dict(fsdp=1))
    if args.runlocal:
        cfg.update(total_steps=4, batch_size=12, num_noise_samples=2, log_every_steps=2,
                   ckpt_every_steps=2, eval_every_steps=4, eval_batch_size=16,
                   eval_noise_draws=2, eval_skip=37)
        cfg.optim.warmup_steps = 0
    return cfg
