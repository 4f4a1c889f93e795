"""One-shot diffusion denoising (Carlini et al. 2023) as Jeong & Shin's multi-scale code does it.

The certification engine draws x + delta with delta ~ N(0, sigma^2 I) in [0, 1]-pixel units
and hands the (unclipped) noisy batch to a `logits_fn`. Mapping it to the model's [-1, 1]
space gives 2(x + delta) - 1 = (2x - 1) + 2 delta, i.e. the clean image in model space plus
Gaussian noise of std exactly 2 sigma: the same random variable the official code builds by
normalising first and adding `randn * 2 sigma` afterwards. So adding noise in [0, 1] units
here and the official [-1, 1] computation are one and the same, and the certified radius
stays in [0, 1]-pixel units.

With t* the first step whose noise level reaches 2 sigma (`timestep_for_sigma`):
    x_t   = sqrt(abar_t*) (2 (x + delta) - 1)
    x0_hat = sqrt(1 / abar_t*) x_t - sqrt(1 / abar_t* - 1) eps_theta(x_t, t*)
clipped to [-1, 1] and mapped back to [0, 1]. Only the first C (eps) output channels are
used; a learned variance is ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmae_jax.diffusion.schedule import DiffusionSchedule, timestep_for_sigma

# (x [B, H, W, C] in model space, t [B] float) -> [B, H, W, C or 2C]; a UNet is one.
UNetApply = Callable[[jax.Array, jax.Array], jax.Array]
# noisy images [B, H, W, C] in [0, 1] units -> denoised images [B, H, W, C] in [0, 1].
DenoiseFn = Callable[[jax.Array], jax.Array]
LogitsFn = Callable[[jax.Array], jax.Array]


def model_timestep(t: jax.Array | int, num_timesteps: int, *, rescale_timesteps: bool) -> jax.Array:
    """The float timestep the network receives: t * 1000 / T if rescale_timesteps, else t."""
    t = jnp.asarray(t, dtype=jnp.float32)
    return t * (1000.0 / num_timesteps) if rescale_timesteps else t


def reflect_pad(x: jax.Array, pad: int) -> jax.Array:
    """Reflection-pads H and W of [B, H, W, C] by `pad` on each side (torch ReflectionPad2d)."""
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def center_crop(x: jax.Array, size: int) -> jax.Array:
    """Center crop of [B, H, W, C] to [B, size, size, C] (torchvision CenterCrop offsets)."""
    top = int(round((x.shape[1] - size) / 2.0))
    left = int(round((x.shape[2] - size) / 2.0))
    return x[:, top : top + size, left : left + size, :]


def _check_pad(h: int, w: int, pad_to: int | None) -> int:
    if pad_to is None:
        return 0
    if h != w:
        raise ValueError(f"pad_to needs square images, got {h}x{w}")
    pad, odd = divmod(pad_to - h, 2)
    if pad_to < h or odd or pad >= h:
        raise ValueError(
            f"pad_to must be >= the image size {h}, differ from it by an even number, and "
            f"pad by less than {h} per side (reflection), got pad_to = {pad_to}"
        )
    return pad


def one_shot_denoise(
    unet_apply: UNetApply,
    schedule: DiffusionSchedule,
    x_noisy01: jax.Array,
    sigma: float,
    *,
    rescale_timesteps: bool,
    clip: bool = True,
    pad_to: int | None = None,
) -> jax.Array:
    """Denoises x + N(0, sigma^2) noise [B, H, W, C] ([0, 1] units) to x_hat [B, H, W, C].

    pad_to: run the UNet on a reflection-padded square of this size and crop back (ImageNet:
    224 -> 256, the official `CropWrapper`). The output is in [0, 1] when clip is True.
    """
    t_star, sqrt_abar = timestep_for_sigma(schedule, sigma)
    b, h, w, c = x_noisy01.shape
    pad = _check_pad(h, w, pad_to)
    x_t = np.float32(sqrt_abar) * (2.0 * x_noisy01.astype(jnp.float32) - 1.0)
    t = model_timestep(
        jnp.full((b,), t_star), schedule.num_timesteps, rescale_timesteps=rescale_timesteps
    )
    model_in = reflect_pad(x_t, pad) if pad else x_t
    out = unet_apply(model_in, t).astype(jnp.float32)
    eps = center_crop(out, h) if pad else out
    eps = eps[..., :c]
    x0 = (
        np.float32(schedule.sqrt_recip_alphas_cumprod[t_star]) * x_t
        - np.float32(schedule.sqrt_recipm1_alphas_cumprod[t_star]) * eps
    )
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
    return (x0 + 1.0) / 2.0


@dataclasses.dataclass(frozen=True)
class DiffusionDenoiser:
    """One-shot diffusion denoiser at a fixed sigma: noisy01 [B, H, W, C] -> clean01.

    A pytree whose only children are the UNet's (when `unet_apply` is a `UNet` or another
    pytree); sigma, the schedule and the options are static. Jitted callers such as the
    certification engine then take the weights as arguments instead of baking them into
    the compiled program.
    """

    unet_apply: UNetApply
    schedule: DiffusionSchedule
    sigma: float
    rescale_timesteps: bool
    pad_to: int | None = None

    def __call__(self, x_noisy01: jax.Array) -> jax.Array:
        """[B, H, W, C] noisy images in [0, 1] units -> denoised [B, H, W, C] in [0, 1]."""
        return one_shot_denoise(
            self.unet_apply, self.schedule, x_noisy01, self.sigma,
            rescale_timesteps=self.rescale_timesteps, pad_to=self.pad_to,
        )


jax.tree_util.register_dataclass(
    DiffusionDenoiser,
    data_fields=["unet_apply"],
    meta_fields=["schedule", "sigma", "rescale_timesteps", "pad_to"],
)


@dataclasses.dataclass(frozen=True)
class DenoisedClassifier:
    """logits_fn(noisy01 [B, H, W, C]) -> [B, K] = classifier(denoise(noisy01)); a pytree."""

    denoise_fn: DenoiseFn
    classifier_logits_fn: LogitsFn

    def __call__(self, x_noisy01: jax.Array) -> jax.Array:
        """[B, H, W, C] noisy images in [0, 1] units -> logits [B, K]."""
        return self.classifier_logits_fn(self.denoise_fn(x_noisy01))


jax.tree_util.register_dataclass(
    DenoisedClassifier, data_fields=["denoise_fn", "classifier_logits_fn"], meta_fields=[]
)


def make_diffusion_denoise_fn(
    unet_apply: UNetApply,
    schedule: DiffusionSchedule,
    sigma: float,
    *,
    rescale_timesteps: bool,
    pad_to: int | None = None,
) -> DiffusionDenoiser:
    """`denoise_fn(noisy01 [B, H, W, C]) -> clean01` at a fixed sigma (checked here, once)."""
    timestep_for_sigma(schedule, sigma)  # Fail at construction, not at the first batch.
    return DiffusionDenoiser(unet_apply, schedule, float(sigma), bool(rescale_timesteps), pad_to)


def denoise_then_classify(
    denoise_fn: DenoiseFn, classifier_logits_fn: LogitsFn
) -> DenoisedClassifier:
    """logits_fn(noisy01 [B, H, W, C]) -> [B, K] = classifier(denoise(noisy01)), any denoiser.

    Pytree denoisers and classifiers (nnx modules, `DiffusionDenoiser`, Partials) keep
    their arrays as leaves, so they stay jit arguments.
    """
    return DenoisedClassifier(denoise_fn, classifier_logits_fn)
