r"""DMAE pretraining on 2 CPU cores: scikit-learn's handwritten digits at 16x16, ViT "mu".

The same computation as the paper (noise sigma 0.25 in [0,1] pixels, masked patches, clean
targets, MSE on all patches) at a size that trains in about 1.5 minutes on 2 cores (patch 4
on 16x16: 16 patches). Two changes from the paper for such tiny images: 50% masking (8
visible patches, not 4) and pixel targets (no per-patch normalisation), so that the
reconstructions of the masked patches show digits:
  python -m dmae_jax.main --config=configs/pretrain_digits.py --workdir=runs/digits_pretrain
Reconstruction grids go to workdir/reconstructions/.
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """runlocal: a few-step smoke run."""
    args = config_lib.parse_arg(arg, runlocal=False)
    cfg = defaults.digits_pretrain()
    if args.runlocal:
        cfg.total_steps, cfg.log_every_steps, cfg.ckpt_every_steps = 6, 2, 3
        cfg.eval_every_steps = 6
    return cfg
