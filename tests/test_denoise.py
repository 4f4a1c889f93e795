"""Schedules, sigma -> t*, one-shot denoising, the denoise-and-classify logits_fn, DDPM loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dmae_jax.architectures import UNetConfig
from dmae_jax.diffusion import denoise, losses
from dmae_jax.diffusion.denoise import model_timestep
from dmae_jax.diffusion.schedule import (
    make_schedule,
    timestep_for_sigma,
)
from dmae_jax.models.unet import UNet

# Small enough to compile quickly; the presets themselves are covered in test_unet.py.
TINY = UNetConfig(
    image_size=8, in_channels=3, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
    attention_ds=(2,), num_head_channels=32, dropout=0.1,
)
CIFAR = make_schedule("cosine", 4000)
IMAGENET = make_schedule("linear", 1000)


# ---------------------------------------------------------------------------------------
# Schedules and t*.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, expected",
    [(CIFAR, (573, 1158, 1984, 2809)), (IMAGENET, (70, 145, 259, 396))],
    ids=["cifar10_cosine_4000", "imagenet_linear_1000"],
)
def test_t_star_matches_the_published_table(schedule, expected):
    got = tuple(timestep_for_sigma(schedule, s)[0] for s in (0.12, 0.25, 0.5, 1.0))
    assert got == expected


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0, 0.37])
def test_t_star_is_the_first_step_whose_noise_reaches_two_sigma(sigma):
    for schedule in (CIFAR, IMAGENET):
        t, sqrt_abar = timestep_for_sigma(schedule, sigma)
        assert sqrt_abar == schedule.sqrt_alphas_cumprod[t]
        s_t = schedule.sqrt_recipm1_alphas_cumprod  # noise std of x_t / sqrt(abar_t)
        assert s_t[t] >= 2 * sigma * (1 - 1e-12) and s_t[t - 1] < 2 * sigma


def test_sigma_outside_the_schedule_is_an_error():
    with pytest.raises(ValueError, match="sigma must be > 0, got 0"):
        timestep_for_sigma(IMAGENET, 0.0)
    with pytest.raises(ValueError, match="exceeds the largest noise level"):
        timestep_for_sigma(IMAGENET, 1000.0)


def test_linear_schedule_is_ho_et_al_rescaled_to_t_steps():
    for steps in (1000, 4000):
        betas = make_schedule("linear", steps).betas
        scale = 1000 / steps
        assert betas.dtype == np.float64
        np.testing.assert_allclose([betas[0], betas[-1]], [1e-4 * scale, 0.02 * scale])


def test_cosine_schedule_follows_alpha_bar_and_caps_beta():
    s = make_schedule("cosine", 100)
    f = np.cos((np.arange(101) / 100 + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(s.alphas_cumprod[:-1], (f[1:] / f[0])[:-1], rtol=1e-10)
    assert s.betas.max() == 0.999 and np.all(np.diff(s.alphas_cumprod) < 0)


def test_model_timestep_is_rescaled_to_1000_only_when_asked():
    np.testing.assert_array_equal(model_timestep(573, 4000, rescale_timesteps=True), 143.25)
    np.testing.assert_array_equal(model_timestep(70, 1000, rescale_timesteps=False), 70.0)


# ---------------------------------------------------------------------------------------
# One-shot denoising.
# ---------------------------------------------------------------------------------------


def oracle(schedule, x01, sigma, *, rescale_timesteps, extra_channels=0):
    """An eps-predictor that knows the clean image x01, so it returns the exact noise."""
    t_star, sqrt_abar = timestep_for_sigma(schedule, sigma)
    expected_t = model_timestep(t_star, schedule.num_timesteps, rescale_timesteps=rescale_timesteps)
    clean = sqrt_abar * (2.0 * x01 - 1.0)

    def unet_apply(x_t, t):
        np.testing.assert_array_equal(np.asarray(t), np.full(x_t.shape[0], expected_t))
        eps = (x_t - clean) / np.sqrt(1.0 - sqrt_abar**2)
        garbage = jnp.full(x_t.shape[:3] + (extra_channels,), 1e3)
        return jnp.concatenate([eps, garbage], axis=-1)

    return unet_apply


def noisy_batch(sigma, shape=(3, 8, 8, 3), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=shape).astype(np.float32)
    return x, (x + sigma * rng.normal(size=shape)).astype(np.float32)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("rescale", [True, False])
def test_an_oracle_eps_predictor_recovers_the_clean_image(sigma, rescale):
    schedule = CIFAR if rescale else IMAGENET
    x, noisy = noisy_batch(sigma)
    unet = oracle(schedule, x, sigma, rescale_timesteps=rescale, extra_channels=3)
    x_hat = denoise.one_shot_denoise(unet, schedule, noisy, sigma, rescale_timesteps=rescale)
    np.testing.assert_allclose(np.asarray(x_hat), x, atol=2e-5)


def test_x_t_is_the_noisy_image_in_model_space_scaled_by_sqrt_alpha_bar():
    sigma = 0.5
    _, noisy = noisy_batch(sigma)
    t_star, sqrt_abar = timestep_for_sigma(CIFAR, sigma)
    seen = {}

    def unet_apply(x_t, t):
        seen["x_t"] = np.asarray(x_t)
        return jnp.zeros_like(x_t)

    x_hat = denoise.one_shot_denoise(
        unet_apply, CIFAR, noisy, sigma, rescale_timesteps=True, clip=False
    )
    np.testing.assert_allclose(seen["x_t"], sqrt_abar * (2 * noisy - 1), rtol=1e-6, atol=1e-6)
    # With eps = 0, x0_hat = x_t / sqrt(abar): the noisy image itself.
    np.testing.assert_allclose(np.asarray(x_hat), noisy, atol=1e-5)


def test_output_is_clipped_to_the_unit_interval():
    _, noisy = noisy_batch(1.0)

    def wild(x_t, t):
        return 50.0 * jnp.sign(jnp.sin(1000 * x_t))

    clipped = denoise.one_shot_denoise(wild, IMAGENET, noisy, 1.0, rescale_timesteps=False)
    assert float(clipped.min()) == 0.0 and float(clipped.max()) == 1.0
    raw = denoise.one_shot_denoise(
        wild, IMAGENET, noisy, 1.0, rescale_timesteps=False, clip=False
    )
    assert float(raw.min()) < 0.0 and float(raw.max()) > 1.0


def test_reflect_pad_and_center_crop_match_pytorch():
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    padded = denoise.reflect_pad(jnp.asarray(x), 2)
    expected = torch.nn.ReflectionPad2d(2)(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(np.asarray(padded), expected.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np.asarray(denoise.center_crop(padded, 6)), x)


def test_imagenet_224_is_padded_to_256_for_the_unet_and_cropped_back():
    sigma = 0.5
    x, noisy = noisy_batch(sigma, shape=(1, 224, 224, 3))
    t_star, sqrt_abar = timestep_for_sigma(IMAGENET, sigma)
    x_t = sqrt_abar * (2 * noisy - 1)
    seen = {}

    def unet_apply(model_in, t):
        seen["shape"] = model_in.shape
        np.testing.assert_allclose(
            np.asarray(model_in),
            np.pad(x_t, ((0, 0), (16, 16), (16, 16), (0, 0)), mode="reflect"),
            atol=1e-6,
        )
        # A per-pixel predictor: padding must not change what the 224 pixels get.
        return oracle(IMAGENET, np.pad(x, ((0, 0), (16, 16), (16, 16), (0, 0)), mode="reflect"),
                      sigma, rescale_timesteps=False, extra_channels=3)(model_in, t)

    x_hat = denoise.one_shot_denoise(
        unet_apply, IMAGENET, noisy, sigma, rescale_timesteps=False, pad_to=256
    )
    assert seen["shape"] == (1, 256, 256, 3)
    assert x_hat.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(np.asarray(x_hat), x, atol=2e-5)


@pytest.mark.parametrize("pad_to", [200, 225, 1000])
def test_bad_pad_to_is_an_error(pad_to):
    _, noisy = noisy_batch(0.25, shape=(1, 224, 224, 3))
    with pytest.raises(ValueError, match="pad_to"):
        denoise.one_shot_denoise(
            lambda x, t: x, IMAGENET, noisy, 0.25, rescale_timesteps=False, pad_to=pad_to
        )


# ---------------------------------------------------------------------------------------
# The logits_fn handed to the certification engine.
# ---------------------------------------------------------------------------------------


def make_denoised_logits_fn(unet, schedule, classifier_logits_fn, sigma, *,
                            rescale_timesteps, pad_to=None):
    """The certification engine's logits_fn for a UNet denoiser in front of a classifier."""
    return denoise.denoise_then_classify(
        denoise.make_diffusion_denoise_fn(unet, schedule, sigma,
                                          rescale_timesteps=rescale_timesteps, pad_to=pad_to),
        classifier_logits_fn)


