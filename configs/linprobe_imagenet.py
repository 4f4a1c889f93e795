r"""Linear probing of DMAE-B/L on ImageNet as MAE's `main_linprobe.py` (DMAE FINETUNE.md).

Frozen encoder; the feature is the cls token after the pretrained final norm (kept); head =
BatchNorm1d(D, affine=False, eps=1e-6) + Linear (weight std 0.01, bias 0); LARS (momentum
0.9, trust coefficient 0.001, no decay or trust ratio on 1-D parameters), weight decay 0,
lr 0.1 * 16384/256 = 6.4, 10 warm-up epochs then cosine to 0 over 90 epochs, batch 16384
(official 512 x 4 accumulation x 8 GPUs; BatchNorm normalises each 512-image GPU batch,
here `probe_bn_group_size`=512). Gaussian noise at sigma on the training images, plain
cross-entropy (the documented command has no --con_reg, no Mixup, no label smoothing).
Input: MAE's TF-style RandomResizedCrop (one draw, scale (0.08, 1), bicubic) + flip.
Evaluation: clean / vote accuracy (100 noise draws) on every 50th validation image in
ImageFolder order, as the official radius-0 monitor. The BatchNorm evaluation statistics
are estimated once over `probe_stat_batches` training batches (the encoder is frozen, so
they are what PyTorch's running averages converge to) and folded into the exported head.

  python -m dmae_jax.main --config=configs/linprobe_imagenet.py:variant=base,sigma=0.25 \
      --workdir=gs://BUCKET/linprobe_base_025 --config.init_from=gs://BUCKET/dmae_base/export
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """variant=base|large, sigma=0.25|0.5|1.0, dtype=bfloat16|float32, runlocal (smoke run)."""
    # bfloat16 compute by default, as the pod configs (the papers ran under fp16 autocast).
    args = config_lib.parse_arg(arg, variant=config_lib.OneOf("base", "large"), sigma=0.25,
                                dtype=config_lib.OneOf("bfloat16", "float32"), runlocal=False)
    cfg = defaults.finetune(dataset="imagenet2012", variant=args.variant, sigma=args.sigma)
    cfg.model.update(global_pool=False, drop_path_rate=0.0, dtype=args.dtype)
    cfg.data.update(augment="rrc_single_flip", worker_count=16)
    cfg.linear_probe = True
    cfg.probe_bn_group_size = 512
    cfg.probe_stat_batches = 10
    cfg.num_noise_samples = 1
    cfg.con_reg = False
    cfg.mixup = cfg.cutmix = 0.0
    cfg.label_smoothing = 0.0
    cfg.batch_size = 16384
    cfg.accum_steps = 4
    cfg.num_epochs = 90
    cfg.optim.update(base_lr=0.1, weight_decay=0.0, warmup_epochs=10, min_lr=0.0)
    cfg.update(eval_skip=50, eval_noise_draws=100, eval_batch_size=64,
               eval_every_steps=1_281_167 // 16384, log_every_steps=20, ckpt_every_steps=200)
    if args.runlocal:
        cfg.update(batch_size=8, accum_steps=1, total_steps=10, probe_bn_group_size=4,
                   probe_stat_batches=2, eval_noise_draws=4, eval_batch_size=8)
        cfg.data.worker_count = 0
    return cfg
