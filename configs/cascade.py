r"""Multi-scale cascaded certification (Jeong & Shin, NeurIPS 2023) over several sigmas.

One classifier per sigma (our fine-tuned DMAE classifiers), aligned with sigmas:
  python -m dmae_jax.main --config=configs/cascade.py:dataset=digits --workdir=runs/casc \
      --config.checkpoints='("runs/ft_1.0/export","runs/ft_0.5/export","runs/ft_0.25/export")'
or one classifier behind a denoiser for every sigma:
  ... --config.checkpoint=runs/clean_clf/export --config.denoiser=runs/ddpm/export
Sigmas are visited from the largest down; p0 = 0.5; each of the K stages at alpha / K
(alpha_split=sound, the default: the cascade's certificate is wrong with probability at most
alpha); --config.alpha_split=official tests stage j at alpha / (j + 1) as the paper's code.
ImageNet (Resize(256) + CenterCrop(224), every 50th validation image in ImageFolder order)
and CIFAR-10 (all test images), bfloat16 compute on an accelerator:
  python -m dmae_jax.main --config=configs/cascade.py:dataset=imagenet2012,dtype=bfloat16 \
      --workdir=runs/casc_in --config.checkpoints='("f100/export","f050/export","f025/export")'
  python -m dmae_jax.main --config=configs/cascade.py:dataset=cifar10 --workdir=runs/casc_c10 \
      --config.checkpoints='("c10_100/export","c10_050/export","c10_025/export")'
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """dataset=imagenet2012|cifar10|digits, sigmas=1.0/0.5/0.25 ('/'-separated), n=...,
    dtype=float32|bfloat16 (the classifiers' compute dtype)."""
    args = config_lib.parse_arg(arg, dataset=config_lib.OneOf(*defaults.CERTIFY_PROTOCOLS),
                                sigmas=(1.0, 0.5, 0.25), n=0,
                                dtype=config_lib.OneOf("float32", "bfloat16"))
    cfg = defaults.cascade(args.dataset, args.sigmas, args.n)
    cfg.compute_dtype = args.dtype
    return cfg
