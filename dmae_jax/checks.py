"""Config checks: every field of every task checked once, here, before anything is loaded.

One function per task (`pretrain`, `finetune`, `certification` for certify and cascade,
`train_denoiser`, `calibrate_denoiser`, `end_to_end`) checks a resolved config with the
field checks below; each error is one line naming the field, the bad value and what is
valid. Model constraints are the models' own rules, kept JAX-free in
`dmae_jax.architectures` (`resolve_model_config`, `num_kept`, `encoder_mismatch`,
`UNetConfig`); an export a config names is checked from its meta.json (`exports.read_meta`),
without reading its parameters, and `exports=False` leaves those checks out (compile-only
mode needs only shapes; a pipeline checks its stages before it makes their exports). Nothing
here reads data, restores a checkpoint, compiles or imports JAX or Flax
(tests/test_config.py checks the imports), so a typo in a pod launch costs about a
second."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import ml_collections

from dmae_jax import architectures, storage
from dmae_jax import config as config_lib
from dmae_jax import exports as exports_lib
from dmae_jax.data import AUGMENTATIONS, datasets
from dmae_jax.errors import ConfigError
from dmae_jax.train import selection

__all__ = [
    "ConfigError", "calibrate_denoiser", "certification", "end_to_end", "finetune", "get",
    "in_range", "one_of", "positive", "pretrain", "profile_steps", "sigmas", "train_denoiser",
    "training_loop", "workdir_usable",
]

CERTIFY_DTYPES = ("float32", "bfloat16")
CERTIFY_MODES = ("fixed", "sequential")
# The engine's `smoothing.settings.NOISES`, named here so that validation does not import
# the engine (SciPy, the samplers); tests/test_config.py checks that the two agree.
CERTIFY_NOISES = ("float", "sound")
ALPHA_SPLITS = ("sound", "official")

# ---------------------------------------------------------------------------------------
# Field checks.
# ---------------------------------------------------------------------------------------


def get(config: ml_collections.ConfigDict, field: str) -> Any:
    """`config.a.b.c` by dotted name, with a clear error when it is missing."""
    node = config
    for part in field.split("."):
        if not hasattr(node, part) and not (isinstance(node, dict) and part in node):
            raise ConfigError(f"config.{field} is missing")
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def positive(config, field: str, *, allow_zero: bool = False) -> None:
    """The field is a number > 0 (or >= 0)."""
    value = get(config, field)
    ok = _is_number(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config.{field} must be {bound}, got {value!r}")


def integer(config, field: str, *, low: int = 1, what: str = "") -> None:
    """The field is an integer >= low (`what` adds the meaning of other values)."""
    value = get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"config.{field} must be an integer >= {low}{what}, got {value!r}")


def in_range(config, field: str, low: float, high: float, *, closed_high: bool = False) -> None:
    """The field lies in [low, high) (or [low, high])."""
    value = get(config, field)
    ok = _is_number(value) and low <= value and (
        value <= high if closed_high else value < high
    )
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ConfigError(f"config.{field} must be in [{low}, {high}{bracket}, got {value!r}")


def one_of(config, field: str, valid: Iterable[Any]) -> None:
    """The field is one of `valid`."""
    value = get(config, field)
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(f"config.{field} must be one of {list(valid)}, got {value!r}")


def boolean(config, field: str) -> None:
    """The field is True or False."""
    value = get(config, field)
    if not isinstance(value, bool):
        raise ConfigError(f"config.{field} must be True or False, got {value!r}")


def sigmas(config, field: str) -> tuple[float, ...]:
    """A non-empty list of noise levels, each > 0."""
    value = get(config, field)
    if _is_number(value):
        value = (value,)
    value = tuple(value) if isinstance(value, list | tuple) else (value,)
    if not value or any(not _is_number(s) or s <= 0 for s in value):
        raise ConfigError(f"config.{field} must be a non-empty list of sigmas > 0, got {value!r}")
    return tuple(float(s) for s in value)


def profile_steps(value: Any) -> tuple[int, int]:
    """(start, stop) of `config.profile_steps`, (0, 0) when off."""
    if not value:
        return 0, 0
    pair = tuple(value) if isinstance(value, tuple | list) else None
    if (pair is None or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            or not 1 <= pair[0] < pair[1]):
        raise ConfigError(
            "config.profile_steps must be () (off) or a pair (start, stop) of steps with "
            f"1 <= start < stop, e.g. (10, 15), got {value!r}")
    return pair


def training_loop(config) -> None:
    """The loop fields every trainer shares: step counts, periods, checkpoints, profiling."""
    integer(config, "seed", low=0)
    # steps_per_call: the pretraining and fine-tuning loops only.
    loop_fields = ("log_every_steps", "ckpt_every_steps", "keep_ckpts", "accum_steps")
    for field in loop_fields + (("steps_per_call",) if "steps_per_call" in config else ()):
        integer(config, field)
    for field, zero in (("eval_every_steps", "for no evaluation"),
                        ("total_steps", "to train num_epochs")):
        value = get(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(
                f"config.{field} must be an integer >= 1, or 0 {zero}, got {value!r}")
    if not config.total_steps:
        positive(config, "num_epochs")
    integer(config, "mesh.fsdp")
    integer(config, "batch_size")
    profile_steps(config.get("profile_steps"))


def model(config, field: str = "model") -> dict:
    """A ViT model block, checked by the model's own rules; returns it resolved."""
    try:
        return architectures.resolve_model_config(get(config, field))
    except ConfigError as e:  # the model names its fields model.x
        raise ConfigError(f"config.{field}{str(e)[len('model'):]}") from None


