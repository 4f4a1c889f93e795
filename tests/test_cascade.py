"""Specification of the multi-scale cascade (Jeong & Shin, NeurIPS 2023) and its empirical mode.

Most tests inject a sampler that draws vote counts from a known multinomial per sigma
(`TableSampler`) or adds real Gaussian noise in NumPy (`gaussian_sampler`), so the true
smoothed probabilities, and with them the exact cascade, are known. One test runs the real
JAX sampler of dmae_jax.smoothing.certify end to end.
"""

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import multinomial_proportions_confint, proportion_confint

from dmae_jax.smoothing import Settings, cascade, sampling
from dmae_jax.smoothing.cascade import (
    ABSTAIN,
    AMBIGUOUS,
    CASCADE_COLUMNS,
    R_NEG_NONE,
    certify_from_counts,
    expected_num_stages,
    off_class_upper_bound,
    processing_order,
)
from dmae_jax.smoothing.certify import lower_confidence_bound, radius_from_bound
from dmae_jax.smoothing.logs import BASE_COLUMNS, CertifyLog, read_log
from dmae_jax.smoothing.multinomial import clopper_pearson, goodman_intervals, reduce_counts

X = np.full((2, 2, 1), 0.5, np.float32)  # the fake samplers ignore the image


def numpy_generator(rng: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key: equal keys give equal draws."""
    return np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())


def clean_logits(values):
    """A clean classifier with the same logits [K] for every image."""
    return lambda images: np.tile(np.asarray(values, np.float64), (len(images), 1))


class ProbTable:
    """A 'base classifier' known only through its smoothed class probabilities at one sigma."""

    def __init__(self, probs):
        self.probs = np.asarray(probs, np.float64)


class FixedCounts:
    """A 'base classifier' whose noisy votes are always the given counts."""

    def __init__(self, counts):
        self.counts = np.asarray(counts, np.int64)


class TableSampler:
    """Multinomial draws from ProbTable.probs (or FixedCounts); records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, logits_fn, x, key, num, sigma):
        self.calls.append((sigma, num, logits_fn, tuple(np.asarray(jax.random.key_data(key)))))
        if isinstance(logits_fn, FixedCounts):
            return logits_fn.counts.copy()
        return numpy_generator(key).multinomial(num, logits_fn.probs)


def certify_cascade(logits_fns, x, *, rng, sigmas, p0=0.5, alpha_split="sound",
                    clean_logits_fn=None, sampler=None, **settings):
    """cascade.certify_cascade with its Settings written as keywords (sigmas = its sigma)."""
    return cascade.certify_cascade(
        logits_fns, x, Settings(sigma=tuple(sigmas), **settings), rng=rng, p0=p0,
        alpha_split=alpha_split, clean_logits_fn=clean_logits_fn, sampler=sampler)


def make_certify_one(logits_fns, *, rng, sigmas, p0=0.5, alpha_split="sound",
                     clean_logits_fn=None, sampler=None, **settings):
    """cascade.make_certify_one with its Settings written as keywords."""
    return cascade.make_certify_one(
        logits_fns, Settings(sigma=tuple(sigmas), **settings), rng=rng, p0=p0,
        alpha_split=alpha_split, clean_logits_fn=clean_logits_fn, sampler=sampler)


# ------------------------------------------------------------------------------------------
# Bounds: ours against statsmodels (what the official code calls).
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1e-3, 0.01, 0.05 / 3])
def test_clopper_pearson_matches_statsmodels_beta_interval_at_two_alpha(alpha):
    for nobs, count in [(1, 0), (1, 1), (100, 0), (100, 37), (100, 100), (10000, 5123)]:
        expected = proportion_confint(count, nobs, alpha=2 * alpha, method="beta")
        np.testing.assert_allclose(clopper_pearson(count, nobs, alpha), expected, rtol=1e-12)


def test_goodman_intervals_match_statsmodels_multinomial_proportions_confint():
    gen = np.random.default_rng(0)
    for _ in range(50):
        k = int(gen.integers(2, 12))
        counts = gen.multinomial(int(gen.integers(20, 5000)), gen.dirichlet(np.ones(k)))
        alpha = float(gen.choice([2e-3, 1e-3, 0.02, 0.1]))
        expected = multinomial_proportions_confint(counts, alpha=alpha, method="goodman")
        np.testing.assert_allclose(goodman_intervals(counts, alpha), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "counts, c, cells",
    [
        ([50, 10, 3, 2, 1, 1, 0], 0, [50, 10, 7]),  # 3+2 pool to 5; the 1+1 remainder joins it
        ([90, 4, 3, 3], 0, [90, 10]),  # 4+3 -> 7, remainder 3 joins the last cell
        ([97, 1, 1, 1], 0, [100]),  # no off-class cell: the remainder joins the class-c cell
        ([30, 60, 10], 0, [30, 60, 10]),  # c need not be the stage's top class
        ([5, 5, 5, 5], 2, [5, 5, 5, 5]),
        ([0, 0, 12, 0], 2, [12]),
    ],
)
def test_reduce_counts_pools_off_class_counts_into_cells_of_at_least_five(counts, c, cells):
    assert reduce_counts(counts, c).tolist() == cells


def test_off_class_bound_is_the_largest_goodman_upper_end_of_the_pooled_cells():
    counts = np.array([400, 300, 200, 60, 30, 4, 3, 2, 1])
    alpha = 1e-3 / 2
    cells = [300, 400, 200, 60, 30, 10]  # class 1 first, then pooled off-class cells
    expected = multinomial_proportions_confint(cells, alpha=2 * alpha)[1:, 1].max()
    assert off_class_upper_bound(counts, 1, alpha) == pytest.approx(expected, rel=1e-12)


