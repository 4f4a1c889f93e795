r"""Denoise-and-classify on digits: the clean classifier, then certification behind a denoiser.

Carlini et al.'s premise in small: a classifier trained on clean images only, made robust by
a diffusion denoiser in front of it (one UNet for every sigma). Every 4th test image (74),
N0 = 100, N = 200, alpha = 0.001; minutes per sigma on 2 cores.

  # 1. The clean classifier (digits fine-tuning recipe at sigma = 0), e.g. from the digits
  #    pipeline's DMAE pretraining:
  python -m dmae_jax.main --config=configs/finetune_digits.py:sigma=0 \
      --workdir=runs/denoise/clf --config.init_from=runs/digits/pretrain/export
  # 2. The denoiser: configs/train_denoiser_digits.py. 3. Certify at one sigma, or the cascade:
  python -m dmae_jax.main --config=configs/denoise_certify_digits.py:stage=certify,sigma=0.5 \
      --workdir=runs/denoise/cert_before --config.checkpoint=runs/denoise/clf/export \
      --config.denoiser=runs/denoise/ddpm/export
  python -m dmae_jax.main --config=configs/denoise_certify_digits.py:stage=cascade \
      --workdir=runs/denoise/cert_before --config.checkpoint=runs/denoise/clf/export \
      --config.denoiser=runs/denoise/ddpm/export
  # 4. Calibrate (configs/calibrate_denoiser_digits.py) and certify again with the new denoiser.
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """stage=certify|cascade, sigma=... (certify), n=200, skip=4."""
    args = config_lib.parse_arg(arg, stage=config_lib.OneOf("certify", "cascade"), sigma=0.25,
                                n=200, skip=4)
    if args.stage == "certify":
        cfg = defaults.certify("digits", args.sigma, args.n)
    else:
        cfg = defaults.cascade("digits", (1.0, 0.5, 0.25), args.n)
    cfg.skip = args.skip
    cfg.denoiser_kind = "diffusion"
    return cfg