def _image_size_fits(config, model_cfg: dict) -> None:
    """The input resolution is at most the model's (smaller images are upsampled inside)."""
    size = get(config, "data.image_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= model_cfg["img_size"]:
        raise ConfigError(
            f"config.data.image_size must be an integer in [1, config.model.img_size = "
            f"{model_cfg['img_size']}] (smaller images are upsampled inside the model), "
            f"got {size!r}")


def _dataset(config) -> None:
    """A known data set; digits at a resolution it can be prepared at."""
    one_of(config, "data.dataset", datasets.DATASETS)
    if config.data.dataset == "digits":
        datasets.check_digits_size(get(config, "data.image_size"), "config.data.image_size")


def export(config, field: str, kind: str) -> dict:
    """The meta of the export `config.<field>` names, which must be of `kind`."""
    return exports_lib.read_meta(get(config, field), kind=kind, field=f"config.{field}")


def workdir_usable(workdir: str) -> None:
    """The workdir is a writable directory, or can be created as one, or a gs:// location
    this process can write; nothing is left behind.

    An existing directory gets a probe file (created and removed again); for a new one the
    nearest existing parent must be a writable directory. On gs:// a probe object is
    written and deleted (`storage.check_writable`).
    """
    if not workdir:
        raise ConfigError("--workdir must name a directory, got ''")
    if "://" in workdir:
        storage.check_writable(workdir, "--workdir")
        return
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"is inside {existing}, a file"
        raise ConfigError(f"--workdir={workdir} {what}, not a directory")
    probe = os.path.join(existing, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror})") from None


# ---------------------------------------------------------------------------------------
# One check per task.
# ---------------------------------------------------------------------------------------