def test_off_class_bound_with_one_off_class_cell_bounds_the_predicted_class_complement():
    # Class 1 holds the stage's top count, but the cascade predicts class 0. The official
    # code would use 1 - pA_lower(class 1) = 0.4 here, below the 0.6 that class 1 has: we
    # bound the whole off-class mass instead, 1 - pA_lower(class 0) >= p(class 1).
    counts = np.array([3796, 6200, 3, 1])
    bound = off_class_upper_bound(counts, 0, 1e-3)
    expected = 1 - proportion_confint(3796, 10000, alpha=2e-3, method="beta")[0]
    assert bound == pytest.approx(expected, rel=1e-12)
    assert bound > proportion_confint(6200, 10000, alpha=2e-3, method="beta")[1]


# ------------------------------------------------------------------------------------------
# The certificate on a grid of counts, against a re-derivation in the official units.
# ------------------------------------------------------------------------------------------


def official_style_certificate(stages, sigmas, alpha, p0):
    """Re-derivation following certify.py / core_mdds.py line by line, in their [-1, 1] units.

    Noise std and radii are doubled (magnitude 2) and the final radius halved, as the
    official script does; only the two-cell off-class branch bounds the predicted class's
    complement (see test_off_class_bound_with_one_off_class_cell_...).
    """
    magnitude = 2.0

    def pooled(counts, c):
        rest = sorted((int(v) for i, v in enumerate(counts) if i != c), reverse=True)
        out, pool = [int(counts[c])], 0
        for v in rest:
            if v >= 5:
                out.append(v)
                continue
            pool += v
            if pool >= 5:
                out.append(pool)
                pool = 0
        if pool:
            out[-1] += pool
        return out

    radius_neg, radius_, confidences = -100.0, 0.0, []
    for stage, ((c_hat, counts), sigma) in enumerate(zip(stages, sigmas, strict=True)):
        s = magnitude * sigma
        n = int(np.sum(counts))
        a = alpha / (stage + 1)
        low, high = proportion_confint(counts[c_hat], n, alpha=2 * a, method="beta")
        if low >= p0:
            pred, radius = c_hat, s * (stats.norm.ppf(low) - stats.norm.ppf(p0))
            negs = [-100.0]
            for s_j, counts_j in confidences:
                cells = pooled(counts_j, pred)
                if len(cells) <= 2:
                    low_j = proportion_confint(
                        counts_j[pred], sum(cells), alpha=2 * a, method="beta"
                    )
                    high_j = 1 - low_j[0]
                else:
                    high_j = multinomial_proportions_confint(cells, alpha=2 * a)[1:, 1].max()
                negs.append(s_j * (stats.norm.ppf(high_j) - stats.norm.ppf(p0)))
            radius_neg = max(negs)
            radius_ = min(radius, -radius_neg)
            break
        if high >= p0:
            pred = -2
            break
        pred = -1
        confidences.append((s, counts))
    radius_adj = radius_ / magnitude
    if radius_adj < 0:
        pred, radius_adj = -1, 0.0
    return pred, radius_adj, stage, radius_neg


STAGE_COUNTS = [  # n = 1000, K = 6; (c_hat, counts) chosen to reach every branch
    (0, [900, 40, 30, 20, 6, 4]),  # certain: predict class 0
    (1, [50, 900, 20, 10, 10, 10]),  # certain: predict class 1
    (0, [560, 400, 20, 10, 6, 4]),  # pA_lower just above 0.5; straddles p0 = 0.6
    (0, [520, 470, 5, 3, 1, 1]),  # straddles 0.5: ambiguous
    (1, [100, 420, 300, 150, 20, 10]),  # pA_upper < 0.5: next stage
    (2, [400, 100, 430, 40, 20, 10]),  # next stage; class 0 is an off-class close to 0.5
    (3, [3, 1, 2, 440, 550, 4]),  # next stage after a selection error (class 4 has 55%)
    (0, [300, 690, 4, 3, 2, 1]),  # next stage; for class 1 the off-class cells pool to one
]


@pytest.mark.parametrize("p0", [0.5, 0.6])
def test_radius_on_a_grid_of_counts_equals_an_official_style_rederivation(p0):
    alpha = 1e-3
    checked = set()
    for k in (1, 2, 3):
        sigmas = [1.0, 0.5, 0.25][:k]
        for stages in itertools.product(STAGE_COUNTS, repeat=k):
            stages = [(c, np.array(v)) for c, v in stages]
            got = certify_from_counts(
                iter(stages), sigmas=sigmas, alpha=alpha, p0=p0, alpha_split="official")
            pred, radius, stage, radius_neg = official_style_certificate(stages, sigmas, alpha, p0)
            assert (got.prediction, got.stage) == (pred, stage)
            assert got.radius == pytest.approx(radius, rel=1e-12, abs=1e-15)
            assert got.sigma == sigmas[stage]
            # Our r_neg is in [0, 1]-pixel units: half the official value (sentinel kept).
            assert got.r_neg == (R_NEG_NONE if radius_neg == -100.0 else radius_neg / 2)
            checked.add((pred >= 0, pred, got.radius > 0))
    predicted = {c for ok, c, _ in checked if ok}
    assert predicted and {ABSTAIN, AMBIGUOUS} <= {c for _, c, _ in checked}


def test_one_sigma_cascade_is_cohen_certify_but_labels_a_straddle_minus_two():
    for c_hat, counts in STAGE_COUNTS:
        counts = np.array(counts)
        got = certify_from_counts(iter([(c_hat, counts)]), sigmas=[0.5], alpha=1e-3)
        pA_lower = lower_confidence_bound(int(counts[c_hat]), 1000, 1e-3)
        if pA_lower >= 0.5:
            assert (got.prediction, got.radius) == (c_hat, radius_from_bound(pA_lower, 0.5))
        else:
            upper = clopper_pearson(int(counts[c_hat]), 1000, 1e-3)[1]
            assert got.prediction == (AMBIGUOUS if upper >= 0.5 else ABSTAIN)
            assert got.radius == 0.0