def _linear_logits(w, images):
    return images.mean(axis=(1, 2)) @ w


def linear_classifier(num_classes=10):
    w = jax.random.normal(jax.random.key(0), (3, num_classes))
    return jax.tree_util.Partial(_linear_logits, w)


def test_logits_fn_of_a_real_unet_maps_noisy_images_to_logits_and_jits():
    unet = UNet(TINY, rngs=nnx.Rngs(0))
    schedule = make_schedule("cosine", 1000)
    logits_fn = make_denoised_logits_fn(
        unet, schedule, linear_classifier(), 0.5, rescale_timesteps=False
    )
    # A pytree over the weights, so jitted callers get them as arguments, not constants.
    num_params = len(jax.tree.leaves(nnx.state(unet, nnx.Param)))
    arrays = [leaf for leaf in jax.tree.leaves(logits_fn) if isinstance(leaf, jax.Array)]
    assert len(arrays) == num_params + 1  # + the classifier's w
    _, noisy = noisy_batch(0.5, shape=(4, 8, 8, 3))
    logits = jax.jit(lambda f, x: f(x))(logits_fn, jnp.asarray(noisy))
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    # A fresh UNet predicts eps = 0, so it returns the clipped noisy image.
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(linear_classifier()(np.clip(noisy, 0, 1))), atol=1e-4
    )