def pretrain(config: ml_collections.ConfigDict, *, exports: bool = True) -> None:
    """DMAE pretraining."""
    positive(config, "sigma")
    model_cfg = model(config)
    num_patches = (model_cfg["img_size"] // model_cfg["patch_size"]) ** 2
    ratio = get(config, "mask_ratio")
    if not _is_number(ratio):
        raise ConfigError(f"config.mask_ratio must be a number in [0, 1), got {ratio!r}")
    try:
        architectures.num_kept(num_patches, ratio)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    for field in ("eval_batch_size", "num_grid_images", "optim.base_lr"):
        positive(config, field)
    for field in ("optim.weight_decay", "optim.warmup_epochs"):
        positive(config, field, allow_zero=True)
    _dataset(config)
    one_of(config, "data.augment", ("rrc_flip", "flip", "none"))
    _image_size_fits(config, model_cfg)
    training_loop(config)
    if config.get("init_from") and exports:
        _dmae_encoder(config, model_cfg, decoder=True)


def finetune(config: ml_collections.ConfigDict, *, exports: bool = True) -> None:
    """Smoothed-classifier fine-tuning and linear probing."""
    # sigma = 0 trains a clean classifier (the "off-the-shelf" classifier that denoised
    # smoothing puts behind a denoiser); the smoothed models use sigma > 0.
    positive(config, "sigma", allow_zero=True)
    integer(config, "num_noise_samples")
    boolean(config, "con_reg")
    if config.con_reg and config.num_noise_samples < 2:
        raise ConfigError(
            "config.num_noise_samples must be >= 2 when config.con_reg is on, got "
            f"{config.num_noise_samples}")
    for field in ("lbd", "eta", "mixup", "cutmix", "optim.weight_decay", "optim.warmup_epochs"):
        positive(config, field, allow_zero=True)
    in_range(config, "label_smoothing", 0.0, 1.0)
    in_range(config, "optim.layer_decay", 0.0, 1.0, closed_high=True)
    for field in ("optim.base_lr", "eval_batch_size", "eval_noise_draws", "eval_skip"):
        positive(config, field)
    training_loop(config)
    model_cfg = model(config)
    _image_size_fits(config, model_cfg)
    if (config.mixup or config.cutmix) and config.batch_size % 2:
        raise ConfigError(f"config.batch_size must be even with Mixup/CutMix, got "
                          f"{config.batch_size}")
    _dataset(config)
    one_of(config, "data.augment", AUGMENTATIONS)
    one_of(config, "select", selection.SELECTIONS)
    for field in ("mixup_group_size", "probe_bn_group_size"):
        positive(config, field, allow_zero=True)
        group = config.get(field)
        if group and (config.batch_size // config.accum_steps) % group:
            raise ConfigError(
                f"config.{field} must divide the micro-batch (config.batch_size / "
                f"config.accum_steps = {config.batch_size // config.accum_steps}), got {group}")
    boolean(config, "linear_probe")
    if config.linear_probe:
        positive(config, "probe_stat_batches")
        if config.model.global_pool:
            raise ConfigError("config.linear_probe uses the cls token: set "
                              "config.model.global_pool=False")
    if config.init_from:
        if exports:
            _dmae_encoder(config, model_cfg, decoder=False)
    elif config.linear_probe:
        raise ConfigError("config.init_from must name a DMAE export when "
                          "config.linear_probe is on, got ''")


def _dmae_encoder(config, model_cfg: dict, *, decoder: bool) -> None:
    """`config.init_from` is a DMAE export whose encoder (and decoder) fit `model_cfg`."""
    meta = export(config, "init_from", "dmae")
    mismatch = architectures.encoder_mismatch(model_cfg, meta["model"], decoder=decoder)
    if mismatch:
        field, ours, theirs = mismatch
        raise ConfigError(
            f"config.init_from = {config.init_from!r} is a DMAE with model.{field} = {theirs},"
            f" this run's config.model.{field} is {ours}: set config.model to the pretrained "
            "model's architecture")


def certification(config: ml_collections.ConfigDict, *, exports: bool = True) -> None:
    """The certify and cascade tasks."""
    _dataset(config)
    integer(config, "data.image_size")
    for field in ("n0", "n", "batch_size", "skip"):
        integer(config, field)
    integer(config, "seed", low=0)
    in_range(config, "alpha", 1e-300, 1.0)
    value = get(config, "max")
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value >= 1):
        raise ConfigError(f"config.max must be -1 (every image) or >= 1, got {value!r}")
    one_of(config, "compute_dtype", CERTIFY_DTYPES)
    one_of(config, "noise", CERTIFY_NOISES)
    boolean(config, "early_abstain")
    one_of(config, "mode", CERTIFY_MODES)
    if config.mode == "sequential":
        integer(config, "n_max", low=0, what=" (0: 1.5 config.n)")
        if config.early_abstain:
            raise ConfigError("config.early_abstain reads the label; sequential "
                              "certification is label-free: use mode=fixed or drop it")
    if config.task == "certify":
        positive(config, "sigma")
        noise = (float(config.sigma),)
        classifiers = ["checkpoint"]
    else:
        noise = sigmas(config, "sigmas")
        in_range(config, "p0", 1e-12, 1.0)
        one_of(config, "alpha_split", ALPHA_SPLITS)
        per_sigma = list(config.get("checkpoints") or [])
        if per_sigma and len(per_sigma) != len(noise):
            raise ConfigError(
                f"config.checkpoints must have one classifier per sigma ({len(noise)}), got "
                f"{len(per_sigma)}")
        classifiers = [f"checkpoints[{i}]" for i in range(len(per_sigma))] or ["checkpoint"]
    if config.get("denoiser"):
        one_of(config, "denoiser_kind", architectures.DENOISER_KINDS)
    if not exports:
        return
    for field in classifiers:
        path = get(config, field.split("[")[0])
        if "[" in field:
            path = path[int(field.split("[")[1][:-1])]
        meta = exports_lib.read_meta(path, kind="classifier", field=f"config.{field}")
        if meta.get("num_classes") != datasets.num_classes(config.data.dataset):
            raise ConfigError(
                f"config.{field} = {path!r} has {meta.get('num_classes')} classes, "
                f"config.data.dataset {config.data.dataset!r} has "
                f"{datasets.num_classes(config.data.dataset)}")
    if config.get("denoiser"):
        meta = export(config, "denoiser", architectures.EXPORT_KIND[config.denoiser_kind])
        if config.denoiser_kind == "diffusion":
            _unet_fits(architectures.UNetConfig.from_dict(meta["config"]), noise, "config.sigma"
                       if config.task == "certify" else "config.sigmas",
                       config.data.image_size)


def _unet_fits(unet_config: architectures.UNetConfig, noise: Iterable[float], field: str,
               image_size: int | None = None) -> None:
    """Every sigma within the UNet's noise schedule; images its size or paddable to it."""
    try:
        unet_config.check_sigmas(noise)
    except ValueError as e:
        raise ConfigError(f"{field}: {e}") from None
    if image_size is not None:
        try:
            unet_config.check_image_size(image_size)
        except ValueError as e:
            raise ConfigError(f"config.data.image_size = {image_size}: {e}") from None


def _denoiser_training(config) -> None:
    """The fields both denoiser trainers share (data, batch, loop, AdamW, EMA)."""
    _dataset(config)
    one_of(config, "data.augment", ("rrc_flip", "flip", "none"))
    integer(config, "data.image_size")
    one_of(config, "model.dtype", architectures.DTYPES)
    positive(config, "optim.lr")
    positive(config, "optim.weight_decay", allow_zero=True)
    positive(config, "optim.warmup_steps", allow_zero=True)
    in_range(config, "optim.b1", 0.0, 1.0)
    in_range(config, "optim.b2", 0.0, 1.0)
    in_range(config, "ema_decay", 0.0, 1.0)
    positive(config, "eval_batch_size")
    training_loop(config)


def train_denoiser(config: ml_collections.ConfigDict, *, exports: bool = True) -> None:
    """DDPM training of a diffusion denoiser (it reads no export)."""
    del exports
    _denoiser_training(config)
    one_of(config, "model.preset", sorted(architectures.UNET_PRESETS))
    unet_config = architectures.UNET_PRESETS[config.model.preset]
    if config.data.image_size != unet_config.image_size:
        raise ConfigError(
            f"config.data.image_size must be the UNet preset's resolution "
            f"({unet_config.image_size} for {config.model.preset!r}): a DDPM trains at its "
            f"own size, got {config.data.image_size}")
    _unet_fits(unet_config, sigmas(config, "eval_sigmas"), "config.eval_sigmas")
    positive(config, "num_grid_images")


def calibrate_denoiser(config: ml_collections.ConfigDict, *, exports: bool = True) -> None:
    """Denoiser calibration against a fixed classifier."""
    _denoiser_training(config)
    noise = sigmas(config, "sigmas")
    integer(config, "num_noise_samples")
    for field in ("lambda_brier", "lambda_ac", "lambda_mse"):
        positive(config, field, allow_zero=True)
    if config.lambda_brier == 0 and config.lambda_ac == 0:
        raise ConfigError(
            "config.lambda_brier and config.lambda_ac are both 0: nothing would calibrate "
            "the denoiser (use task train_denoiser for plain DDPM training)")
    if config.batch_size % (len(noise) * config.accum_steps):
        raise ConfigError(
            f"config.batch_size must be a multiple of len(config.sigmas) = {len(noise)} "
            f"times config.accum_steps = {config.accum_steps} (one equal chunk per sigma in "
            f"every micro-batch), got {config.batch_size}")
    in_range(config, "p0", 1e-12, 1.0)
    for field in ("eval_noise_draws", "eval_skip"):
        positive(config, field)
    if not exports:
        return
    meta = export(config, "denoiser", "unet")
    _unet_fits(architectures.UNetConfig.from_dict(meta["config"]), noise, "config.sigmas",
               config.data.image_size)
    classifier = export(config, "classifier", "classifier")
    expected = datasets.num_classes(config.data.dataset)
    if classifier.get("num_classes") != expected:
        raise ConfigError(
            f"config.classifier = {config.classifier!r} has {classifier.get('num_classes')} "
            f"classes, config.data.dataset {config.data.dataset!r} has {expected}")


def end_to_end(config: ml_collections.ConfigDict, *, exports: bool = True) -> None:
    """The digits pipeline: each stage's config, without the exports earlier stages make."""
    del exports
    stage("pretrain", pretrain, config_lib.stage(config.pretrain))
    noise = sigmas(config, "sigmas")
    for sigma in noise:
        stage("finetune", finetune, config_lib.stage(config.finetune, sigma=sigma))
    stage("certify", certification, config_lib.stage(config.certify, sigma=noise[0]))
    in_range(config, "p0", 1e-12, 1.0)
    boolean(config, "random_init_baseline")
    for radius in get(config, "report_radii"):
        if not _is_number(radius) or radius < 0:
            raise ConfigError(f"config.report_radii must be numbers >= 0, got "
                              f"{tuple(config.report_radii)!r}")


def stage(name: str, check, stage_config: ml_collections.ConfigDict) -> None:
    """Checks one pipeline stage before its exports exist; errors name the field as the user
    sets it (config.NAME.x)."""
    try:
        check(stage_config, exports=False)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config.", f"config.{name}.")) from None
