"""Sound randomized smoothing in floating point (noise="sound"): the exploit, the sampler's
law, the certificate against an exactly known smoothed classifier, and the margins.

About 70 s on 2 cores (the exploit's table of all 2^23 float32 outputs of
jax.random.normal is built once per module, ~7 s).
"""

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from jax import lax
from scipy import stats

from dmae_jax import smoothing
from dmae_jax.smoothing import Settings, cascade, sequential, sound

LEVELS = 255


# ------------------------------------------------------------------------------------------
# A classifier built to exploit the float sampler.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator_outputs():
    """Every value jax.random.normal(key, (), float32) can return, sorted [2^23].

    jax.random.normal draws 23 random mantissa bits, makes a float in [1, 2), shifts it to
    u in (-1, 1) and returns sqrt(2) erf_inv(u) (jax/_src/random); this replays that on all
    2^23 mantissas.
    """
    mantissas = jnp.arange(2**23, dtype=jnp.uint32)
    one = jnp.asarray(np.array(1.0, np.float32).view(np.uint32))
    floats = lax.bitcast_convert_type(lax.bitwise_or(mantissas, one), jnp.float32) - 1.0
    low = np.nextafter(np.float32(-1.0), np.float32(0.0), dtype=np.float32)
    u = lax.max(low, floats * (np.float32(1.0) - low) + low)
    return jnp.sort(np.float32(np.sqrt(2)) * lax.erf_inv(u))


def exploit_logits(table, scale, images):
    """Class 0 iff the first pixel / scale is a value the float generator produces, else 1.

    At x = 0 with sigma = scale (a power of two) every float noisy sample is scale * n
    exactly, so it votes 0; shifted by 2^-10 almost none is (about 11%).
    """
    v = images.reshape(images.shape[0], -1)[:, 0].astype(jnp.float32) / scale
    hit = table[jnp.clip(jnp.searchsorted(table, v), 0, table.shape[0] - 1)] == v
    return jnp.stack([hit, ~hit], -1).astype(jnp.float32)


def exploit(table, scale):
    """exploit_logits as a pytree logits_fn (one compiled step serves every scale)."""
    return smoothing.place_replicated(
        jax.tree_util.Partial(exploit_logits, table, jnp.float32(scale)))


X0 = np.zeros((1, 1, 1), np.float32)
NEAR = np.full((1, 1, 1), 2.0**-10, np.float32)  # distance 0.00098 from X0


def sound_prediction_at(fn, x, sigma, num=4000, seed=0):
    """The sound smoothed classifier g(x) = argmax P(f(Q(x + eps))), eps ~ N(0, sigma^2),
    evaluated independently of the engine: float64 NumPy noise, then rounding to the grid."""
    eps = np.random.default_rng(seed).standard_normal((num, *x.shape)) * sigma
    quantised = (np.rint((x + eps) * LEVELS) / LEVELS).astype(np.float32)
    votes = np.bincount(np.argmax(np.asarray(fn(jnp.asarray(quantised))), -1), minlength=2)
    return int(np.argmax(votes)), votes


@pytest.mark.parametrize("noise", ["float", "sound"])
def test_the_exploit_gets_a_wrong_certificate_with_float_noise_and_none_with_sound_noise(
        generator_outputs, noise):
    fn = exploit(generator_outputs, 1.0)
    kwargs = dict(sigma=1.0, n0=100, n=2000, alpha=0.001, batch_size=128, num_classes=2,
                  noise=noise)
    certified, radius = smoothing.certify(fn, X0, rng=jax.random.key(0), **kwargs)
    near = smoothing.predict(fn, NEAR, rng=jax.random.key(1), **(kwargs | dict(n=1000)))
    if noise == "float":
        assert radius > 2.0
        # Certified class 0 at distance 3 around X0, yet the same smoothed classifier
        # (float noise added to NEAR) says class 1 at distance 2^-10: a wrong certificate.
        assert (certified, near) == (0, 1)
    else:
        # The sound smoothed classifier quantises: at NEAR it is evaluated without the
        # engine (NumPy float64 noise, then Q), and at grid points by the engine.
        assert radius > 0.5
        assert certified == near == sound_prediction_at(fn, NEAR, 1.0)[0] == 1
        one_step = np.full((1, 1, 1), 1 / LEVELS, np.float32)
        assert smoothing.predict(fn, one_step, rng=jax.random.key(2), **kwargs) == 1


