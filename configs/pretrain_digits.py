r"""DMAE pretraining on 2 CPU cores: scikit-learn's handwritten digits at 32x32, ViT "mu".

The same computation as the paper (noise sigma 0.25 in [0,1] pixels, 75% of the patches
masked, clean targets with per-patch normalisation, MSE on all patches) at a size that
trains in about two minutes on 2 cores:
  python -m dmae_jax.main --config=configs/pretrain_digits.py --workdir=runs/digits/pretrain
Patch 4 on 32x32 gives 64 patches, 16 visible. Reconstruction grids go to
workdir/reconstructions/.
"""

from dmae_jax import defaults


def get_config(arg=None):
    """CPU-sized DMAE pretraining on digits; `arg` may be `runlocal` (a few steps)."""
    cfg = defaults.pretrain(dataset="digits", variant="mu")
    cfg.model.update(img_size=32, patch_size=4, decoder_width=128, decoder_depth=2,
                     decoder_heads=4)
    cfg.data.update(image_size=32, augment="rrc_flip", eval_split="test")
    cfg.batch_size = 128
    cfg.num_epochs = 60
    cfg.optim.update(base_lr=1.5e-3, warmup_epochs=5)
    cfg.log_every_steps = 50
    cfg.ckpt_every_steps = 200
    cfg.eval_every_steps = 200
    if arg == "runlocal":
        cfg.total_steps, cfg.log_every_steps, cfg.ckpt_every_steps = 6, 2, 3
        cfg.eval_every_steps = 6
    return cfg