def test_the_certification_engine_runs_denoise_and_classify():
    from dmae_jax.smoothing import certify

    unet = UNet(TINY, rngs=nnx.Rngs(0))
    logits_fn = make_denoised_logits_fn(
        unet, make_schedule("cosine", 1000), linear_classifier(), 0.25, rescale_timesteps=False
    )
    x = noisy_batch(0.25, shape=(1, 8, 8, 3))[0][0]  # a clean image in [0, 1]
    prediction, radius = certify(
        logits_fn, x, sigma=0.25, n0=8, n=16, alpha=0.001, batch_size=8,
        rng=jax.random.key(0), num_classes=10,
    )
    assert -1 <= prediction < 10 and radius >= 0.0


def test_any_denoiser_can_sit_in_front_of_the_classifier():
    _, noisy = noisy_batch(0.25, shape=(5, 8, 8, 3))
    logits_fn = denoise.denoise_then_classify(lambda x: jnp.clip(x, 0, 1), linear_classifier(7))
    assert logits_fn(jnp.asarray(noisy)).shape == (5, 7)


def test_denoiser_factory_rejects_an_impossible_sigma_at_construction():
    with pytest.raises(ValueError, match="sigma must be > 0"):
        make_denoised_logits_fn(
            lambda x, t: x, CIFAR, linear_classifier(), -0.25, rescale_timesteps=True
        )


# ---------------------------------------------------------------------------------------
# The DDPM training loss.
# ---------------------------------------------------------------------------------------


def x0_batch(shape=(4, 8, 8, 3)):
    return jax.random.uniform(jax.random.key(1), shape, minval=-1.0, maxval=1.0)


def eps_oracle(schedule, x0, *, learn_sigma=False, var_value=-1.0):
    """Returns the exact noise of x_t given x0 (and a constant variance channel)."""

    def unet_apply(x_t, t_model, *, rng):
        t = jnp.round(t_model).astype(jnp.int32)
        a = jnp.asarray(schedule.sqrt_alphas_cumprod, jnp.float32)[t][:, None, None, None]
        eps = (x_t - a * x0) / jnp.sqrt(1.0 - a**2)
        if learn_sigma:
            return jnp.concatenate([eps, jnp.full_like(eps, var_value)], axis=-1)
        return eps

    return unet_apply