def test_prediction_with_negative_radius_becomes_abstain_with_radius_zero():
    # Stage 0 abstains (class 0 holds 40%) but class 1 may exceed 0.5 there; stage 1
    # predicts class 2, so class 1 is an off-class of stage 0 that could win: no certificate.
    stages = [(0, np.array([400, 480, 120, 0])), (2, np.array([0, 0, 1000, 0]))]
    got = certify_from_counts(iter(stages), sigmas=[1.0, 0.5], alpha=1e-3, p0=0.5)
    assert (got.prediction, got.radius, got.stage) == (ABSTAIN, 0.0, 1)
    assert got.r_neg > 0


def test_radius_exactly_zero_keeps_the_prediction():
    counts = np.array([800, 150, 50])
    p0 = clopper_pearson(800, 1000, 1e-3)[0]  # pA_lower == p0 exactly
    got = certify_from_counts(iter([(0, counts)]), sigmas=[0.5], alpha=1e-3, p0=p0)
    assert (got.prediction, got.radius) == (0, 0.0)


def test_straddling_interval_abstains_as_ambiguous_without_trying_smaller_sigmas():
    sampler = TableSampler()
    fns = [FixedCounts([1000, 0]), FixedCounts([500, 500]), FixedCounts([0, 1000])]
    # sigma 1.0 is FixedCounts([500, 500]) after sorting; n0 and n both draw 1000.
    result = certify_cascade(
        fns, X, sigmas=[0.25, 1.0, 0.5], n0=1000, n=1000, alpha=1e-3, batch_size=100,
        rng=jax.random.key(0), num_classes=2, sampler=sampler,
    )  # fmt: skip
    assert (result.prediction, result.radius, result.stage, result.sigma) == (
        AMBIGUOUS,
        0.0,
        0,
        1.0,
    )
    assert [call[0] for call in sampler.calls] == [1.0, 1.0]
    assert result.num_samples == 2000 and len(result.counts) == 1


def test_sigmas_in_any_order_are_processed_largest_first_with_their_own_classifier():
    sampler = TableSampler()
    abstain = [0.3, 0.3, 0.2, 0.2]
    tables = {0.25: ProbTable([0.0, 0.0, 0.0, 1.0]), 1.0: ProbTable(abstain),
              0.5: ProbTable(abstain), 0.75: ProbTable(abstain)}  # fmt: skip
    sigmas = [0.25, 1.0, 0.5, 0.75]
    result = certify_cascade(
        [tables[s] for s in sigmas], X, sigmas=sigmas, n0=100, n=1000, alpha=1e-3,
        batch_size=100, rng=jax.random.key(1), num_classes=4, sampler=sampler,
    )  # fmt: skip
    order = [call[0] for call in sampler.calls]
    assert order == [1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]
    assert all(call[2] is tables[call[0]] for call in sampler.calls)
    assert (result.prediction, result.stage, result.sigma) == (3, 3, 0.25)
    assert cascade.processing_order(sigmas) == [1, 3, 2, 0]


def test_every_stage_draws_selection_and_estimation_samples_from_fresh_keys():
    sampler = TableSampler()
    fns = [ProbTable([0.35, 0.35, 0.3])] * 3
    kwargs = dict(sigmas=[1.0, 0.5, 0.25], n0=100, n=1000, alpha=1e-3, batch_size=100,
                  num_classes=3, sampler=sampler)  # fmt: skip
    rng = jax.random.key(7)
    first = certify_cascade(fns, X, rng=rng, **kwargs)
    keys = [call[3] for call in sampler.calls]
    assert first.prediction == ABSTAIN and first.stage == 2 and len(keys) == 6
    assert len(set(keys)) == 6
    assert tuple(np.asarray(jax.random.key_data(rng))) not in keys
    # The same key reproduces the certificate exactly.
    again = certify_cascade(fns, X, rng=rng, **kwargs)
    assert [call[3] for call in sampler.calls[6:]] == keys
    assert all(np.array_equal(a, b) for a, b in zip(first.counts, again.counts, strict=True))


BAD_INPUTS = [
    (dict(sigmas=[]), "sigma must hold at least one noise level"),
    (dict(sigmas=[0.5, 0.0]), r"sigma\[1\] must be a finite number > 0"),
    (dict(sigmas=[-0.25, 0.5]), r"sigma\[0\] must be a finite number > 0"),
    (dict(sigmas=[float("nan"), 0.5]), r"sigma\[0\] must be a finite number > 0, got nan"),
    (dict(sigmas=[0.5, 0.5]), "sigma must hold distinct noise levels"),
    (dict(p0=0.0), r"p0 must be in \[0.5, 1\)"),
    (dict(p0=1.0), r"p0 must be in \[0.5, 1\)"),
    (dict(p0=1.5), r"p0 must be in \[0.5, 1\)"),
    (dict(p0=0.4), "below 0.5 the certificate is unsound"),
    (dict(alpha=0.0), r"alpha must be in \(0, 1\)"),
    (dict(alpha=0.5), r"alpha must be in \(0, 0.5\)"),
    (dict(n0=0), "n0 must be a positive integer, got 0"),
    (dict(n=2.5), "n must be a positive integer, got 2.5"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(batch_size=10), r"batch_size must be a multiple of the number of devices \(4\)"),
    (dict(num_classes=1), "num_classes must be an integer >= 2, got 1"),
    (dict(alpha_split="loose"), "alpha_split must be one of"),
]