@pytest.mark.parametrize("noise", ["float", "sound"])
def test_the_cascade_and_the_sequential_engine_are_sound_only_with_sound_noise(
        generator_outputs, noise):
    fns = [exploit(generator_outputs, 1.0), exploit(generator_outputs, 0.5)]
    # One batch size for every call: a single compiled step (compiling dominates here).
    settings = Settings(sigma=(1.0, 0.5), n0=100, n=1500, alpha=0.001, batch_size=128,
                        num_classes=2, noise=noise)
    fixed = cascade.certify_cascade(fns, X0, settings, rng=jax.random.key(0))
    seq = sequential.certify_cascade_sequential(fns, X0, settings, rng=jax.random.key(1))
    single = sequential.certify_sequential(
        fns[0], X0, Settings(sigma=1.0, n0=100, n=1500, alpha=0.001, batch_size=128,
                             num_classes=2, noise=noise), rng=jax.random.key(2))
    near_float = smoothing.predict(fns[0], NEAR, sigma=1.0, n=512, alpha=0.001,
                                   batch_size=128, rng=jax.random.key(3), num_classes=2)
    for result in (fixed, seq, single):
        assert result.prediction >= 0 and result.radius > 0.5
        if noise == "float":
            # Class 0 at stage 0 (sigma 1), yet sigma 1's smoothed classifier is class 1
            # at NEAR: the cascade outputs 1 there, inside the certified ball.
            assert (result.prediction, near_float) == (0, 1)
        else:
            assert result.prediction == sound_prediction_at(fns[0], NEAR, 1.0)[0] == 1


# ------------------------------------------------------------------------------------------
# The sampler's law.
# ------------------------------------------------------------------------------------------


def test_thresholds_are_the_rounded_gaussian_cdf_to_64_bits():
    sigma = 0.25
    table = sound.rounded_gaussian(sigma, LEVELS)
    thresholds = (table.high.astype(object) << 32) + table.low.astype(object)
    s = sigma * LEVELS
    with mpmath.workdps(30):
        for j in (0, 100, len(thresholds) // 2, len(thresholds) - 1):
            exact = mpmath.ncdf((table.z_min + j + mpmath.mpf(1) / 2) / s) * 2**64
            assert abs(int(thresholds[j]) - exact) <= 0.5
    assert all(a <= b for a, b in zip(thresholds, thresholds[1:], strict=False))
    assert table.z_min < -9 * s  # the tails beyond carry < 2^-64 each
    # The declared total variation: about one 2^-65 rounding per threshold plus the tails.
    tails = 2 * stats.norm.cdf((table.z_min - 0.5) / s)
    assert 0 < table.tv <= (len(thresholds) + 1) * 2.0**-65 + tails


def exact_law(table):
    """(values z, P'(z)) of the sampler, exactly from its integer thresholds."""
    thresholds = [0, *((table.high.astype(object) << 32) + table.low.astype(object)), 2**64]
    probs = np.asarray([(b - a) / 2**64 for a, b in zip(thresholds, thresholds[1:], strict=False)])
    return table.z_min + np.arange(len(probs)), probs


def chi_square_p_value(draws, values, probs):
    """Pearson's test of draws against the law (values, probs), rare cells pooled."""
    observed = np.bincount(draws - values[0], minlength=len(values)).astype(float)
    expected = probs * len(draws)
    keep = expected >= 5
    observed = np.append(observed[keep], observed[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    return stats.chisquare(observed, expected).pvalue


def test_the_jax_sampler_draws_the_thresholds_law_and_the_test_has_power():
    sigma = 0.02  # s = 5.1 grid steps: few cells, so the test sees every one of them
    table = sound.rounded_gaussian(sigma, LEVELS)
    keys = jax.random.split(jax.random.key(0), 50)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sound.noise(
        k, (4000,), jnp.asarray(table.high), jnp.asarray(table.low), table.z_min)))(keys))
    values, probs = exact_law(table)
    assert chi_square_p_value(draws.ravel(), values, probs) > 1e-4
    # Control: a law 3% wider is rejected by the same test on the same draws.
    s = sigma * LEVELS * 1.03
    wider = stats.norm.cdf((values + 0.5) / s) - stats.norm.cdf((values - 0.5) / s)
    assert chi_square_p_value(draws.ravel(), values, wider / wider.sum()) < 1e-6


# ------------------------------------------------------------------------------------------
# The certificate against an exactly known sound smoothed classifier.
# ------------------------------------------------------------------------------------------