def test_ddpm_loss_is_zero_for_the_true_noise():
    schedule = make_schedule("linear", 1000)
    x0 = x0_batch()
    terms = losses.ddpm_loss_terms(
        eps_oracle(schedule, x0), schedule, x0, jax.random.key(0), rescale_timesteps=False
    )
    assert float(terms["mse"]) < 1e-6 and float(terms["vb"]) == 0.0


def test_vb_term_vanishes_only_for_the_true_noise_and_the_posterior_variance():
    schedule = make_schedule("linear", 1000)
    x0 = x0_batch()
    noise = jax.random.normal(jax.random.key(2), x0.shape)
    t = jnp.array([1, 2, 3, 4])  # early steps, where beta_t and the posterior differ most
    a = jnp.asarray(schedule.sqrt_alphas_cumprod, jnp.float32)[t][:, None, None, None]
    x_t = a * x0 + jnp.sqrt(1 - a**2) * noise

    def vb(eps, var_value):
        var = jnp.full_like(x0, var_value)  # -1: posterior variance, +1: beta_t
        return np.asarray(losses.vlb_term(schedule, x0, x_t, t, eps, var))

    assert np.all(np.abs(vb(noise, -1.0)) < 1e-5)
    # With the right mean, the KL between N(., posterior var) and N(., beta_t) in bits:
    lv_q, lv_p = schedule.posterior_log_variance_clipped[1:5], np.log(schedule.betas[1:5])
    kl_bits = 0.5 * (-1 + lv_p - lv_q + np.exp(lv_q - lv_p)) / np.log(2)
    np.testing.assert_allclose(vb(noise, 1.0), kl_bits, rtol=1e-3)
    assert np.all(kl_bits > 0.01)
    assert np.all(vb(noise + 0.1, -1.0) > 1e-3)  # so does the wrong mean
    # At t = 0 the term is the decoder NLL of 8-bit pixels, always positive.
    nll = losses.vlb_term(schedule, x0, x0, jnp.zeros(4, jnp.int32), noise * 0, -jnp.ones_like(x0))
    assert np.all(np.asarray(nll) > 0)


def test_vb_term_trains_only_the_variance_channels():
    schedule = make_schedule("cosine", 4000)
    x0 = x0_batch()

    def loss_of(eps_offset, var_value):
        def unet_apply(x_t, t, *, rng):
            out = eps_oracle(schedule, x0, learn_sigma=True)(x_t, t / 0.25, rng=rng)
            c = x0.shape[-1]
            return jnp.concatenate([out[..., :c] + eps_offset, out[..., c:] * 0 + var_value], -1)

        return losses.ddpm_loss_terms(
            unet_apply, schedule, x0, jax.random.key(3), rescale_timesteps=True
        )["vb"]

    g_eps, g_var = jax.grad(loss_of, argnums=(0, 1))(0.3, 0.2)
    assert float(g_eps) == 0.0 and float(g_var) != 0.0


def test_fresh_unet_loss_is_the_noise_energy_and_gradients_are_finite():
    unet = UNet(TINY, rngs=nnx.Rngs(0))
    schedule = make_schedule("cosine", 1000)
    x0 = x0_batch((16, 8, 8, 3))
    graphdef, params = nnx.split(unet)

    @jax.jit
    def loss_and_grad(params):
        def loss(p):
            return losses.ddpm_loss(
                nnx.merge(graphdef, p), schedule, x0, jax.random.key(0), rescale_timesteps=False
            )

        return jax.value_and_grad(loss)(params)

    value, grads = loss_and_grad(params)
    # The output conv starts at zero, so eps_theta = 0 and the loss is E||eps||^2 ~ 1.
    assert 0.9 < float(value) < 1.1
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert float(jnp.abs(grads["out_conv"]["kernel"][...]).max()) > 0