@pytest.mark.parametrize("bad, message", BAD_INPUTS)
def test_bad_cascade_arguments_are_clear_value_errors(bad, message):
    kwargs = dict(sigmas=[1.0, 0.5], n0=10, n=100, alpha=1e-3, p0=0.5, batch_size=12,
                  num_classes=2)  # fmt: skip
    kwargs.update(bad)
    fns = [ProbTable([1.0, 0.0])] * max(len(kwargs["sigmas"]), 1)
    with pytest.raises(ValueError, match=message):
        certify_cascade(fns, X, rng=jax.random.key(0), sampler=TableSampler(), **kwargs)
    with pytest.raises(ValueError, match=message):
        make_certify_one(fns, rng=jax.random.key(0), **kwargs)


def test_mismatched_classifiers_and_sigmas_are_a_clear_value_error():
    with pytest.raises(ValueError, match=r"one entry per sigma \(3\), got 2"):
        certify_cascade(
            [ProbTable([1.0, 0.0])] * 2, X, sigmas=[1.0, 0.5, 0.25], n0=10, n=100,
            alpha=1e-3, batch_size=12, rng=jax.random.key(0), num_classes=2,
        )  # fmt: skip
    with pytest.raises(ValueError, match="strictly decreasing"):
        certify_from_counts([], sigmas=[0.5, 1.0], alpha=1e-3)


def test_a_sampler_breaking_its_contract_is_reported():
    with pytest.raises(ValueError, match="sampler must return 100 non-negative counts"):
        certify_cascade(
            [FixedCounts([60, 30])], X, sigmas=[0.5], n0=90, n=100, alpha=1e-3,
            batch_size=12, rng=jax.random.key(0), num_classes=2, sampler=TableSampler(),
        )  # fmt: skip


# ------------------------------------------------------------------------------------------
# Soundness against the exact cascaded classifier.
# ------------------------------------------------------------------------------------------


def exact_cascade(probs, sigmas, p0):
    """(class, radius, radius at the first firing stage) of the cascade from true p's [stage, K].

    The cascade returns the top class y of the first (largest) sigma whose top probability
    exceeds p0. The theorem certifies radius r_k = min(sigma_k (Phi^-1(p_k(y)) - Phi^-1(p0)),
    min_{j<k} sigma_j (Phi^-1(p0) - Phi^-1(max_{c != y} p_j(c)))) at every stage k with
    p_k(y) > p0 whose earlier stages keep all other classes below p0 (at x' within r_k, no
    earlier stage can fire another class and stage k still fires y). The certificate may
    use any such k (a selection error can skip a firing scale), so the exact radius is the
    best of them.
    """
    z0 = stats.norm.ppf(p0)
    fired = [k for k, p in enumerate(probs) if p.max() > p0]
    if not fired:
        return ABSTAIN, 0.0, 0.0
    y = int(np.argmax(probs[fired[0]]))
    radii = {}
    for k, p in enumerate(probs):
        off = [np.delete(probs[j], y).max() for j in range(k)]
        if p[y] <= p0 or any(q >= p0 for q in off):
            continue
        r = sigmas[k] * (stats.norm.ppf(p[y]) - z0)
        radii[k] = min([r] + [sigmas[j] * (z0 - stats.norm.ppf(q)) for j, q in enumerate(off)])
    return y, max(radii.values()), radii[fired[0]]


SOUNDNESS_CASES = {  # true smoothed probabilities at sigma = 1.0, 0.5, 0.25
    "largest_scale_decides": [[0.8, 0.05, 0.05, 0.05, 0.05], [0.9, 0.1, 0, 0, 0], [1, 0, 0, 0, 0]],
    "oversmoothed_then_middle": [[0.3, 0.2, 0.35, 0.1, 0.05], [0.1, 0.1, 0.7, 0.05, 0.05],
                                 [0, 0, 1, 0, 0]],
    "smallest_scale_decides": [[0.25] * 4 + [0.0], [0.45, 0.4, 0.05, 0.05, 0.05],
                               [0.02, 0.9, 0.04, 0.04, 0]],
    "off_class_near_threshold": [[0.1, 0.49, 0.2, 0.2, 0.01], [0.6, 0.2, 0.1, 0.05, 0.05],
                                 [0.7, 0.1, 0.1, 0.05, 0.05]],
    "top_class_near_threshold": [[0.02, 0.02, 0.02, 0.52, 0.42], [0, 0, 0, 1, 0], [0, 0, 0, 1, 0]],
    "selection_can_skip_a_firing_scale": [[0.51, 0.45, 0.02, 0.01, 0.01],
                                          [0.9, 0.05, 0.05, 0, 0], [1, 0, 0, 0, 0]],
    "no_scale_fires": [[0.4] * 2 + [0.2, 0, 0], [0.3, 0.3, 0.4, 0, 0], [0.45, 0.45, 0.1, 0, 0]],
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SOUNDNESS_CASES))
def test_certified_radius_never_exceeds_the_exact_cascade_radius(case):
    probs = [np.asarray(p, np.float64) for p in SOUNDNESS_CASES[case]]
    sigmas, p0, alpha, trials = [1.0, 0.5, 0.25], 0.5, 0.01, 100
    y, exact_radius, first_stage_radius = exact_cascade(probs, sigmas, p0)
    fns = [ProbTable(p) for p in probs]
    violations, radii = 0, []
    for trial in range(trials):
        result = certify_cascade(
            fns, X, sigmas=sigmas, n0=100, n=2000, alpha=alpha, batch_size=100,
            rng=jax.random.key(trial), num_classes=5, sampler=TableSampler(),
        )  # fmt: skip
        if result.prediction >= 0:
            radii.append(result.radius)
            violations += result.prediction != y or result.radius > exact_radius
    # Each certificate is wrong with probability <= alpha (its bounds are at alpha / (k+1)).
    assert violations <= stats.binom.ppf(1 - 1e-6, trials, alpha)
    if y == ABSTAIN:
        assert not radii
    elif first_stage_radius > 0.1:  # not vacuous: close to the radius of the firing stage
        assert len(radii) > trials / 2 and np.median(radii) > 0.8 * first_stage_radius


