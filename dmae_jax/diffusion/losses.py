"""The DDPM training objective (Ho et al. 2020; Nichol & Dhariwal 2021's L_hybrid).

For an eps-only model (C output channels) the loss is the simple objective
    L_simple = E_{t ~ U{0..T-1}, eps} || eps - eps_theta(x_t, t) ||^2  (mean over pixels).
For a learned-variance model (2C channels, `learn_sigma`) improved-diffusion's hybrid loss
is added: the variational bound term L_vlb on the variance channels, with the eps channels
stop-gradiented so the bound only trains the variance, scaled by T / 1000 (their
RESCALED_MSE). Our digits preset has learn_sigma=False (one-shot denoising only uses eps),
so it trains with L_simple alone. L_vlb's decoder term assumes 8-bit images (bins of 2/255
in [-1, 1]), as in improved-diffusion.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmae_jax.diffusion.denoise import model_timestep
from dmae_jax.diffusion.schedule import DiffusionSchedule

# (x_t [B, H, W, C], t [B] float, *, rng) -> [B, H, W, C or 2C]; a UNet is one.
TrainApply = Callable[..., jax.Array]


def _at(coef: np.ndarray, t: jax.Array) -> jax.Array:
    """coef[t] as float32, shaped [B, 1, 1, 1] to broadcast over images."""
    return jnp.asarray(coef, jnp.float32)[t][:, None, None, None]


def _mean_flat(x: jax.Array) -> jax.Array:
    return x.mean(axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    # The tanh approximation improved-diffusion uses; kept so losses compare with theirs.
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> jax.Array:
    """log P(x) of 8-bit pixels x in [-1, 1] under a Gaussian discretised to bins of 2/255."""
    inv_std = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (x - means + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (x - means - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    # The edge bins extend to -inf / +inf.
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def vlb_term(
    schedule: DiffusionSchedule,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    eps: jax.Array,
    var_values: jax.Array,
) -> jax.Array:
    """L_vlb at t, in bits per dim [B]: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)), NLL at t = 0.

    eps, var_values [B, H, W, C]: the model's eps and variance channels; var_values in
    [-1, 1] interpolate the log variance between the posterior's (-1) and beta_t (+1).
    """
    true_mean = _at(schedule.posterior_mean_coef1, t) * x0 + _at(
        schedule.posterior_mean_coef2, t
    ) * x_t
    true_logvar = _at(schedule.posterior_log_variance_clipped, t)
    pred_x0 = _at(schedule.sqrt_recip_alphas_cumprod, t) * x_t - _at(
        schedule.sqrt_recipm1_alphas_cumprod, t
    ) * eps
    model_mean = _at(schedule.posterior_mean_coef1, t) * pred_x0 + _at(
        schedule.posterior_mean_coef2, t
    ) * x_t
    frac = (var_values + 1.0) / 2.0
    model_logvar = frac * _at(np.log(schedule.betas), t) + (1.0 - frac) * true_logvar
    kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / np.log(2.0)
    nll = -_mean_flat(
        discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_logvar)
    ) / np.log(2.0)
    return jnp.where(t == 0, nll, kl)


def ddpm_loss_terms(
    unet_apply: TrainApply,
    schedule: DiffusionSchedule,
    x0: jax.Array,
    rng: jax.Array,
    *,
    rescale_timesteps: bool,
) -> dict[str, jax.Array]:
    """Batch means of "mse", "vb" (0 without learned variance) and "loss" = mse + vb.

    x0 [B, H, W, C] clean images in [-1, 1]; one t ~ U{0..T-1} and one eps per image; the
    rest of `rng` drives dropout. The model's output width (C or 2C) says whether it
    learns the variance.
    """
    b, c = x0.shape[0], x0.shape[-1]
    t_key, noise_key, dropout_key = jax.random.split(rng, 3)
    t = jax.random.randint(t_key, (b,), 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    x_t = _at(schedule.sqrt_alphas_cumprod, t) * x0 + _at(
        schedule.sqrt_one_minus_alphas_cumprod, t
    ) * noise
    t_model = model_timestep(t, schedule.num_timesteps, rescale_timesteps=rescale_timesteps)
    out = unet_apply(x_t, t_model, rng=dropout_key).astype(jnp.float32)
    if out.shape[-1] == 2 * c:
        eps, var_values = out[..., :c], out[..., c:]
        # The bound trains the variance only; the mean is trained by the MSE alone.
        vb = vlb_term(schedule, x0, x_t, t, jax.lax.stop_gradient(eps), var_values)
        vb = vb * (schedule.num_timesteps / 1000.0)
    elif out.shape[-1] == c:
        eps, vb = out, jnp.zeros((b,), jnp.float32)
    else:
        raise ValueError(
            f"model output must have {c} (eps) or {2 * c} (eps + variance) channels, "
            f"got {out.shape[-1]}"
        )
    mse = _mean_flat(jnp.square(noise - eps))
    return {"mse": mse.mean(), "vb": vb.mean(), "loss": (mse + vb).mean()}


def ddpm_loss(
    unet_apply: TrainApply,
    schedule: DiffusionSchedule,
    x0: jax.Array,
    rng: jax.Array,
    *,
    rescale_timesteps: bool,
) -> jax.Array:
    """Scalar DDPM loss on clean images x0 [B, H, W, C] in [-1, 1] (see ddpm_loss_terms)."""
    return ddpm_loss_terms(
        unet_apply, schedule, x0, rng, rescale_timesteps=rescale_timesteps
    )["loss"]
