r"""Fine-tuning DMAE-B on CIFAR-10 (official recipe): noise at 32x32, bicubic to 224 in-model.

50 epochs, batch 256 x 2 noisy copies, lr 5e-4 (absolute, i.e. base 5e-4 * 256/256), layer
decay 0.65, drop path 0.1, no Mixup/CutMix, label smoothing 0.1, CIFAR-10 mean/std inside the
model; the noise is added at 32x32
and the model upsamples 32 -> 224 with PyTorch-compatible bicubic (a = -0.75, no antialias).

  python -m dmae_jax.main --config=configs/finetune_cifar10.py:sigma=0.5 \
      --workdir=runs/ft_cifar_050 --config.init_from=PATH/TO/dmae_base_export

The paper's best CIFAR-10 row starts from the CIFAR-10 continued pretraining
(configs/pretrain_cifar10.py): --config.init_from=runs/dmae_base_cifar10/export.
Model selection: the official script keeps the epoch with the best smoothed r = 0 accuracy
(majority vote of 100 noise draws) on every 10th TEST image, i.e. it selects on the test
set. `select=best_vote` does the same (evaluation every epoch on those 1000 images in the
official order, the best parameters exported to workdir/best/export); the default `last`
exports the last epoch only:
  python -m dmae_jax.main --config=configs/finetune_cifar10.py:sigma=0.25,select=best_vote \
      --workdir=runs/ft_cifar_025 --config.init_from=runs/dmae_base_cifar10/export

CIFAR-10 must be prepared first (downloads about 160 MB; pip install -e ".[prepare]"):
  python -m dmae_jax.prepare --dataset=cifar10 --data_dir=DATA_DIR
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """sigma=0.25|0.5|1.0, select=last|best_vote, dtype=float32|bfloat16, runlocal."""
    args = config_lib.parse_arg(arg, sigma=0.25, select=config_lib.OneOf("last", "best_vote"),
                                dtype=config_lib.OneOf("float32", "bfloat16"), runlocal=False)
    cfg = defaults.finetune(dataset="cifar10", variant="base", sigma=args.sigma)
    cfg.model.normalization = "cifar10"
    cfg.data.update(image_size=32, augment="flip", eval_split="test")
    cfg.batch_size = 256
    cfg.num_epochs = 50
    cfg.optim.base_lr = 5e-4
    cfg.mixup = cfg.cutmix = 0.0  # the CIFAR-10 script uses no Mixup/CutMix
    cfg.model.dtype = args.dtype
    cfg.eval_every_steps = 2000
    cfg.select = args.select
    if args.select == "best_vote":  # official: every epoch, 1000 test images, 100 draws
        cfg.update(eval_every_steps=50_000 // 256, eval_skip=10, eval_noise_draws=100,
                   eval_batch_size=8)
    if args.runlocal:
        cfg.batch_size, cfg.total_steps = 8, 10
    return cfg