def test_a_skipped_firing_scale_can_certify_beyond_its_radius_but_not_the_exact_one():
    # sigma 1.0 fires class 3 (0.52), but when its selection picks class 4 (0.42) the
    # interval lies below 0.5 and sigma 0.5 certifies class 3 with the stage-0 off-class
    # margin: more than sigma 1.0's own radius, still within the cascade's exact radius.
    probs = [np.array(p, np.float64) for p in SOUNDNESS_CASES["top_class_near_threshold"]]
    y, exact_radius, first_stage_radius = exact_cascade(probs, [1.0, 0.5, 0.25], 0.5)
    radii = []
    for trial in range(100):
        result = certify_cascade(
            [ProbTable(p) for p in probs], X, sigmas=[1.0, 0.5, 0.25], n0=100, n=2000,
            alpha=0.01, batch_size=100, rng=jax.random.key(trial), num_classes=5,
            sampler=TableSampler(),
        )  # fmt: skip
        if result.prediction >= 0:
            assert result.prediction == y
            radii.append(result.radius)
    assert first_stage_radius < max(radii) <= exact_radius


# Three classes split by thresholds on t = w . x (|w| = 1): class 0 below A, 1 between,
# 2 above. Smoothed at sigma, p(0) = Phi((A - t) / sigma), p(2) = Phi((t - C) / sigma); at
# sigma = 1 the middle class never exceeds 0.5, the multi-scale situation in miniature.
A, C = -0.5, 0.5
LINEAR_SIGMAS = [1.0, 0.5, 0.25]
W = np.full(4, 0.5)


def linear_probs(t, sigma):
    """Smoothed class probabilities [..., 3] at positions t [...]."""
    low, high = stats.norm.cdf((A - t) / sigma), stats.norm.sf((C - t) / sigma)
    return np.stack([low, 1 - low - high, high], -1)


def linear_cascade_output(t):
    """The exact cascade's output (class or ABSTAIN) at positions t [...]."""
    t = np.asarray(t, np.float64)
    out, undecided = np.full(t.shape, ABSTAIN), np.ones(t.shape, bool)
    for sigma in LINEAR_SIGMAS:
        p = linear_probs(t, sigma)
        fires = undecided & (p.max(-1) > 0.5)
        out[fires] = p.argmax(-1)[fires]
        undecided &= ~fires
    return out


LINEAR_STEP = 1e-5


@functools.cache
def linear_output_changes():
    """Positions (to LINEAR_STEP / 2) where the exact cascade's output changes."""
    grid = np.arange(-4.0, 4.0, LINEAR_STEP)
    change = np.flatnonzero(np.diff(linear_cascade_output(grid)))
    return (grid[change] + grid[change + 1]) / 2


def linear_true_radius(t):
    """Distance from t to the nearest t' with a different cascade output: the L2 radius."""
    return float(np.abs(linear_output_changes() - t).min())


def linear_logits(images):
    """One-hot logits [B, 3] of the threshold classifier on images [B, 2, 2, 1]."""
    t = np.reshape(images, (len(images), -1)) @ W - 1.0  # t = 0 at the grey image
    return np.eye(3)[np.digitize(t, [A, C])]


def gaussian_sampler(logits_fn, x, key, num, sigma):
    """Votes of logits_fn on num copies of x + N(0, sigma^2 I) (NumPy noise), 3 classes."""
    noisy = x[None] + sigma * numpy_generator(key).standard_normal((num, *np.shape(x)))
    return np.bincount(np.argmax(logits_fn(noisy), -1), minlength=3)


def image_at(t):
    """An image [2, 2, 1] in [0, 1] with w . x - 1 = t."""
    return np.full((2, 2, 1), 0.5 + t / 2, np.float32)


def test_theorem_radius_from_true_probabilities_is_a_true_robust_radius():
    for t in np.arange(-0.9, 0.9, 0.03):
        probs = [linear_probs(t, s) for s in LINEAR_SIGMAS]
        y, radius, _ = exact_cascade(probs, LINEAR_SIGMAS, 0.5)
        true_radius = linear_true_radius(t)
        assert y == linear_cascade_output(t)
        assert radius <= true_radius + LINEAR_STEP
        assert radius >= 0.8 * true_radius - LINEAR_STEP  # tight enough to be meaningful


@pytest.mark.parametrize("t", [-0.8, -0.3, 0.0, 0.25, 0.45, 0.7])
def test_certificate_with_gaussian_noise_is_a_true_robust_radius_in_pixel_units(t):
    x = image_at(t)
    t_image = float(x.ravel() @ W - 1.0)
    true_radius = linear_true_radius(t_image)
    for seed in range(3):
        result = certify_cascade(
            [linear_logits] * 3, x, sigmas=LINEAR_SIGMAS, n0=100, n=4000, alpha=1e-3,
            batch_size=100, rng=jax.random.key(seed), num_classes=3, sampler=gaussian_sampler,
        )  # fmt: skip
        if result.prediction >= 0:
            assert result.prediction == linear_cascade_output(t_image)
            assert result.radius <= true_radius + LINEAR_STEP


