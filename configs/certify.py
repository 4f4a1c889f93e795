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
ImageNet images are Resize(256, bicubic) + CenterCrop(224) before the noise (the official
eval transform) and the subset is in ImageFolder order; the log's `image` column names each
row's file. The papers certified under fp16 autocast; on an accelerator add `dtype=bfloat16`:
    python -m dmae_jax.main \
        --config=configs/certify.py:dataset=imagenet2012,sigma=1.0,dtype=bfloat16 \
        --workdir=runs/cert_in_100 --config.checkpoint=runs/ft_base_100/export
A killed run restarted with the same command resumes after the last logged image.
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """dataset=imagenet2012|cifar10|digits, sigma=..., n=... (0: the protocol's N),
    dtype=float32|bfloat16 (the classifier's compute dtype; the papers used fp16 autocast)."""
    args = config_lib.parse_arg(arg, dataset=config_lib.OneOf(*defaults.CERTIFY_PROTOCOLS),
                                sigma=0.25, n=0, dtype=config_lib.OneOf("float32", "bfloat16"))
    cfg = defaults.certify(args.dataset, args.sigma, args.n)
    cfg.compute_dtype = args.dtype
    return cfg
