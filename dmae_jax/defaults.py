"""Every config field with its default, one factory per task; `configs/*.py` set the rest.

This is the only place config defaults are written. A config file calls one factory,
overrides what differs for its experiment and carries its exact command in its docstring,
as big_vision's configs do. Fields derived from others (`eta` from `sigma`, `log_name`) are
left empty here (None or "") and filled by the task when it starts
(`dmae_jax.config.resolve`), so `--config.sigma=...` changes them too.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from dmae_jax.errors import ConfigError


def model(variant: str = "base", **overrides) -> ml_collections.ConfigDict:
    """The ViT / DMAE model block (`config.model`)."""
    cfg = ml_collections.ConfigDict(dict(
        variant=variant,          # mu | tiny | small | base | large | huge
        img_size=224,             # model resolution; smaller inputs are upsampled (bicubic)
        patch_size=16,
        decoder_width=512,        # DMAE decoder: 512 wide, 8 blocks, 16 heads (official)
        decoder_depth=8,
        decoder_heads=16,
        norm_pix_loss=True,       # per-patch normalised targets, as every released model
        normalization="imagenet",  # mean/std applied inside the model: imagenet | cifar10
        drop_path_rate=0.0,       # classifier only (0.1 ViT-B, 0.2 ViT-L fine-tuning)
        global_pool=True,         # classifier: average patch tokens + fc_norm (official)
        dtype="float32",          # compute dtype: float32 | bfloat16 (params stay float32)
        remat=False,              # rematerialise blocks (ViT-L/H at large batch)
        upsample="bicubic",       # resize of other-size inputs: bicubic (PyTorch A=-0.75, no
                                  # antialias: torchvision < 0.17, the papers') |
                                  # bicubic_antialias (torchvision >= 0.17 Resize)
        attention="auto",         # auto (einsum on CPU, xla on TPU, cudnn on GPU for bf16) |
                                  # einsum | xla | cudnn | pallas (TPU flash kernel)
        attention_logits="auto",  # dtype the einsum/xla paths store logits and softmax
                                  # weights in: auto (bfloat16 for a bfloat16 model, as
                                  # the papers' fp16 autocast) | float32 | bfloat16
        matmul_precision="auto",  # auto (highest for float32, default for bfloat16) |
                                  # default | high | highest
    ))
    cfg.update(overrides)
    return cfg


def data(dataset: str, **overrides) -> ml_collections.ConfigDict:
    """The input block (`config.data`)."""
    cfg = ml_collections.ConfigDict(dict(
        dataset=dataset,          # digits | cifar10 | imagenet2012
        data_dir=placeholder(str),  # TFDS data dir (None: TFDS default)
        train_split="train",
        eval_split="validation" if dataset == "imagenet2012" else "test",
        image_size=224,           # resolution the pipeline produces
        augment="rrc_flip",       # rrc_flip (pretraining) | rrc_flip_randaug (ImageNet
                                  # fine-tuning: RRC 0.08-1 + RandAugment) | rrc_single_flip
                                  # (linear probing) | flip | none
        worker_count=0,           # Grain worker processes per host (0: in-process)
    ))
    cfg.update(overrides)
    return cfg


def _loop(cfg: ml_collections.ConfigDict, **overrides) -> None:
    """The training-loop fields every trainer shares."""
    cfg.seed = 0
    cfg.num_epochs = 0            # epochs to train when total_steps is 0
    cfg.total_steps = 0           # optimizer steps (0: derived from num_epochs)
    cfg.log_every_steps = 50      # progress line and TensorBoard scalars
    cfg.ckpt_every_steps = 1000   # resumable checkpoint (also saved on SIGTERM and at the end)
    cfg.keep_ckpts = 3            # newest checkpoints kept (>= 1)
    cfg.eval_every_steps = 1000   # 0: no evaluation
    cfg.mesh = ml_collections.ConfigDict(dict(fsdp=1))  # devices sharing parameters (FSDP)
    cfg.accum_steps = 1           # micro-batches per optimizer step (batch stays global)
    cfg.profile_steps = ()        # (start, stop): jax.profiler trace of those steps to
                                  # workdir/profile; (): off
    cfg.update(overrides)


def pretrain(dataset: str = "imagenet2012", variant: str = "base") -> ml_collections.ConfigDict:
    """DMAE pretraining defaults: the paper's ImageNet recipe."""
    cfg = ml_collections.ConfigDict()
    cfg.task = "pretrain"
    cfg.model = model(variant)
    cfg.data = data(dataset)
    cfg.sigma = 0.25              # pretraining noise, [0,1] pixel units (all released models)
    cfg.mask_ratio = 0.75
    cfg.batch_size = 4096
    cfg.optim = ml_collections.ConfigDict(dict(
        base_lr=1.5e-4,           # lr = base_lr * batch_size / 256
        min_lr=0.0, weight_decay=0.05, b1=0.9, b2=0.95, warmup_epochs=40,
    ))
    cfg.init_from = ""            # a DMAE export to continue from (e.g. CIFAR-10 continuation)
    cfg.num_grid_images = 8       # images (columns) of the reconstruction grid of each evaluation
    cfg.eval_batch_size = 128     # eval images of the masked-patch MSE (the first num_grid_images
                                  # are shown)
    _loop(cfg, num_epochs=1100)
    cfg.steps_per_call = 1        # optimizer steps per dispatch (> 1: a device loop over as
                                  # many stacked batches, for small models on CPUs)
    return cfg