def test_end_to_end_with_the_jax_sampler_and_a_resumable_log(tmp_path):
    def jax_linear_logits(images):
        t = jnp.reshape(images, (images.shape[0], -1)) @ jnp.asarray(W, jnp.float32) - 1.0
        return jax.nn.one_hot(jnp.digitize(t, jnp.asarray([A, C])), 3)

    certify_one = make_certify_one(
        [jax_linear_logits] * 3, sigmas=LINEAR_SIGMAS, n0=32, n=1000, alpha=1e-3,
        batch_size=256, rng=jax.random.key(0), num_classes=3,
        clean_logits_fn=jax_linear_logits,
    )  # fmt: skip
    log_path = tmp_path / "cascade.tsv"
    positions = [-0.9, 0.0, 0.9]  # decided at sigma 1.0, 0.5 (1.0 over-smooths), 1.0
    with CertifyLog(log_path, CASCADE_COLUMNS) as log:
        for idx, t in enumerate(positions):
            row = certify_one(idx, image_at(t), int(linear_cascade_output(t)))
            log.append({**row, "time": 0.0})
    rows = read_log(log_path)
    assert [r["predict"] for r in rows] == [0, 1, 2]
    assert [r["stage"] for r in rows] == [0, 1, 0]
    assert [r["sigma"] for r in rows] == [1.0, 0.5, 1.0]
    assert all(r["corr_uc"] == 1 and r["num_samples"] == (r["stage"] + 1) * 1032 for r in rows)
    assert all(
        0 < r["radius"] <= linear_true_radius(t) for r, t in zip(rows, positions, strict=True)
    )
    assert list(rows[0]) == list(BASE_COLUMNS) + list(CASCADE_COLUMNS)
    # The key of image idx is fold_in(rng, idx): certifying it again gives the same row.
    assert certify_one(1, image_at(0.0), 1) == {k: v for k, v in rows[1].items() if k != "time"}


def test_abstention_falls_back_to_the_clean_classifier_in_pred_uc():
    fns = [ProbTable([0.4, 0.3, 0.3]), ProbTable([0.4, 0.3, 0.3])]
    kwargs = dict(sigmas=[1.0, 0.5], n0=100, n=2000, alpha=1e-3, batch_size=100,
                  rng=jax.random.key(0), num_classes=3, sampler=TableSampler())  # fmt: skip
    clean = clean_logits([0.0, 0.0, 5.0])
    result = certify_cascade(fns, X, clean_logits_fn=clean, **kwargs)
    assert (result.prediction, result.pred_uc, result.stage, result.r_neg) == (-1, 2, 1, -100.0)
    assert certify_cascade(fns, X, **kwargs).pred_uc == ABSTAIN
    row = make_certify_one(fns, clean_logits_fn=clean, **kwargs)(5, X, 2)
    assert (row["correct"], row["pred_uc"], row["corr_uc"]) == (0, 2, 1)


# ------------------------------------------------------------------------------------------
# Cost.
# ------------------------------------------------------------------------------------------


def test_expected_num_stages_is_the_sum_of_probabilities_of_reaching_each_stage():
    assert expected_num_stages([]) == 1.0
    assert expected_num_stages([0.3, 0.2]) == pytest.approx(1 + 0.3 + 0.3 * 0.2)
    assert expected_num_stages([1.0, 1.0]) == 3.0
    with pytest.raises(ValueError, match=r"continue_rates\[1\] must be in \[0, 1\]"):
        expected_num_stages([0.5, 1.5])


def test_samples_drawn_match_the_stages_visited():
    sampler = TableSampler()
    fns = [ProbTable([0.4, 0.35, 0.25]), ProbTable([0.9, 0.1, 0.0]), ProbTable([1.0, 0, 0])]
    result = certify_cascade(
        fns, X, sigmas=[1.0, 0.5, 0.25], n0=100, n=1000, alpha=1e-3, batch_size=100,
        rng=jax.random.key(3), num_classes=3, sampler=sampler,
    )  # fmt: skip
    assert result.stage == 1 and result.prediction == 0
    assert result.num_samples == sum(call[1] for call in sampler.calls) == 2 * 1100


# ------------------------------------------------------------------------------------------
# Empirical prediction mode (predict_mdds.py).
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# The official empirical (non-certified) mode, predict_mdds.py: kept here as an executable
# specification of what the paper's "empirical accuracy" numbers compute; no task uses it.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CascadePrediction:
    """Outcome of the empirical (non-certified) cascade prediction of one image."""

    prediction: int  # final class: clean logits + log smoothed prior, or clean argmax
    cascade_prediction: int  # top class of the accepting stage, or ABSTAIN (official pred0)
    stage: int  # last stage visited (0 = largest sigma)
    sigma: float
    clean_max_prob: float  # max softmax of the clean classifier (official c_max)
    num_samples: int  # noisy forward passes used: (stage + 1) * n



def predict_cascade(
    logits_fns: Sequence[cascade.LogitsFn],
    clean_logits_fn: cascade.LogitsFn,
    x: Any,
    *,
    sigmas: Sequence[float],
    n: int = 200,
    p0: float = 0.5,
    unif_w: float = 0.1,
    batch_size: int,
    rng: jax.Array,
    num_classes: int,
    sampler: cascade.Sampler | None = None,
) -> CascadePrediction:
    """Empirical cascade prediction of one image [H, W, C] (official predict_mdds.py).

    From the largest sigma down, draw n noisy samples and accept the first scale whose top
    count n_A satisfies n_A >= p0 * n (no confidence interval, no off-class test: the
    official code has one but never feeds it a scale, so it never acts). With counts of the
    accepting scale, the output is argmax(clean_logits + log((1 - unif_w) counts / n +
    unif_w / K)): the smoothed votes act as a prior on the clean classifier. If every scale
    abstains, the output is the clean classifier's argmax. Stage j uses key
    jax.random.split(rng, len(sigmas))[j].
    """
    settings = Settings(sigma=tuple(sigmas), n=n, batch_size=batch_size,
                        num_classes=num_classes)
    if len(logits_fns) != len(sigmas):
        raise ValueError(
            f"logits_fns must have one entry per sigma ({len(sigmas)}), got {len(logits_fns)}"
        )
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"p0 must be in (0, 1), got {p0}")
    if not 0.0 <= unif_w <= 1.0:
        raise ValueError(f"unif_w must be in [0, 1], got {unif_w}")
    sampler = sampling.sampler_for(settings) if sampler is None else sampler
    clean_logits = np.asarray(clean_logits_fn(x[None]), dtype=np.float64)[0]
    clean_probs = np.exp(clean_logits - clean_logits.max())
    clean_max_prob = float(clean_probs.max() / clean_probs.sum())
    order = processing_order(sigmas)
    stage_keys = jax.random.split(rng, len(order))
    accepted_counts = None
    cascade_prediction = ABSTAIN
    for stage, i in enumerate(order):
        counts = cascade.sample_stage(sampler, settings, logits_fns[i], x, n, stage_keys[stage],
                                      sigmas[i])
        c_hat = int(np.argmax(counts))
        if counts[c_hat] >= p0 * n:
            cascade_prediction, accepted_counts = c_hat, counts
            break
    outputs = clean_logits
    if accepted_counts is not None:
        prior = (1.0 - unif_w) * accepted_counts / n + unif_w / num_classes
        outputs = clean_logits + np.log(np.clip(prior, 1e-20, None))
    return CascadePrediction(
        prediction=int(np.argmax(outputs)),
        cascade_prediction=cascade_prediction,
        stage=stage,
        sigma=float(sigmas[order[stage]]),
        clean_max_prob=clean_max_prob,
        num_samples=(stage + 1) * n,
    )


