r"""Fine-tuning DMAE-B/L on ImageNet as the smoothed model's base classifier (official recipe).

ViT-B: 100 epochs (5 warm-up), batch 1024 x 2 noisy copies, lr 5e-4 * 1024/256 = 2e-3,
layer decay 0.65, drop path 0.1. ViT-L: 50 epochs, lr 1e-3 * 1024/256 = 4e-3, layer decay
0.75, drop path 0.2. Both: AdamW (0.9, 0.999), wd 0.05, min lr 1e-6, Mixup 0.8 / CutMix 1.0
applied after the noise with one draw per 32 images (the official per-GPU micro-batch),
label smoothing 0.1, consistency lambda = 2, eta = 0.5 (sigma 0.25, 0.5) or 0.1 (sigma 1.0).
Input: timm's RandomResizedCrop(224, scale (0.08, 1), bicubic) + flip + RandAugment
rand-m9-mstd0.5-inc1 (no random erasing: the official code drops it); evaluation on
Resize(256) + CenterCrop(224). The papers ran under fp16 autocast; the default bfloat16
compute is the accelerator equivalent (parameters, optimizer state, gradient all-reduce,
pooling, head and loss stay float32); `dtype=float32` computes in float32 with true float32
matmuls. One run per sigma:

  python -m dmae_jax.main --config=configs/finetune_imagenet.py:variant=base,sigma=0.25 \
      --workdir=gs://BUCKET/ft_base_025 --config.init_from=gs://BUCKET/dmae_base/export
  python -m dmae_jax.main --config=configs/finetune_imagenet.py:variant=large,sigma=1.0 \
      --workdir=gs://BUCKET/ft_large_100 --config.init_from=gs://BUCKET/dmae_large/export
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """variant=base|large, sigma=0.25|0.5|1.0, dtype=bfloat16|float32, runlocal (smoke run)."""
    args = config_lib.parse_arg(arg, variant=config_lib.OneOf("base", "large"), sigma=0.25,
                                dtype=config_lib.OneOf("bfloat16", "float32"), runlocal=False)
    cfg = defaults.finetune(dataset="imagenet2012", variant=args.variant, sigma=args.sigma)
    cfg.model.dtype = args.dtype
    cfg.data.augment = "rrc_flip_randaug"
    cfg.mixup_group_size = 32
    if args.variant == "large":
        cfg.num_epochs = 50
        cfg.optim.base_lr = 1e-3
        cfg.optim.layer_decay = 0.75
        cfg.model.drop_path_rate = 0.2
    cfg.data.worker_count = 16
    cfg.log_every_steps = 100
    cfg.ckpt_every_steps = 1000
    cfg.eval_every_steps = 5000
    if args.runlocal:
        cfg.batch_size, cfg.total_steps, cfg.data.worker_count = 8, 10, 0
        cfg.mixup_group_size = 4
    return cfg
