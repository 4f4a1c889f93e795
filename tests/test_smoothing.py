"""Specification of PREDICT/CERTIFY: analytic classifiers, statistics, determinism, input checks.

conftest.py gives 4 CPU devices, so every batch size here is a multiple of 4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from dmae_jax import smoothing

# A linear binary classifier on 2x2x1 images: f(x) = [w.x + b > 0]. With w = (3, 4, 0, 0),
# b = -1 and x = (1, 0.5, 0.3, 0.7) the margin (distance to the hyperplane) is 4 / 5 = 0.8.
W = np.array([3.0, 4.0, 0.0, 0.0], np.float32).reshape(2, 2, 1)
B = -1.0
X = np.array([1.0, 0.5, 0.3, 0.7], np.float32).reshape(2, 2, 1)
MARGIN = 0.8
SIGMA = 0.5


def linear_logits(images):
    """[B, 2, 2, 1] -> [B, 2]: class 1 on the positive side of the hyperplane."""
    z = jnp.sum(images * W, axis=(1, 2, 3)) + B
    return jnp.stack([-z, z], axis=-1)


def constant_logits(images):
    """[B, H, W, C] -> [B, 3]: always class 2."""
    return jnp.tile(jnp.array([0.0, 1.0, 5.0]), (images.shape[0], 1))


def certify_linear(n, seed, alpha=0.001, **kwargs):
    return smoothing.certify_detailed(
        linear_logits, X, sigma=SIGMA, n0=100, n=n, alpha=alpha, batch_size=1000,
        rng=jax.random.key(seed), num_classes=2, **kwargs,
    )


# --- Statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 100, 10_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_lower_confidence_bound_is_one_sided_clopper_pearson(n, alpha):
    for nA in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        bound = smoothing.lower_confidence_bound(nA, n, alpha)
        expected = 0.0 if nA == 0 else stats.beta.ppf(alpha, nA, n - nA + 1)
        assert bound == expected
        # Cohen et al. call statsmodels with 2 alpha: the lower end of a two-sided interval.
        statsmodels_bound = proportion_confint(nA, n, alpha=2 * alpha, method="beta")[0]
        assert bound == pytest.approx(statsmodels_bound, abs=1e-12)


def test_lower_confidence_bound_is_zero_not_nan_at_zero_successes():
    assert smoothing.lower_confidence_bound(0, 100, 0.001) == 0.0


def test_lower_confidence_bound_at_all_successes_is_alpha_root_n():
    assert smoothing.lower_confidence_bound(10_000, 10_000, 0.001) == 0.001 ** (1 / 10_000)


def test_wrong_certificates_are_at_most_an_alpha_fraction():
    # Known pA: the linear classifier at margin 0.8 has pA = Phi(margin / sigma). A certificate
    # is wrong when its radius exceeds the exact radius, i.e. pA_lower > pA. 2000 independent
    # repetitions of n = 100 samples drawn through sample_counts_many (per-image keys), with
    # alpha = 0.05 so that the count is informative: expect <= 100, allow 3 sd (~ 30) more.
    pA = stats.norm.cdf(MARGIN / SIGMA)
    repetitions, n, alpha = 2000, 100, 0.05
    counts = smoothing.sample_counts_many(
        linear_logits, np.broadcast_to(X, (repetitions, *X.shape)), sigma=SIGMA, num=n,
        batch_size=4000, rng=jax.random.key(7), num_classes=2,
    )
    radii = np.array([
        smoothing.radius_from_bound(smoothing.lower_confidence_bound(int(k), n, alpha), SIGMA)
        for k in counts[:, 1]
    ])
    assert np.mean(radii > MARGIN) <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / repetitions)
    # The noise really is N(0, sigma^2): the empirical pA matches within 5 standard errors.
    p_hat = counts[:, 1].sum() / (repetitions * n)
    assert abs(p_hat - pA) < 5 * np.sqrt(pA * (1 - pA) / (repetitions * n))


# --- Analytic classifiers --------------------------------------------------------------------


def test_linear_classifier_smoothed_prediction_is_the_base_prediction():
    result = certify_linear(n=1000, seed=0)
    assert result.prediction == 1
    assert smoothing.predict(
        linear_logits, X, sigma=SIGMA, n=1000, alpha=0.001, batch_size=1000,
        rng=jax.random.key(1), num_classes=2,
    ) == 1


def test_radius_never_exceeds_linear_classifier_distance():
    radii = [certify_linear(n=1000, seed=seed).radius for seed in range(20)]
    assert max(radii) <= MARGIN
    assert min(radii) > 0.5


def test_radius_approaches_linear_classifier_distance_as_n_grows():
    radii = [certify_linear(n=n, seed=3).radius for n in (1_000, 10_000, 100_000)]
    assert radii[0] < radii[1] < radii[2] <= MARGIN
    assert radii[2] == pytest.approx(MARGIN, abs=0.02)


def test_constant_classifier_radius_is_sigma_times_inverse_normal_of_alpha_root_n():
    for n, alpha, sigma in [(1000, 0.001, 0.25), (12_345, 0.01, 1.0)]:
        prediction, radius = smoothing.certify(
            constant_logits, X, sigma=sigma, n0=100, n=n, alpha=alpha, batch_size=1000,
            rng=jax.random.key(n), num_classes=3,
        )
        assert prediction == 2
        assert radius == sigma * stats.norm.ppf(alpha ** (1 / n))


def test_certify_abstains_when_no_class_has_half_the_votes():
    # Exactly on the hyperplane pA = 1/2, so pA_lower < 1/2.
    on_plane = np.array([0.2, 0.1, 0.0, 0.0], np.float32).reshape(2, 2, 1)
    result = smoothing.certify_detailed(
        linear_logits, on_plane, sigma=SIGMA, n0=100, n=1000, alpha=0.001, batch_size=1000,
        rng=jax.random.key(0), num_classes=2,
    )
    assert (result.prediction, result.radius) == (smoothing.ABSTAIN, 0.0)
    assert result.pA_lower < 0.5
    assert result.counts_estimation.sum() == 1000 and result.n_drawn == 1100


def test_predict_with_ten_samples_always_abstains_at_alpha_0_001():
    # All ten votes agree, yet the two-sided p-value 2^(1 - 10) = 0.00195 > 0.001.
    kwargs = dict(sigma=SIGMA, alpha=0.001, batch_size=4, rng=jax.random.key(0), num_classes=3)
    assert smoothing.predict(constant_logits, X, n=10, **kwargs) == smoothing.ABSTAIN
    assert smoothing.predict(constant_logits, X, n=11, **kwargs) == 2


def test_predict_abstains_on_an_even_split():
    on_plane = np.array([0.2, 0.1, 0.0, 0.0], np.float32).reshape(2, 2, 1)
    assert smoothing.predict(
        linear_logits, on_plane, sigma=SIGMA, n=1000, alpha=0.001, batch_size=1000,
        rng=jax.random.key(0), num_classes=2,
    ) == smoothing.ABSTAIN


def test_tied_logits_vote_for_the_lowest_class():
    tied = lambda images: jnp.tile(jnp.array([0.0, 1.0, 0.0, 1.0]), (images.shape[0], 1))
    result = smoothing.certify_detailed(
        tied, X, sigma=SIGMA, n0=8, n=100, alpha=0.001, batch_size=8, rng=jax.random.key(0),
        num_classes=4,
    )
    assert result.counts_selection.tolist() == [0, 8, 0, 0]
    assert result.prediction == 1


def test_early_abstain_is_an_explicit_option_and_reported():
    kwargs = dict(sigma=SIGMA, n0=20, n=1000, alpha=0.001, batch_size=1000, num_classes=3)
    wrong = smoothing.certify_detailed(
        constant_logits, X, rng=jax.random.key(0), early_abstain_label=0, **kwargs
    )
    assert (wrong.prediction, wrong.radius, wrong.abstained_early) == (-1, 0.0, True)
    assert wrong.n_drawn == 20 and wrong.counts_estimation.sum() == 0
    right = smoothing.certify_detailed(
        constant_logits, X, rng=jax.random.key(0), early_abstain_label=2, **kwargs
    )
    default = smoothing.certify_detailed(constant_logits, X, rng=jax.random.key(0), **kwargs)
    assert (right.prediction, right.radius) == (default.prediction, default.radius)
    assert not default.abstained_early and default.n_drawn == 1020


# --- Sampling: exact counts and reproducibility ----------------------------------------------


def noisy_logits(images):
    """[B, 2, 2, 1] -> [B, 4]: the class is the index of the largest pixel (noise decides)."""
    return images.reshape(images.shape[0], 4)


def test_last_partial_batch_is_counted_exactly():
    counts = smoothing.sample_counts(
        noisy_logits, X * 0 + 0.5, sigma=1.0, num=37, batch_size=8, rng=jax.random.key(0),
        num_classes=4,
    )
    assert counts.dtype == np.int64 and counts.shape == (4,)
    assert counts.sum() == 37


def test_same_rng_same_counts_and_fresh_rng_different_counts():
    kwargs = dict(sigma=1.0, num=400, batch_size=64, num_classes=4)
    first = smoothing.sample_counts(noisy_logits, X, rng=jax.random.key(5), **kwargs)
    again = smoothing.sample_counts(noisy_logits, X, rng=jax.random.key(5), **kwargs)
    other = smoothing.sample_counts(noisy_logits, X, rng=jax.random.key(6), **kwargs)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    raw = smoothing.sample_counts(noisy_logits, X, rng=jax.random.PRNGKey(5), **kwargs)
    np.testing.assert_array_equal(first, raw)


def test_counts_do_not_depend_on_batch_size_or_images_per_call():
    key = jax.random.key(11)
    images = np.stack([X, 1 - X, X * 0.5])
    keys = jax.random.split(key, 3)
    kwargs = dict(sigma=1.0, num=101, num_classes=4)
    alone = np.stack([
        smoothing.sample_counts(noisy_logits, images[m], rng=keys[m], batch_size=8, **kwargs)
        for m in range(3)
    ])
    together = smoothing.sample_counts_many(
        noisy_logits, images, rng=keys, batch_size=64, **kwargs
    )
    np.testing.assert_array_equal(alone, together)
    # One key: image m uses fold_in(key, m), whatever the number of images.
    one_key = smoothing.sample_counts_many(noisy_logits, images, rng=key, batch_size=64, **kwargs)
    first_two = smoothing.sample_counts_many(
        noisy_logits, images[:2], rng=key, batch_size=64, **kwargs
    )
    np.testing.assert_array_equal(one_key[:2], first_two)


def test_one_and_four_devices_give_identical_results():
    # Every sample has its own key (fold_in(image key, j)), so its noise cannot depend on how
    # the batch is split, with or without jax_threefry_partitionable.
    devices = jax.local_devices()
    assert len(devices) == 4, "tests/conftest.py should give 4 CPU devices"
    kwargs = dict(sigma=1.0, n0=100, n=1000, alpha=0.001, batch_size=100, num_classes=4,
                  rng=jax.random.key(3))
    images = np.stack([X, 1 - X])
    per_mesh = []
    for mesh_devices in (devices[:1], devices):
        per_mesh.append((
            smoothing.certify_detailed(noisy_logits, X, devices=mesh_devices, **kwargs),
            smoothing.sample_counts_many(
                noisy_logits, images, sigma=1.0, num=333, batch_size=64,
                rng=jax.random.key(4), num_classes=4, devices=mesh_devices,
            ),
        ))
    (one, one_many), (four, four_many) = per_mesh
    np.testing.assert_array_equal(one.counts_selection, four.counts_selection)
    np.testing.assert_array_equal(one.counts_estimation, four.counts_estimation)
    assert (one.prediction, one.radius) == (four.prediction, four.radius)
    np.testing.assert_array_equal(one_many, four_many)


def test_pytree_logits_fn_parameters_are_arguments_not_constants():
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    apply = lambda w, images: images.reshape(images.shape[0], 4) @ w
    as_pytree = smoothing.place_replicated(jax.tree_util.Partial(apply, weights))
    as_closure = lambda images: apply(weights, images)
    kwargs = dict(sigma=0.5, num=200, batch_size=64, rng=jax.random.key(0), num_classes=3)
    np.testing.assert_array_equal(
        smoothing.sample_counts(as_pytree, X, **kwargs),
        smoothing.sample_counts(as_closure, X, **kwargs),
    )


def test_bfloat16_compute_dtype_counts_every_sample():
    counts = smoothing.sample_counts(
        constant_logits, X, sigma=0.5, num=50, batch_size=20, rng=jax.random.key(0),
        num_classes=3, compute_dtype=jnp.bfloat16,
    )
    assert counts.tolist() == [0, 0, 50]


# --- Bad input -------------------------------------------------------------------------------

GOOD = dict(sigma=0.5, n0=10, n=100, alpha=0.001, batch_size=20, num_classes=3)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=np.zeros((1, 2, 2, 1))), "x must be a non-empty [H, W, C]"),
        (dict(x=np.zeros((2, 2))), "x must be a non-empty [H, W, C]"),
        (dict(x=X * 255), "x values must be in [0, 1]"),
        (dict(x=X - 0.5), "x values must be in [0, 1]"),
        (dict(x=X * np.nan), "x must be finite"),
        (dict(n0=0), "n0 must be a positive integer, got 0"),
        (dict(n=-5), "n must be a positive integer, got -5"),
        (dict(n=100.0), "n must be a positive integer, got 100.0"),
        (dict(alpha=0.0), "alpha must be in (0, 1), got 0.0"),
        (dict(alpha=1.0), "alpha must be in (0, 1), got 1.0"),
        (dict(sigma=0.0), "sigma must be a finite number > 0, got 0.0"),
        (dict(sigma=-0.25), "sigma must be a finite number > 0, got -0.25"),
        (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
        (dict(batch_size=10), "batch_size must be a multiple of the number of devices (4)"),
        (dict(num_classes=1), "num_classes must be an integer >= 2, got 1"),
        (dict(num_classes=4), "logits_fn must map [B, H, W, C] to logits [B, num_classes]"),
        (dict(rng=0), "rng must be a JAX PRNG key"),
        (dict(early_abstain_label=3), "early_abstain_label must be None or a class in [0, 3)"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    arguments = dict(GOOD, x=X, rng=jax.random.key(0)) | change
    x = arguments.pop("x")
    with pytest.raises(ValueError) as error:
        smoothing.certify(constant_logits, x, **arguments)
    assert message in str(error.value)


def test_nan_logits_are_a_clear_error():
    nan_logits = lambda images: jnp.full((images.shape[0], 3), jnp.nan)
    with pytest.raises(ValueError, match="logits_fn returned NaN logits for 10 of 10"):
        smoothing.certify(nan_logits, X, rng=jax.random.key(0), **GOOD)


# --- Recomputing a log at another alpha --------------------------------------------------------


def test_recompute_at_alpha_gives_what_certify_gives_at_that_alpha():
    images = [X, 1 - X, X * 0.5, np.full_like(X, 0.6)]
    settings = dict(sigma=SIGMA, n0=20, n=300, batch_size=300, num_classes=2)
    rows = {}
    for alpha in (0.001, 0.2):
        certify_one = smoothing.make_certify_one(
            linear_logits, smoothing.Settings(alpha=alpha, **settings), rng=jax.random.key(2))
        rows[alpha] = [{"idx": i, "label": 1, **certify_one(i, image, 1)}
                       for i, image in enumerate(images)]
    for row in rows[0.2]:
        row["correct"] = int(row["predict"] == 1)
    assert smoothing.recompute_at_alpha(rows[0.001], 0.2) == rows[0.2]
    assert any(a["radius"] != b["radius"] for a, b in zip(rows[0.001], rows[0.2], strict=True))
    with pytest.raises(ValueError, match="no sigma, cAHat, nA, n column"):
        smoothing.recompute_at_alpha([{"idx": 0, "label": 1, "predict": 1, "radius": 0.5}], 0.2)