def test_empirical_mode_accepts_the_first_scale_with_top_count_at_least_p0_n():
    sampler = TableSampler()
    fns = [FixedCounts([99, 101, 0]), FixedCounts([0, 99, 101]), FixedCounts([100, 0, 100])]
    got = predict_cascade(
        fns, clean_logits([0.0, 0.0, 0.0]), X, sigmas=[1.0, 0.5, 0.25], n=200,
        batch_size=52, rng=jax.random.key(0), num_classes=3, sampler=sampler,
    )  # fmt: skip
    # 101 >= 0.5 * 200 at sigma 1.0: accepted at once, the tie-free top class is 1.
    assert (got.cascade_prediction, got.stage, got.sigma, got.num_samples) == (1, 0, 1.0, 200)
    assert [call[0] for call in sampler.calls] == [1.0]
    fns = [FixedCounts([200, 0, 0]), FixedCounts([99, 99, 2]), FixedCounts([0, 100, 100])]
    got = predict_cascade(
        fns, clean_logits([0.0, 0.0, 0.0]), X, sigmas=[0.25, 1.0, 0.5], n=200,
        batch_size=52, rng=jax.random.key(0), num_classes=3, sampler=TableSampler(),
    )  # fmt: skip
    # sigma 1.0 abstains (99 < 100); sigma 0.5 accepts 100 = p0 n, its first top class.
    assert (got.cascade_prediction, got.stage, got.sigma) == (1, 1, 0.5)


def test_empirical_mode_adds_the_log_vote_prior_to_the_clean_logits():
    counts = np.array([20, 180, 0])
    logits = np.array([2.0, 0.5, -1.0])
    kwargs = dict(sigmas=[0.5], n=200, batch_size=52, rng=jax.random.key(0), num_classes=3,
                  sampler=TableSampler())  # fmt: skip
    for unif_w in (0.0, 0.1, 1.0):
        got = predict_cascade(
            [FixedCounts(counts)], clean_logits(logits), X, unif_w=unif_w, **kwargs
        )
        prior = (1 - unif_w) * counts / 200 + unif_w / 3
        expected = np.argmax(logits + np.log(np.clip(prior, 1e-20, None)))
        assert got.prediction == expected and got.cascade_prediction == 1
    assert got.prediction == 0  # unif_w = 1: a flat prior leaves the clean argmax
    softmax = np.exp(logits) / np.exp(logits).sum()
    assert got.clean_max_prob == pytest.approx(softmax.max())


def test_empirical_mode_falls_back_to_the_clean_classifier_when_every_scale_abstains():
    fns = [FixedCounts([90, 60, 50]), FixedCounts([80, 80, 40])]
    got = predict_cascade(
        fns, clean_logits([0.0, 0.0, 3.0]), X, sigmas=[1.0, 0.5], n=200, batch_size=52,
        rng=jax.random.key(0), num_classes=3, sampler=TableSampler(),
    )  # fmt: skip
    assert (got.prediction, got.cascade_prediction, got.stage, got.sigma) == (2, ABSTAIN, 1, 0.5)
    assert got.num_samples == 400


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(sigmas=[]), "sigma must hold at least one"),
        (dict(p0=1.0), r"p0 must be in \(0, 1\)"),
        (dict(unif_w=-0.1), r"unif_w must be in \[0, 1\]"),
        (dict(n=0), "n must be a positive integer, got 0"),
        (dict(sigmas=[1.0, 0.5, 0.25]), r"one entry per sigma \(3\), got 2"),
    ],
)
def test_bad_empirical_mode_arguments_are_clear_value_errors(bad, message):
    kwargs = dict(sigmas=[1.0, 0.5], n=200, batch_size=52, rng=jax.random.key(0),
                  num_classes=2, sampler=TableSampler())  # fmt: skip
    kwargs.update(bad)
    fns = [FixedCounts([200, 0])] * 2
    with pytest.raises(ValueError, match=message):
        predict_cascade(fns, clean_logits([0.0, 1.0]), X, **kwargs)


# ------------------------------------------------------------------------------------------
# Soundness by exact enumeration: the distribution of every selection and estimation count is
# summed over, so the probability of a wrong certificate is computed exactly, not simulated.
# ------------------------------------------------------------------------------------------


class _NeedStage(Exception):
    """The cascade asked for a stage beyond the enumerated prefix."""


def _outcomes(probs, num):
    """(counts [K], probability) of every multinomial outcome of num draws."""
    probs = np.asarray(probs, np.float64)
    support = np.flatnonzero(probs > 0)
    result = []
    for head in itertools.product(range(num + 1), repeat=len(support) - 1):
        if sum(head) > num:
            continue
        counts = np.zeros(len(probs), np.int64)
        counts[support[:-1]] = head
        counts[support[-1]] = num - sum(head)
        result.append((counts, float(stats.multinomial.pmf(counts, num, probs))))
    return result