K, T = 128, 64  # the image is K / 255; class 0 iff the grid index is below K + T
SIGMA = 0.25


def threshold_logits(images):
    """Class 0 iff round(255 v) < K + T (one pixel)."""
    index = jnp.rint(images.reshape(images.shape[0], -1)[:, 0] * LEVELS)
    below = index < K + T
    return jnp.stack([below, ~below], -1).astype(jnp.float32)


def test_sound_certificates_are_wrong_at_most_alpha_and_the_check_has_power():
    # The sound smoothed classifier g(x') = P(Q(x' + eps) < (K + T) / 255) = Phi((b - x')/
    # sigma) with b = (K + T - 1/2) / 255: class 0 up to b exactly, so the true radius at
    # x = K / 255 is (T - 1/2) / 255 and pA = Phi((T - 1/2) / (255 sigma)) = 0.84.
    x = np.full((1, 1, 1), K / LEVELS, np.float32)
    true_radius = (T - 0.5) / LEVELS
    pA = stats.norm.cdf(true_radius / SIGMA)
    repetitions, n, alpha = 2000, 100, 0.05
    counts = smoothing.sample_counts_many(
        threshold_logits, np.broadcast_to(x, (repetitions, 1, 1, 1)), num=n,
        rng=jax.random.key(5), sigma=SIGMA, batch_size=4000, num_classes=2, noise="sound")
    margin = sound.margin(SIGMA, LEVELS, x)

    def wrong_rate(level):
        radii = np.array([margin.radius(smoothing.radius_from_bound(
            margin.lower(smoothing.lower_confidence_bound(int(k), n, level)), SIGMA))
            for k in counts[:, 0]])
        return np.mean(radii > true_radius)

    allowed = alpha + 3 * np.sqrt(alpha * (1 - alpha) / repetitions)
    assert wrong_rate(alpha) <= allowed
    assert wrong_rate(4 * alpha) > allowed  # control: a bound at 4 alpha fails the check
    # The votes follow the sound noise's law: pA within 5 standard errors.
    p_hat = counts[:, 0].sum() / (repetitions * n)
    assert abs(p_hat - pA) < 5 * np.sqrt(pA * (1 - pA) / (repetitions * n))
    # certify() on the same settings applies exactly these margins.
    result = smoothing.certify_detailed(threshold_logits, x, sigma=SIGMA, n0=50, n=1000,
                                        alpha=0.001, batch_size=1000, rng=jax.random.key(1),
                                        num_classes=2, noise="sound")
    bound = margin.lower(smoothing.lower_confidence_bound(
        int(result.counts_estimation[0]), 1000, 0.001))
    assert (result.prediction, result.pA_lower) == (0, bound)
    assert result.radius == margin.radius(smoothing.radius_from_bound(bound, SIGMA))
    assert 0 < result.radius <= true_radius


def test_margins_are_exact_for_float_noise_and_safe_for_sound_noise():
    assert sound.EXACT.lower(0.7) == 0.7 and sound.EXACT.radius(0.3) == 0.3
    on_grid = np.full((2, 2, 3), 17 / LEVELS, np.float32)
    margin = sound.margin(0.5, LEVELS, on_grid)
    assert margin.shift < 1e-7  # float32 round-off of k / 255 only
    assert 0 < margin.tv < 1e-13 and margin.lower(0.7) < 0.7 < margin.upper(0.7)
    assert 0.3 - 1e-7 < margin.radius(0.3) < 0.3
    off_grid = on_grid + np.float32(0.4 / LEVELS)  # 0.4 grid steps off in 12 pixels
    shifted = sound.margin(0.5, LEVELS, off_grid)
    assert shifted.shift == pytest.approx(np.sqrt(12) * 0.4 / LEVELS, rel=1e-5)
    assert shifted.radius(0.3) < 0.3 - shifted.shift + 1e-12


def test_sound_counts_do_not_depend_on_devices_or_batch_size():
    x = np.full((2, 2, 1), 0.5, np.float32)
    noisy = lambda images: images.reshape(images.shape[0], 4)  # noqa: E731
    devices = jax.local_devices()
    common = dict(sigma=1.0, num=333, rng=jax.random.key(4), num_classes=4, noise="sound")
    one = smoothing.sample_counts(noisy, x, batch_size=64, devices=devices[:1], **common)
    four = smoothing.sample_counts(noisy, x, batch_size=128, devices=devices, **common)
    np.testing.assert_array_equal(one, four)
    assert one.sum() == 333
