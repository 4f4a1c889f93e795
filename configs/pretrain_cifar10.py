r"""Continued DMAE-B pretraining on CIFAR-10 (official `pretrain_cifar10.py`, PRETRAIN.md).

Starts from the ImageNet DMAE-B export (`--config.init_from`, required: without it this
would pretrain from scratch). 50 epochs with 10 warm-up epochs, batch 512 (official 64 x 8
accumulation on 1 GPU), lr 5e-5 * 512/256 = 1e-4 then cosine to 0, AdamW (0.9, 0.95), wd 0.05,
sigma 0.25, mask 75%, norm-pix loss. Images stay 32x32 with a horizontal flip only; the
noise is added at 32x32, then the model upsamples clean and noisy images to 224 (PyTorch
bicubic, a = -0.75, no antialias) and normalises them with the CIFAR-10 mean/std. The
official run starts a fresh optimizer (the released checkpoint holds weights only), as here.

  python -m dmae_jax.main --config=configs/pretrain_cifar10.py \
      --workdir=runs/dmae_base_cifar10 --config.init_from=gs://BUCKET/dmae_base/export

Then fine-tune from it: configs/finetune_cifar10.py with
--config.init_from=runs/dmae_base_cifar10/export. Runtime: 4,850 steps of 512 images at
224, i.e. 2.5M images, 1/560 of the images of the ImageNet DMAE-B pretraining.
CIFAR-10 must be prepared first: python -m dmae_jax.prepare --dataset=cifar10 --data_dir=DIR
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """dtype=float32|bfloat16 (compute), runlocal for a smoke run."""
    args = config_lib.parse_arg(arg, dtype=config_lib.OneOf("float32", "bfloat16"),
                                runlocal=False)
    cfg = defaults.pretrain(dataset="cifar10", variant="base")
    cfg.model.update(normalization="cifar10", dtype=args.dtype)
    cfg.data.update(image_size=32, augment="flip")
    cfg.batch_size = 512
    cfg.num_epochs = 50
    cfg.optim.update(base_lr=5e-5, warmup_epochs=10, min_lr=0.0)
    cfg.update(log_every_steps=50, ckpt_every_steps=500, eval_every_steps=1000)
    if args.runlocal:
        cfg.batch_size, cfg.total_steps = 8, 10
    return cfg