def _theorem_radius(y, k, probs, sigmas, p0):
    """The cascade theorem's radius for output y at stage k from the TRUE probabilities.

    A certificate (y, R) from stage k with R <= this radius is correct; the proof of the
    sound split shows R exceeds it only when one of the bounds used failed.
    """
    z0 = stats.norm.ppf(p0)
    radius = sigmas[k] * (stats.norm.ppf(probs[k][y]) - z0)
    for j in range(k):
        radius = min(radius, sigmas[j] * (z0 - stats.norm.ppf(np.delete(probs[j], y).max())))
    return radius


def exact_wrong_certificate_probability(probs, sigmas, *, n0, n, alpha, p0=0.5, alpha_split):
    """P(certify_from_counts returns y >= 0 with a radius above the theorem's true radius)."""
    probs = [np.asarray(p, np.float64) for p in probs]
    selection = []
    for p in probs:  # c_hat = argmax of the n0 selection counts, lowest class on ties
        dist = np.zeros(len(p))
        for counts, weight in _outcomes(p, n0):
            dist[int(np.argmax(counts))] += weight
        selection.append(dist)
    estimation = [_outcomes(p, n) for p in probs]
    wrong = 0.0

    def visit(prefix, weight):
        nonlocal wrong

        def stages():
            yield from prefix
            if len(prefix) < len(sigmas):
                raise _NeedStage

        try:
            cert = certify_from_counts(stages(), sigmas=sigmas, alpha=alpha, p0=p0,
                                       alpha_split=alpha_split)
        except _NeedStage:
            d = len(prefix)
            for c_hat in np.flatnonzero(selection[d] > 0):
                for counts, w in estimation[d]:
                    visit(prefix + [(int(c_hat), counts)], weight * selection[d][c_hat] * w)
            return
        if cert.prediction >= 0 and cert.radius > _theorem_radius(
                cert.prediction, cert.stage, probs, sigmas, p0) + 1e-12:
            wrong += weight

    visit([], 1.0)
    return wrong


def test_official_alpha_split_exceeds_alpha_on_the_boundary_case_and_the_sound_one_does_not():
    # Two stages, sigmas (1.0, 0.5), alpha = 0.1; stage 0 has p(a) = 0.501, p(b) = 0.499 and
    # stage 1 always votes b. The official split certifies wrongly w.p. ~0.11 (0.115 at
    # n = 1000); the sound split stays below alpha.
    case = dict(probs=[(0.501, 0.499), (0.0, 1.0)], sigmas=[1.0, 0.5], n0=20, n=200, alpha=0.1)
    official = exact_wrong_certificate_probability(**case, alpha_split="official")
    sound = exact_wrong_certificate_probability(**case, alpha_split="sound")
    assert official == pytest.approx(0.1118, abs=5e-4)
    assert official > 0.1
    assert sound <= 0.1


@pytest.mark.parametrize("probs, sigmas, n0, n", [
    ([(0.501, 0.499), (0.499, 0.501), (0.0, 1.0)], [1.0, 0.5, 0.25], 6, 30),  # three stages
    ([(0.3, 0.7), (0.5, 0.5)], [1.0, 0.5], 10, 30),  # the last stage right at p0
    ([(0.5, 0.45, 0.05), (0.0, 1.0, 0.0)], [1.0, 0.5], 6, 14),  # an off-class near p0
    ([(0.34, 0.33, 0.33), (0.0, 0.0, 1.0)], [1.0, 0.5], 6, 14),  # no class near p0
])
def test_sound_split_wrong_certificates_are_at_most_alpha_exactly(probs, sigmas, n0, n):
    for alpha in (0.1, 0.2):
        got = exact_wrong_certificate_probability(
            probs, sigmas, n0=n0, n=n, alpha=alpha, alpha_split="sound")
        assert got <= alpha


def test_one_stage_sound_cascade_spends_all_of_alpha_like_cohen():
    # With one sigma the sound split is Cohen's CERTIFY at alpha: with p = 1/2 exactly the
    # wrong-certificate probability is close to alpha (the bound is tight, not wasteful).
    got = exact_wrong_certificate_probability(
        [(0.5, 0.5)], [0.5], n0=10, n=60, alpha=0.1, alpha_split="sound")
    assert 0.05 < got <= 0.1


def test_sound_split_bounds_are_exact_clopper_pearson_at_their_levels():
    counts = np.array([600, 300, 100])
    lower_level, family_level = cascade.sound_levels(0, 3, 0.003)
    assert (lower_level, family_level) == (0.0005, 0.0005)
    assert cascade.sound_levels(2, 3, 0.003) == (0.001, 0.0)
    uppers = cascade.class_upper_bounds(counts, family_level)
    for c in range(3):  # each class at family_level / 3, one-sided
        expected = proportion_confint(counts[c], 1000, alpha=2 * family_level / 3,
                                      method="beta")[1]
        assert uppers[c] == pytest.approx(expected, rel=1e-10)
    # Stage 0 of two abstains on class 0; stage 1 predicts class 1: the off-class bound of
    # stage 0 for y = 1 is max(U(0), U(2)) from the family at alpha / 4.
    stages = [(0, np.array([400, 100, 500])), (1, np.array([0, 1000, 0]))]
    got = certify_from_counts(iter(stages), sigmas=[1.0, 0.5], alpha=0.004)
    u = cascade.class_upper_bounds(stages[0][1], 0.001)
    assert got.r_neg == pytest.approx(1.0 * stats.norm.ppf(max(u[0], u[2])))
    assert got.prediction == ABSTAIN  # class 2 may exceed 1/2 at stage 0: no certificate
