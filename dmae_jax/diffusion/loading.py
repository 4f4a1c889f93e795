"""Denoisers from parameter exports: what certification puts in front of a classifier.

Two kinds of export can denoise:

* "diffusion": a UNet export (meta kind "unet": ours from `train_denoiser` /
  `calibrate_denoiser`, or an official checkpoint from `dmae_jax.diffusion.convert`), used as
  Carlini et al.'s one-shot denoiser at t*(sigma) (`dmae_jax.diffusion.denoise`);
* "dmae": a DMAE export, used as encoder + decoder with nothing masked (`DMAE.reconstruct`).
  DMAE is trained at one noise level (0.25), so the same network serves every sigma.

Every denoise_fn maps noisy images [B, H, W, C] in [0, 1] units to clean estimates of the same
shape in [0, 1], and is a `jax.tree_util.Partial` whose array leaves are the weights, so the
certification engine passes them to its jitted step as arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dmae_jax import exports
from dmae_jax.diffusion import denoise
from dmae_jax.diffusion.schedule import DiffusionSchedule, make_schedule
from dmae_jax.models import unet as unet_lib
from dmae_jax.models.unet import UNetConfig

DENOISER_KINDS = ("diffusion", "dmae")
# Export meta kind of each denoiser kind.
EXPORT_KIND = {"diffusion": "unet", "dmae": "dmae"}


def unet_schedule(config: UNetConfig) -> DiffusionSchedule:
    """The noise schedule a UNet's weights were trained with (stored in its config)."""
    return make_schedule(config.noise_schedule, config.diffusion_steps)


def pad_to_for(image_size: int, unet_size: int) -> int | None:
    """The UNet's own resolution when the data is smaller (ImageNet 224 -> 256), else None.

    The official multi-scale code reflection-pads 224 px crops to the 256 px UNet and crops
    back (`CropWrapper`); images of the UNet's size or larger run as they are.
    """
    return unet_size if image_size < unet_size else None


def check_sigmas(config: UNetConfig, sigmas, field: str) -> None:
    """Every sigma is within the UNet's noise schedule (its t*(sigma) exists), else ConfigError."""
    from dmae_jax.diffusion.schedule import timestep_for_sigma
    from dmae_jax.errors import ConfigError

    schedule = unet_schedule(config)
    for s in sigmas:
        try:
            timestep_for_sigma(schedule, s)
        except ValueError as e:
            raise ConfigError(f"{field}: {e}") from None


def check_image_size(image_size: int, config: UNetConfig, field: str) -> None:
    """Images of `image_size` fit the UNet: its size or larger, or reflection-paddable to it."""
    from dmae_jax.errors import ConfigError

    pad_to = pad_to_for(image_size, config.image_size)
    if pad_to is not None and ((pad_to - image_size) % 2 or (pad_to - image_size) // 2
                               >= image_size):
        raise ConfigError(
            f"{field} = {image_size} cannot be reflection-padded to the UNet's {pad_to}: the "
            "sizes must differ by an even number less than twice the image size")


def load_unet(path: str, *, field: str = "config.denoiser"):
    """(unet_apply, UNetConfig, schedule) of a UNet export.

    unet_apply(x [B, H, W, C] in model space, t [B] float) -> [B, H, W, C or 2C] is a
    `jax.tree_util.Partial` over the weights; it runs without dropout.
    """
    parts, config, _ = unet_lib.from_export(path, field=field)

    def apply(params, x, t):
        return parts.bind(params)(x, t)

    return jax.tree_util.Partial(apply, jax.tree.map(jnp.asarray, parts.params)), config, \
        unet_schedule(config)


def check_export(path: str, kind: str, *, field: str = "config.denoiser") -> dict:
    """Reads a denoiser export of `kind` ("diffusion" or "dmae") and returns its meta."""
    if kind not in DENOISER_KINDS:
        raise ValueError(f"denoiser kind must be one of {list(DENOISER_KINDS)}, got {kind!r}")
    return exports.load_checked(path, kind=EXPORT_KIND[kind], field=field)[1]


def _diffusion_denoise(
    unet_apply: Callable, x_noisy01: jax.Array, *, schedule: DiffusionSchedule, sigma: float,
    rescale_timesteps: bool, unet_size: int,
) -> jax.Array:
    # The padding is decided from the batch's static shape, so one denoise_fn serves any
    # data resolution.
    return denoise.one_shot_denoise(
        unet_apply, schedule, x_noisy01, sigma, rescale_timesteps=rescale_timesteps,
        pad_to=pad_to_for(x_noisy01.shape[1], unet_size),
    )


def _dmae_denoise(params, x_noisy01: jax.Array, *, apply: Callable) -> jax.Array:
    from dmae_jax.models import vit

    out = apply(params, x_noisy01)
    # DMAE reconstructs at its own resolution; give the classifier the input's size back.
    return vit.resize_to(out, x_noisy01.shape[1]) if out.shape[1:3] != x_noisy01.shape[1:3] \
        else out


def load_denoise_fn(
    path: str, kind: str, sigma: float, *, image_size: int | None = None
) -> denoise.DenoiseFn:
    """denoise_fn(noisy [B, H, W, C] in [0, 1]) -> clean estimate [B, H, W, C] in [0, 1].

    kind: "diffusion" (a UNet export, one-shot denoising at t*(sigma)) or "dmae" (a DMAE
    export; sigma is not used). image_size, when given, is checked against the UNet now
    (data smaller than the UNet is reflection-padded to its size and cropped back).
    """
    return load_denoise_fns(path, kind, (sigma,), image_size=image_size)[0]


def load_denoise_fns(
    path: str, kind: str, sigmas, *, image_size: int | None = None
) -> list[denoise.DenoiseFn]:
    """One denoise_fn per sigma (see `load_denoise_fn`), all sharing one copy of the weights.

    The cascade's denoisers: the export is read once and its arrays are the leaves of every
    returned function, so several sigmas cost the memory of one model.
    """
    if kind not in DENOISER_KINDS:
        raise ValueError(f"denoiser kind must be one of {list(DENOISER_KINDS)}, got {kind!r}")
    if kind == "diffusion":
        unet_apply, config, schedule = load_unet(path)
        fns = []
        for sigma in sigmas:
            # Fails now (not at the first batch) when sigma is beyond the schedule.
            denoise.make_diffusion_denoise_fn(
                unet_apply, schedule, sigma, rescale_timesteps=config.rescale_timesteps)
            # Everything but the weights sits in the (static) function, so the Partial's
            # leaves are arrays only and a plain jax.jit can take it as an argument.
            fns.append(jax.tree_util.Partial(
                functools.partial(_diffusion_denoise, schedule=schedule, sigma=float(sigma),
                                  rescale_timesteps=config.rescale_timesteps,
                                  unet_size=config.image_size),
                unet_apply))
        channels = config.in_channels
    else:
        fns = [_load_dmae_denoise_fn(path)] * len(sigmas)
        channels = 3
    if image_size is not None:
        # Traced abstractly (no compute): a size the denoiser cannot take fails here.
        for fn in fns:
            jax.eval_shape(fn, jax.ShapeDtypeStruct((1, image_size, image_size, channels),
                                                    jnp.float32))
    return fns


def _load_dmae_denoise_fn(path: str) -> denoise.DenoiseFn:
    from dmae_jax.models import dmae

    parts, _ = dmae.from_export(path, field="config.denoiser")

    def apply(params, x):
        return parts.bind(params).reconstruct(x)

    return jax.tree_util.Partial(functools.partial(_dmae_denoise, apply=apply),
                                 jax.tree.map(jnp.asarray, parts.params))
