"""The models' architectures as plain data and rules: no JAX, no Flax.

What a `model` config may say and what follows from it: the ViT variants and every rule a
`model` block obeys (`resolve_model_config`), the visible-patch count of a mask ratio
(`num_kept`), which fields a classifier must share with the DMAE it starts from
(`encoder_mismatch`), the ADM UNet's architecture and its presets (`UNetConfig`,
`UNET_PRESETS`), and which export kind each denoiser is. Validation (`dmae_jax.checks`, the
first stage of every run) checks a config against these before JAX or Flax is imported, so a
typo costs about a second; the Flax models (`models/vit.py`, `dmae.py`, `classifier.py`,
`unet.py`, `attention.py`) and `diffusion/loading.py` take them from here, so each rule has
one home.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from dmae_jax import defaults
from dmae_jax.diffusion.schedule import DiffusionSchedule, make_schedule, timestep_for_sigma
from dmae_jax.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# ViT encoders and the DMAE decoder (`config.model`).

VARIANTS: dict[str, dict] = {
    "mu": {"width": 128, "depth": 4, "num_heads": 4},
    "tiny": {"width": 192, "depth": 12, "num_heads": 3},
    "small": {"width": 384, "depth": 12, "num_heads": 6},
    "base": {"width": 768, "depth": 12, "num_heads": 12},
    "large": {"width": 1024, "depth": 24, "num_heads": 16},
    "huge": {"width": 1280, "depth": 32, "num_heads": 16},
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
}

# How inputs whose size differs from img_size are resized inside the model (CIFAR-10 32 -> 224
# after the noise): the value is the `antialias` flag of PyTorch's bicubic F.interpolate.
# "bicubic": A = -0.75, no antialiasing, what torchvision < 0.17 `Resize` on tensors and the
# papers' code computed; "bicubic_antialias": torchvision >= 0.17 `Resize` (antialias=True),
# a normalised A = -0.5 kernel (a different map even when upsampling).
UPSAMPLE = {"bicubic": False, "bicubic_antialias": True}


def get_variant(name: str) -> dict:
    """Returns {width, depth, num_heads} of a named ViT variant."""
    if name not in VARIANTS:
        raise ConfigError(
            f"model.variant must be one of {sorted(VARIANTS)}, got {name!r}"
        )
    return dict(VARIANTS[name])


# `model.attention`: how softmax(q k^T / sqrt(d)) v is computed.
#   einsum  plain einsums on the fused qkv projection (XLA:CPU's fastest; the CPU default),
#   xla     jax.nn.dot_product_attention's XLA path on separately projected q, k, v (the TPU
#           default: for the DMAE-B decoder's blocks on TPU v4, 30% less estimated time than
#           einsum's slices of the fused [B, N, 3, H, d] projection),
#   cudnn   jax.nn.dot_product_attention with cuDNN's fused flash kernel (GPU; bfloat16 or
#           float16 compute only; the GPU default for a bfloat16 model),
#   pallas  jax's Pallas TPU flash-attention kernel (TPU; opt-in),
#   auto    the default of the platform the model runs on.
ATTENTION = ("auto", "einsum", "xla", "cudnn", "pallas")
# `model.attention_logits`: the dtype the logits and softmax weights are stored in (the
# softmax's max, exponentials and sum are float32 either way). bfloat16 halves the [B, H, N, N]
# traffic of the einsum and xla paths (what the papers' fp16 autocast stored: its q k^T
# product is fp16); the fused kernels never store them. "auto" (`attention.resolve_logits`) is
# bfloat16 for a bfloat16 model on the einsum and xla paths, float32 otherwise.
ATTENTION_LOGITS = ("float32", "bfloat16")
# `model.dtype`: the compute dtype (parameters stay float32).
DTYPES = ("float32", "bfloat16")
# `model.matmul_precision`: the precision of every matmul of the model. "auto" is "highest"
# for a float32 model (true float32 products: a TPU otherwise multiplies in one bfloat16
# pass, an Ampere or later GPU in TF32) and JAX's default for a bfloat16 one (its operands
# are bfloat16 already). XLA:CPU computes float32 products whatever the precision.
MATMUL_PRECISIONS = ("auto", "default", "high", "highest")
# The fields that say which architecture a model is; every other field of a `model` config
# has its default in `dmae_jax.defaults.model`.
REQUIRED_FIELDS = ("variant", "img_size", "patch_size")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
    return int(value)


def resolve_model_config(model_cfg: Mapping[str, Any] | Any) -> dict:
    """Validated, complete model config: a plain dict with every field (variant resolved).

    `model_cfg` (a Mapping or ConfigDict) needs variant, img_size and patch_size; absent or
    None fields take `dmae_jax.defaults.model`'s values, and width / depth / num_heads the
    variant's.
    """
    for name in REQUIRED_FIELDS:
        if model_cfg.get(name, None) is None:
            raise ConfigError(f"model.{name} is required")
    cfg = dict(defaults.model(model_cfg.get("variant")).to_dict(),
               width=None, depth=None, num_heads=None)
    for name in cfg:
        value = model_cfg.get(name, None)
        if value is not None:
            cfg[name] = value
    arch = get_variant(cfg["variant"])
    for name in ("width", "depth", "num_heads"):
        cfg[name] = _positive_int(cfg[name] if cfg[name] is not None else arch[name], name)
    for name in ("img_size", "patch_size", "decoder_width", "decoder_depth", "decoder_heads"):
        cfg[name] = _positive_int(cfg[name], name)
    if cfg["img_size"] % cfg["patch_size"] != 0:
        raise ConfigError(
            f"model.img_size must be divisible by model.patch_size ({cfg['patch_size']}), "
            f"got {cfg['img_size']}"
        )
    for width, heads in (("width", "num_heads"), ("decoder_width", "decoder_heads")):
        if cfg[width] % cfg[heads] != 0 or cfg[width] % 4 != 0:
            raise ConfigError(
                f"model.{width} must be divisible by 4 (sin-cos embedding) and by "
                f"model.{heads} ({cfg[heads]}), got {cfg[width]}"
            )
    if cfg["normalization"] not in NORMALIZATIONS:
        raise ConfigError(
            f"model.normalization must be one of {sorted(NORMALIZATIONS)}, "
            f"got {cfg['normalization']!r}"
        )
    if cfg["dtype"] not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg['dtype']!r}")
    if cfg["upsample"] not in UPSAMPLE:
        raise ConfigError(
            f"model.upsample must be one of {sorted(UPSAMPLE)}, got {cfg['upsample']!r}"
        )
    for name, valid in (("attention", ATTENTION),
                        ("attention_logits", ("auto", *ATTENTION_LOGITS)),
                        ("matmul_precision", MATMUL_PRECISIONS)):
        if cfg[name] not in valid:
            raise ConfigError(f"model.{name} must be one of {sorted(valid)}, got {cfg[name]!r}")
    if cfg["attention_logits"] == "bfloat16":
        if cfg["dtype"] != "bfloat16":
            raise ConfigError("model.attention_logits='bfloat16' needs model.dtype='bfloat16', "
                              f"got model.dtype={cfg['dtype']!r}")
        if cfg["attention"] in ("cudnn", "pallas"):
            raise ConfigError(
                f"model.attention_logits='bfloat16' needs model.attention einsum, xla or auto "
                f"(the {cfg['attention']} kernel never stores the logits), got "
                f"{cfg['attention']!r}")
    rate = cfg["drop_path_rate"]
    if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {rate!r}")
    cfg["drop_path_rate"] = float(rate)
    for name in ("norm_pix_loss", "global_pool", "remat"):
        cfg[name] = bool(cfg[name])
    return cfg


# ---------------------------------------------------------------------------------------------
# DMAE masking and classifier initialisation.


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches, int(L * (1 - mask_ratio)) as the official code."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0.0, 1.0), got {mask_ratio}")
    len_keep = int(num_patches * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(
            f"mask_ratio = {mask_ratio} keeps no patch visible out of {num_patches}: it must "
            f"be below {1 - 1 / num_patches}")
    return len_keep


# The architecture fields a classifier must share with the DMAE it starts from (the
# parameter shapes, and the head count the attention weights were trained with).
ENCODER_FIELDS = ("width", "depth", "num_heads", "patch_size")
DECODER_FIELDS = ("decoder_width", "decoder_depth", "decoder_heads")


def encoder_mismatch(model_cfg: Mapping[str, Any], dmae_model_cfg: Mapping[str, Any], *,
                     decoder: bool = False) -> tuple[str, Any, Any] | None:
    """(field, this model's value, the DMAE's) of the first architecture field that keeps a
    DMAE export (its meta's "model") from initialising `model_cfg`, or None when it fits.

    `init_from_dmae` copies the encoder; with `decoder` (continued pretraining) the decoder
    must match too. The image size may differ (position embeddings are regenerated).
    """
    ours, theirs = resolve_model_config(model_cfg), resolve_model_config(dmae_model_cfg)
    for field in ENCODER_FIELDS + (DECODER_FIELDS if decoder else ()):
        if ours[field] != theirs[field]:
            return field, ours[field], theirs[field]
    return None


# ---------------------------------------------------------------------------------------------
# The ADM diffusion UNet (`models/unet.py`).

NUM_GROUPS = 32  # GroupNorm32: every norm in ADM uses 32 groups.


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of an ADM UNet plus the diffusion its weights were trained with."""

    image_size: int
    in_channels: int
    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[float, ...]
    # Downsample rates (image_size // resolution) at which attention blocks are inserted,
    # the `attention_resolutions` argument of the official UNetModel constructor.
    attention_ds: tuple[int, ...]
    dropout: float = 0.0
    num_heads: int = 1
    # When set, overrides num_heads: heads = channels // num_head_channels (guided-diffusion).
    num_head_channels: int | None = None
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    learn_sigma: bool = False
    # "legacy": each head's [q, k, v] are contiguous in the qkv channels (improved-diffusion,
    # and guided-diffusion with use_new_attention_order=False, which both checkpoints use);
    # "new": all q, then all k, then all v (guided-diffusion's QKVAttention).
    attention_order: str = "legacy"
    # The diffusion the weights belong to (not used by the network itself).
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    rescale_timesteps: bool = False

    @property
    def out_channels(self) -> int:
        """C for an eps-only model, 2C when the variance is learned (learn_sigma)."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what parameter exports store as meta["config"])."""
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_ds"] = list(self.attention_ds)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """Inverse of `to_dict`; unknown fields are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown UNetConfig field(s) {unknown}; valid: {sorted(names)}")
        d = dict(d)
        d["channel_mult"] = tuple(d["channel_mult"])
        d["attention_ds"] = tuple(d["attention_ds"])
        return cls(**d)

    def validate(self) -> None:
        """Raises ValueError naming the first field that cannot build a valid network."""
        if self.attention_order not in ("legacy", "new"):
            raise ValueError(
                f"attention_order must be 'legacy' or 'new', got {self.attention_order!r}"
            )
        if self.noise_schedule not in ("linear", "cosine"):
            raise ValueError(
                f"noise_schedule must be 'linear' or 'cosine', got {self.noise_schedule!r}"
            )
        for mult in self.channel_mult:
            ch = int(mult * self.model_channels)
            if ch <= 0 or ch % NUM_GROUPS:
                raise ValueError(
                    f"channel_mult {mult} x model_channels {self.model_channels} = {ch} "
                    f"channels; GroupNorm32 needs a positive multiple of {NUM_GROUPS}"
                )
            if self.num_head_channels is not None and ch % self.num_head_channels:
                raise ValueError(
                    f"num_head_channels {self.num_head_channels} must divide every level's "
                    f"channels, got {ch}"
                )
            if self.num_head_channels is None and ch % self.num_heads:
                raise ValueError(f"num_heads {self.num_heads} must divide {ch} channels")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def schedule(self) -> DiffusionSchedule:
        """The noise schedule the weights were trained with."""
        return make_schedule(self.noise_schedule, self.diffusion_steps)

    def check_sigmas(self, sigmas) -> None:
        """Raises ValueError unless every sigma is within the schedule (its t*(sigma) exists)."""
        schedule = self.schedule()
        for sigma in sigmas:
            timestep_for_sigma(schedule, sigma)

    def pad_to(self, image_size: int) -> int | None:
        """The UNet's own resolution when images are smaller (ImageNet 224 -> 256), else None.

        The official multi-scale code reflection-pads 224 px crops to the 256 px UNet and
        crops back (`CropWrapper`); images of the UNet's size or larger run as they are.
        """
        return self.image_size if image_size < self.image_size else None

    def check_image_size(self, image_size: int) -> None:
        """Raises ValueError unless images of `image_size` are this size or larger, or can be
        reflection-padded to it."""
        pad_to = self.pad_to(image_size)
        if pad_to is not None and ((pad_to - image_size) % 2
                                   or (pad_to - image_size) // 2 >= image_size):
            raise ValueError(
                f"images of {image_size} px cannot be reflection-padded to the UNet's {pad_to}:"
                " the sizes must differ by an even number less than twice the image size")


UNET_PRESETS: dict[str, UNetConfig] = {
    # improved-diffusion, as loaded by Carlini et al. and Jeong & Shin (image_size 32,
    # attention_resolutions "16,8" -> downsample rates 2 and 4, 4 heads, L_hybrid).
    "cifar10_uncond_50M_500K": UNetConfig(
        image_size=32,
        in_channels=3,
        model_channels=128,
        num_res_blocks=3,
        channel_mult=(1, 2, 2, 2),
        attention_ds=(2, 4),
        dropout=0.3,
        num_heads=4,
        use_scale_shift_norm=True,
        resblock_updown=False,
        learn_sigma=True,
        attention_order="legacy",
        noise_schedule="cosine",
        diffusion_steps=4000,
        rescale_timesteps=True,
    ),
    # guided-diffusion README flags for 256x256_diffusion_uncond.pt (attention at 32/16/8
    # -> downsample rates 8/16/32, 64 channels per head, legacy attention order).
    "256x256_diffusion_uncond": UNetConfig(
        image_size=256,
        in_channels=3,
        model_channels=256,
        num_res_blocks=2,
        channel_mult=(1, 1, 2, 2, 4, 4),
        attention_ds=(8, 16, 32),
        dropout=0.0,
        num_heads=4,
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
        learn_sigma=True,
        attention_order="legacy",
        noise_schedule="linear",
        diffusion_steps=1000,
        rescale_timesteps=False,
    ),
    # Trained here on the digits pipeline's 16x16 RGB images, ~1.2M parameters: 16 -> 8 -> 4
    # with attention at 4x4; eps-prediction only (one-shot denoising never uses a learned
    # variance), so the loss is L_simple.
    "digits": UNetConfig(
        image_size=16,
        in_channels=3,
        model_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2, 2),
        attention_ds=(4,),
        dropout=0.1,
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=False,
        learn_sigma=False,
        attention_order="legacy",
        noise_schedule="cosine",
        diffusion_steps=1000,
        rescale_timesteps=False,
    ),
}

# ---------------------------------------------------------------------------------------------
# Denoisers in front of a classifier (`diffusion/loading.py`).

DENOISER_KINDS = ("diffusion", "dmae")
# Export meta kind of each denoiser kind.
EXPORT_KIND = {"diffusion": "unet", "dmae": "dmae"}