def finetune(dataset: str = "imagenet2012", variant: str = "base",
             sigma: float = 0.25) -> ml_collections.ConfigDict:
    """Smoothed-classifier fine-tuning defaults: the official ViT-B ImageNet recipe."""
    cfg = ml_collections.ConfigDict()
    cfg.task = "finetune"
    cfg.model = model(variant, drop_path_rate=0.1)
    cfg.data = data(dataset, augment="rrc_flip")
    cfg.init_from = ""            # DMAE export (ours or converted); "" = random init
    cfg.linear_probe = False      # MAE linear probing: frozen encoder (model.global_pool False:
                                  # cls token after the pretrained norm), BatchNorm + head, LARS
    cfg.probe_bn_group_size = 0   # linear probing: images per BatchNorm batch (0: all; MAE: 512)
    cfg.probe_stat_batches = 10   # linear probing: batches for the BatchNorm eval statistics
    cfg.sigma = sigma             # Gaussian augmentation noise, [0,1] pixel units
    cfg.num_noise_samples = 2     # m noisy copies per image (consistency regularisation)
    cfg.con_reg = True
    cfg.lbd = 2.0                 # consistency weight lambda
    cfg.eta = placeholder(float)  # entropy weight eta; None: 0.1 at sigma >= 1.0, else 0.5
    cfg.mixup = 0.8
    cfg.cutmix = 1.0
    cfg.mixup_group_size = 0      # images per Mixup/CutMix draw (0: the whole batch; official:
                                  # 32, one GPU's micro-batch, partners within it)
    cfg.label_smoothing = 0.1
    cfg.batch_size = 1024         # distinct images per step (x m noisy copies)
    cfg.optim = ml_collections.ConfigDict(dict(
        base_lr=5e-4, min_lr=1e-6, weight_decay=0.05, b1=0.9, b2=0.999,
        warmup_epochs=5, layer_decay=0.65,
    ))
    cfg.eval_batch_size = 256
    cfg.eval_noise_draws = 8      # majority vote over this many noise draws during eval
    cfg.eval_skip = 1             # evaluate every eval_skip-th eval image (official order)
    cfg.select = "last"           # last | best_vote (also workdir/best/export: the params of
                                  # the best eval_vote_acc, i.e. selected ON THE EVAL SPLIT)
    _loop(cfg, num_epochs=100)
    cfg.steps_per_call = 1        # optimizer steps per dispatch (> 1: a device loop over as
                                  # many stacked batches, for small models on CPUs)
    return cfg


# dataset: (split, skip, n, batch_size, image_size) of the papers' certification protocols
# (ImageNet: every 50th validation image, N = 10k; CIFAR-10: all test images, N = 100k).
CERTIFY_PROTOCOLS = {
    "imagenet2012": ("validation", 50, 10_000, 1000, 224),
    "cifar10": ("test", 1, 100_000, 1000, 32),
    "digits": ("test", 2, 500, 600, 16),
}


