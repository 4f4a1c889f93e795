r"""Certification (Cohen et al. CERTIFY) of an exported classifier over a data set.

The papers' protocols (alpha = 0.001, N0 = 100):
  ImageNet: every 50th validation image (1000 images), N = 10,000:
    python -m dmae_jax.main --config=configs/certify.py:dataset=imagenet2012,sigma=0.5 \
        --workdir=runs/cert_in_050 --config.checkpoint=runs/ft_base_050/export
  CIFAR-10: all 10,000 test images, N = 100,000:
    python -m dmae_jax.main --config=configs/certify.py:dataset=cifar10,sigma=0.25 \
        --workdir=runs/cert_c10_025 --config.checkpoint=runs/ft_c10_025/export
  digits (CPU): every second test image (148), N = 500:
    python -m dmae_jax.main --config=configs/certify.py:dataset=digits,sigma=0.25 \
        --workdir=runs/digits/certify --config.checkpoint=runs/digits/finetune_0.25/export
A killed run restarted with the same command resumes after the last logged image.
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """dataset=imagenet2012|cifar10|digits, sigma=..., n=... (0: the protocol's N)."""
    args = config_lib.parse_arg(arg, dataset=config_lib.OneOf(*defaults.CERTIFY_PROTOCOLS),
                                sigma=0.25, n=0)
    return defaults.certify(args.dataset, args.sigma, args.n)
