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

from dmae_jax.architectures import DENOISER_KINDS, UNetConfig
from dmae_jax.diffusion import denoise
from dmae_jax.models import dmae, vit
from dmae_jax.models import unet as unet_lib


def load_unet(path: str, *, field: str = "config.denoiser"):
    """(unet_apply, UNetConfig, schedule) of a UNet export.

    unet_apply(x [B, H, W, C] in model space, t [B] float) -> [B, H, W, C or 2C] is a
    `jax.tree_util.Partial` over the weights; it runs without dropout.
    """
    parts, unet, _ = unet_lib.from_export(path, field=field)

    def apply(params, x, t):
        return parts.bind(params)(x, t)

    return (jax.tree_util.Partial(apply, jax.tree.map(jnp.asarray, parts.params)), unet,
            unet.schedule())


def _diffusion_denoise(
    unet_apply: Callable, x_noisy01: jax.Array, *, sigma: float, unet: UNetConfig,
) -> jax.Array:
    # The padding is decided from the batch's static shape, so one denoise_fn serves any
    # data resolution.
    return denoise.one_shot_denoise(
        unet_apply, unet.schedule(), x_noisy01, sigma, rescale_timesteps=unet.rescale_timesteps,
        pad_to=unet.pad_to(x_noisy01.shape[1]),
    )


def _dmae_denoise(params, x_noisy01: jax.Array, *, apply: Callable) -> jax.Array:
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
        unet_apply, unet, _ = load_unet(path)
        # Everything but the weights sits in the (static) function, so the Partial's leaves
        # are arrays only and a plain jax.jit can take it as an argument.
        fns = [jax.tree_util.Partial(functools.partial(_diffusion_denoise, sigma=float(sigma),
                                                       unet=unet), unet_apply)
               for sigma in sigmas]
        channels = unet.in_channels
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
    parts, _ = dmae.from_export(path, field="config.denoiser")

    def apply(params, x):
        return parts.bind(params).reconstruct(x)

    return jax.tree_util.Partial(functools.partial(_dmae_denoise, apply=apply),
                                 jax.tree.map(jnp.asarray, parts.params))