def certify(dataset: str = "imagenet2012", sigma: float = 0.25,
            n: int = 0) -> ml_collections.ConfigDict:
    """Certification defaults: alpha = 0.001, N0 = 100, the data set's protocol."""
    if dataset not in CERTIFY_PROTOCOLS:
        raise ConfigError(
            f"config argument dataset must be one of {sorted(CERTIFY_PROTOCOLS)}, got {dataset!r}")
    split, skip, default_n, batch_size, image_size = CERTIFY_PROTOCOLS[dataset]
    cfg = ml_collections.ConfigDict()
    cfg.task = "certify"
    cfg.seed = 0
    cfg.checkpoint = ""           # a classifier export (fine-tuning's workdir/export)
    cfg.denoiser = ""             # optional denoiser export in front of the classifier
    cfg.denoiser_kind = "diffusion"   # diffusion (UNet export) | dmae (DMAE export)
    cfg.data = ml_collections.ConfigDict(dict(
        dataset=dataset, split=split, image_size=image_size, data_dir=placeholder(str)))
    cfg.skip = skip               # certify every skip-th image ...
    cfg.max = -1                  # ... with index below max (-1: all), as Cohen's certify.py
    cfg.sigma = sigma
    cfg.n0 = 100
    cfg.n = n or default_n
    cfg.alpha = 0.001
    cfg.batch_size = batch_size   # noisy samples per step, split over the local devices
    cfg.compute_dtype = "float32"  # or bfloat16
    cfg.noise = "float"           # float (Cohen et al.) | sound (exact noise, sound in float32)
    cfg.early_abstain = False     # DMAE's shortcut: abstain when the n0 guess is not the label
    cfg.mode = "fixed"            # fixed (Cohen: n0 + n samples) | sequential (stop when settled)
    cfg.n_max = 0                 # sequential: cap on estimation samples; 0 = 1.5 * n
    cfg.radii = ()                # sequential: radii of interest; () = 0, 0.25, ..., 3
    cfg.alpha_split = "sound"     # cascade: alpha/K per stage (level alpha) | official: alpha/(j+1)
    cfg.log_name = ""             # "": certify_sigma_<sigma>.tsv in the workdir
    return cfg


def cascade(dataset: str = "imagenet2012", sigmas=(1.0, 0.5, 0.25),
            n: int = 0) -> ml_collections.ConfigDict:
    """Cascade certification defaults: certify()'s protocol over several sigmas, p0 = 0.5."""
    cfg = certify(dataset, sigmas[0], n)
    cfg.task = "cascade"
    del cfg.sigma
    cfg.sigmas = tuple(sigmas)    # visited from the largest down
    cfg.checkpoints = ()          # one classifier export per sigma, aligned with sigmas
    cfg.p0 = 0.5
    cfg.log_name = ""             # "": cascade_<sigma>_<sigma>....tsv in the workdir
    return cfg


def train_denoiser(dataset: str = "cifar10",
                   preset: str = "cifar10_uncond_50M_500K") -> ml_collections.ConfigDict:
    """DDPM training defaults: improved-diffusion's recipe (lr 1e-4, batch 128, EMA 0.9999)."""
    cfg = ml_collections.ConfigDict()
    cfg.task = "train_denoiser"
    cfg.model = ml_collections.ConfigDict(dict(
        preset=preset,            # a key of dmae_jax.architectures.UNET_PRESETS
        dtype="float32",          # compute dtype: float32 | bfloat16 (params stay float32)
    ))
    cfg.data = data(dataset, image_size=32, augment="none")
    cfg.batch_size = 128
    cfg.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, warmup_steps=0))
    cfg.ema_decay = 0.9999        # 0: export the raw weights
    cfg.eval_sigmas = (0.25, 0.5, 1.0)  # one-shot denoising MSE at these noise levels
    cfg.eval_batch_size = 128     # images for the eval MSE (the first num_grid_images shown)
    cfg.num_grid_images = 10
    _loop(cfg, total_steps=500_000, keep_ckpts=2, ckpt_every_steps=10_000,
          eval_every_steps=10_000)
    return cfg


def calibrate_denoiser(dataset: str = "digits") -> ml_collections.ConfigDict:
    """Denoiser calibration defaults: Brier + anti-consistency + DDPM loss, fixed classifier."""
    cfg = ml_collections.ConfigDict()
    cfg.task = "calibrate_denoiser"
    cfg.denoiser = ""             # UNet export to start from (train_denoiser or converted)
    cfg.classifier = ""           # frozen classifier export (trained on clean images)
    cfg.model = ml_collections.ConfigDict(dict(dtype="float32"))
    cfg.data = data(dataset, augment="none")
    cfg.sigmas = (0.25, 0.5, 1.0)  # the cascade's noise levels, one equal batch chunk each
    cfg.num_noise_samples = 4     # M one-step denoisings per image and step
    cfg.lambda_brier = 1.0
    cfg.lambda_ac = 1.0
    cfg.lambda_mse = 1.0          # DDPM loss on the clean batch: keeps it a denoiser
    cfg.p0 = 0.5                  # eval only: the cascade's confidence threshold
    cfg.batch_size = 48           # distinct images per step, split over sigmas, x M draws
    cfg.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, warmup_steps=20))
    cfg.ema_decay = 0.0           # 0: export the raw weights
    cfg.eval_batch_size = 152
    cfg.eval_noise_draws = 16     # majority vote over this many denoisings per image
    cfg.eval_skip = 2             # evaluate every eval_skip-th test image
    _loop(cfg, total_steps=300, log_every_steps=25, ckpt_every_steps=100, keep_ckpts=2,
          eval_every_steps=150)
    return cfg


