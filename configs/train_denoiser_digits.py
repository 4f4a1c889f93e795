r"""DDPM training of the digits UNet (16x16 RGB, ~1.2M parameters) on 2 CPU cores.

The whole of improved-diffusion's recipe at CPU size: L_simple on images in [-1, 1], cosine
schedule with T = 1000, AdamW without weight decay at a constant lr, EMA of the weights (what
gets exported). Theirs is lr 1e-4, batch 128, EMA 0.9999 over 500K steps; a CPU-sized run
needs a larger lr (1e-3 after 100 warm-up steps) and a shorter EMA horizon (0.995).
About 100 images/s on 2 idle cores (1.3 s/step), so 1500 steps take ~32 minutes;
`--config.total_steps=500` (~11 minutes) already denoises usefully. Eval MSE (128 test
images, [0, 1] units) at sigma 0.25 / 0.5 / 1.0: step 500: 0.0029 / 0.0090 / 0.0276,
step 1000: 0.0019 / 0.0054 / 0.0156, step 1500: 0.0017 / 0.0049 / 0.0135.

  python -m dmae_jax.main --config=configs/train_denoiser_digits.py --workdir=runs/denoise/ddpm

Eval steps print the one-shot denoising MSE at sigma 0.25 / 0.5 / 1.0 and write
workdir/denoising/step_*.png (rows: clean, then noisy and denoised per sigma). The export
(workdir/export, kind "unet") plugs into certification with --config.denoiser=...
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """runlocal: a few-step smoke run."""
    args = config_lib.parse_arg(arg, runlocal=False)
    cfg = defaults.digits_train_denoiser()
    if args.runlocal:
        cfg.update(total_steps=4, batch_size=16, log_every_steps=2, ckpt_every_steps=2,
                   eval_every_steps=4, eval_batch_size=8, num_grid_images=4)
        cfg.optim.warmup_steps = 0
    return cfg