def end_to_end() -> ml_collections.ConfigDict:
    """The end-to-end task: pretrain, fine-tune per sigma, certify, cascade, report (digits)."""
    cfg = ml_collections.ConfigDict()
    cfg.task = "end_to_end"
    cfg.sigmas = (0.25, 0.5, 1.0)  # one fine-tuned classifier and one certification each
    cfg.p0 = 0.5                  # the cascade's confidence threshold
    cfg.pretrain = digits_pretrain()
    cfg.finetune = digits_finetune()  # sigma, eta and init_from are set per stage
    cfg.certify = certify("digits")   # task, sigma, checkpoint and log_name set per stage
    cfg.report_radii = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    cfg.random_init_baseline = False  # True: also fine-tune from random init (same budget)
                                      # at every sigma and certify it
    return cfg


# ---------------------------------------------------------------------------------------
# Digits: every stage at the size of 2 CPU cores (16x16 RGB).
# ---------------------------------------------------------------------------------------


def digits_pretrain() -> ml_collections.ConfigDict:
    """DMAE pretraining on digits at CPU size (16x16 RGB, patch 4: 16 patches, 8 visible)."""
    cfg = pretrain(dataset="digits", variant="mu")
    # Pixel targets (no per-patch normalisation): a norm-pix model predicts only each
    # patch's shape, so its masked patches come back as flat grey blocks in pixel space.
    cfg.model.update(img_size=16, patch_size=4, decoder_width=128, decoder_depth=2,
                     decoder_heads=4, norm_pix_loss=False)
    # No crop or flip: a crop of a 16x16 digit is a stroke, a mirrored digit another symbol.
    cfg.data.update(image_size=16, augment="none")
    # 8 of the 16 patches visible: with the paper's 75% (4 visible patches) the masked
    # patches of a 16x16 digit come back as blurs no better than each patch's flat mean.
    cfg.mask_ratio = 0.5
    cfg.batch_size = 128
    cfg.num_epochs = 60
    cfg.optim.update(base_lr=1.5e-3, warmup_epochs=2)
    cfg.update(log_every_steps=50, ckpt_every_steps=200, eval_every_steps=200)
    # One step per dispatch: XLA compiles a step inside the device loop of steps_per_call > 1
    # with other fusions, and this step's gradient then differs in the last bits (the
    # fine-tuning step's does not); at ~0.1 s a step, dispatch is a few percent of it.
    cfg.steps_per_call = 1
    return cfg


def digits_finetune(sigma: float = 0.25) -> ml_collections.ConfigDict:
    """Fine-tuning on digits at CPU size: the official CIFAR-10 transfer recipe, shorter."""
    cfg = finetune(dataset="digits", variant="mu", sigma=sigma)
    # 4 blocks trained for 40 epochs: no stochastic depth.
    cfg.model.update(img_size=16, patch_size=4, drop_path_rate=0.0)
    # Like the official CIFAR-10 fine-tuning (small images): no crop, no Mixup/CutMix, label
    # smoothing 0.1; and no flips either, since a mirrored digit is another symbol.
    cfg.data.update(image_size=16, augment="none")
    cfg.mixup = cfg.cutmix = 0.0
    cfg.batch_size = 64           # x 2 noisy copies
    cfg.num_epochs = 40
    # lr = 1e-2 * 64 / 256 = 2.5e-3: at 4e-3 (1e-3) the sigma = 1.0 classifier was still near
    # chance after 10 epochs and at 0.52 majority-vote accuracy after 20.
    cfg.optim.update(base_lr=1e-2, warmup_epochs=1, layer_decay=0.75)
    cfg.eval_batch_size = 296 - 296 % 8
    cfg.update(log_every_steps=50, ckpt_every_steps=230, eval_every_steps=460)  # eval: 20 epochs
    # ~0.1 s a step on two cores: per-step dispatch, host transfers and the host thread
    # waking between steps were a tenth of it. The loop computes the same bits (a test
    # checks the fine-tunings trained together against each alone).
    cfg.steps_per_call = 10
    return cfg


def digits_train_denoiser() -> ml_collections.ConfigDict:
    """DDPM training of the digits UNet: a larger lr and a shorter EMA horizon than CIFAR-10."""
    cfg = train_denoiser(dataset="digits", preset="digits")
    cfg.data.update(image_size=16)
    cfg.optim.update(lr=1e-3, warmup_steps=100)
    cfg.ema_decay = 0.995
    cfg.update(total_steps=1500, ckpt_every_steps=500, eval_every_steps=500)
    return cfg


def digits_calibrate_denoiser() -> ml_collections.ConfigDict:
    """Calibration of the digits UNet against the clean digits classifier."""
    cfg = calibrate_denoiser(dataset="digits")
    cfg.data.update(image_size=16)
    return cfg
