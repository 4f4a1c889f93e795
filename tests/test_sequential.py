"""Sequential, anytime-valid certification: exact soundness, the real sampler, label-freeness."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dmae_jax.smoothing import ABSTAIN, Settings, cascade, sequential
from dmae_jax.smoothing.cascade import AMBIGUOUS, CASCADE_COLUMNS
from dmae_jax.smoothing.certify import LOG_COLUMNS, certify_detailed
from dmae_jax.smoothing.sequential import (
    Schedule,
    aligned_schedule,
    certify_cascade_sequential,
    certify_sequential,
    decide_single,
    grid_level,
    look_schedule,
)

RADII = sequential.DEFAULT_RADII


def test_look_schedule_is_geometric_and_ends_at_the_cap():
    assert look_schedule(64, 1000, 1.5) == (64, 96, 144, 216, 324, 486, 729, 1000)
    assert look_schedule(10, 10, 2.0) == (10,)
    assert look_schedule(1, 4, 1.01) == (1, 2, 3, 4)  # always at least one more sample
    with pytest.raises(ValueError, match="growth must be a number > 1"):
        look_schedule(1, 4, 1.0)
    with pytest.raises(ValueError, match="n_first must be <= n_max"):
        look_schedule(5, 4, 2.0)


def test_grid_level_counts_the_radii_certified_inclusively():
    assert grid_level(-1.0, RADII) == 0
    assert grid_level(0.0, RADII) == 1
    assert grid_level(0.2499, RADII) == 1
    assert grid_level(0.25, RADII) == 2
    assert grid_level(9.0, RADII) == len(RADII)


def exact_single_sigma(pA, *, sigma, alpha, looks, level, all_correct=0.0, stop_level=None,
                       stop_ramp=0):
    """Exact (P(wrong certificate), E[estimation samples], P(certified)) of the stopping rule.

    Dynamic programming over the looks: the law of the c_hat votes among the runs that have
    not stopped yet, advanced by the Binomial votes of each round. A certificate is wrong
    when it predicts with pA_lower > pA (then sigma Phi^-1(pA_lower) exceeds the true radius).
    all_correct: the level of the all-correct sequence (0: none); stop_level, stop_ramp: the
    futility level and its ramp (None: each look's level, as decide_single).
    """
    levels = np.broadcast_to(level, (len(looks),))  # one level, or one per look
    alive = np.zeros(looks[-1] + 1)
    alive[0] = 1.0
    wrong, samples, certified, drawn = 0.0, 0.0, 0.0, 0
    for n_t, level in zip(looks, levels, strict=True):
        step = stats.binom.pmf(np.arange(n_t - drawn + 1), n_t - drawn, pA)
        alive = np.convolve(alive, step)[: looks[-1] + 1]
        drawn = n_t
        for nA in np.flatnonzero(alive > 1e-300):
            stop, lower = decide_single(int(nA), n_t, sigma=sigma, level=float(level),
                                        radii=RADII, n_max=looks[-1],
                                        cap_level=float(levels[-1]), all_correct=all_correct,
                                        stop_level=stop_level, stop_ramp=stop_ramp)
            if stop:
                if 0.5 <= lower and lower > pA:
                    wrong += alive[nA]
                if lower >= 0.5:
                    certified += alive[nA]
                samples += alive[nA] * n_t
                alive[nA] = 0.0
    assert alive.sum() < 1e-12  # every run stops at the cap
    return wrong, samples, certified


@pytest.mark.parametrize("pA", [
    stats.norm.cdf(1.0),  # exactly the threshold of r = 0.25 at sigma = 0.25
    stats.norm.cdf(2.0),  # exactly the threshold of r = 0.5
    0.5,  # exactly the abstain threshold
    0.5 + 1e-3,
])
def test_single_sigma_wrong_certificates_are_at_most_alpha_exactly(pA):
    looks = look_schedule(8, 400, 1.5)
    alpha = 0.05
    wrong, samples, _ = exact_single_sigma(pA, sigma=0.25, alpha=alpha, looks=looks,
                                           level=alpha / len(looks))
    assert wrong <= alpha
    assert samples < looks[-1]  # it does stop early on average


@pytest.mark.parametrize("pA", [stats.norm.cdf(1.0), stats.norm.cdf(2.0), 0.5,
                                stats.norm.cdf(3.0), 0.9995])
def test_uneven_spending_and_the_all_correct_sequence_keep_wrong_certificates_below_alpha(pA):
    # Clopper-Pearson levels growing with n (power 1) at half of alpha, the all-correct
    # sequence at the other half, with its aligned looks (at pA = Phi(3) and 0.9995 an
    # all-correct run is the likely way to a wrong certificate).
    alpha = 0.05
    looks, levels = aligned_schedule(8, 400, 1.5, sigma=0.25, radii=RADII, alpha=alpha,
                                     power=1.0, all_correct=0.5)
    assert sum(levels) == pytest.approx(alpha / 2) and levels[-1] > levels[1]
    aligned = set(looks) - set(look_schedule(8, 400, 1.5))
    assert aligned and all(levels[looks.index(n)] == 0.0 for n in aligned)
    wrong, samples, _ = exact_single_sigma(pA, sigma=0.25, alpha=alpha, looks=looks,
                                           level=levels, all_correct=alpha / 2)
    assert wrong <= alpha
    assert samples < looks[-1]


DEFAULT = Schedule()
# At pA = Phi(1), Phi(2), Phi(3) the true radius is exactly a grid radius (sigma = 0.25);
# 0.5 is the abstain threshold; 0.9995: an all-correct run is the likely wrong certificate.
THRESHOLD_PAS = [stats.norm.cdf(1.0), stats.norm.cdf(2.0), 0.5, stats.norm.cdf(3.0), 0.9995]


def default_looks(alpha, n_first=8, n_max=400):
    """The engine's default schedule (power, all-correct share, aligned looks) on a small cap."""
    return aligned_schedule(n_first, n_max, DEFAULT.growth, sigma=0.25, radii=RADII,
                            alpha=alpha, power=DEFAULT.power, all_correct=DEFAULT.all_correct)


def default_futility(n_max):
    """The default futility level, its ramp ending at a quarter of a small cap.

    The engine's ramp (5,000 samples) would end past such a cap; at a quarter, the looks
    see both its rising and its flat part.
    """
    return dict(stop_level=DEFAULT.stop_level, stop_ramp=n_max // 4)


@pytest.mark.parametrize("pA", THRESHOLD_PAS)
def test_the_default_schedule_and_futility_rule_keep_wrong_certificates_below_alpha(pA):
    # Exactly the engine's defaults (levels, all-correct share, aligned looks, the
    # conditional-power futility rule at stop_level with its ramp), at a level where wrong
    # certificates are frequent enough to see.
    alpha = 0.05
    looks, levels = default_looks(alpha)
    assert sum(levels) == pytest.approx(alpha * (1 - DEFAULT.all_correct))
    wrong, samples, _ = exact_single_sigma(pA, sigma=0.25, alpha=alpha, looks=looks, level=levels,
                                           all_correct=alpha * DEFAULT.all_correct,
                                           **default_futility(looks[-1]))
    assert wrong <= alpha
    assert samples < looks[-1]


def test_the_exact_check_of_the_defaults_fails_when_every_look_spends_the_whole_level():
    # The control for the test above: the same rule with each look's Clopper-Pearson bound
    # at the whole share alpha (1 - a) instead of its part of it certifies wrongly too often.
    alpha = 0.05
    looks, levels = default_looks(alpha)
    unsound = np.where(np.asarray(levels) > 0, alpha * (1 - DEFAULT.all_correct), 0.0)
    worst = max(exact_single_sigma(pA, sigma=0.25, alpha=alpha, looks=looks, level=unsound,
                                   all_correct=alpha * DEFAULT.all_correct,
                                   **default_futility(looks[-1]))[0]
                for pA in THRESHOLD_PAS[::2])
    assert worst > alpha


def test_the_predictive_upper_bound_narrows_from_the_plain_one_to_the_estimate_at_the_cap():
    nA, n, n_max, level = 830, 1000, 100_000, 0.05
    plain = sequential.cp_upper(nA, n, level)
    early = sequential.predictive_upper(nA, n, n_max, level)
    assert plain - 1e-3 < early < plain  # 1 % of the cap seen: nearly the plain bound
    spread = [sequential.predictive_upper(nA * k, n * k, n_max, level) - nA / n
              for k in (1, 10, 50, 90, 99)]
    assert all(a > b > 0 for a, b in zip(spread, spread[1:], strict=False))
    assert sequential.predictive_upper(83_000, n_max, n_max, level) == 0.83
    assert sequential.predictive_upper(n, n, n_max, level) == 1.0  # all correct: anything goes
    # Calibrated: the cap's fraction exceeds the bound about `level` of the time when pA is
    # the estimate (the plain bound, for the unseen votes alone, would be exceeded ~never).
    rng = np.random.default_rng(0)
    p, seen = 0.83, 50_000
    nA_seen = rng.binomial(seen, p, 4000)
    final = (nA_seen + rng.binomial(n_max - seen, p, 4000)) / n_max
    bound = np.asarray([sequential.predictive_upper(int(a), seen, n_max, level) for a in nA_seen])
    assert 0.02 < np.mean(final > bound) < 0.08


def test_the_futility_rule_gives_up_on_an_out_of_reach_radius_earlier_than_the_plain_bound(
        monkeypatch):
    # pA just above the threshold of r = 0.25 (sigma 0.25), further below it than the cap's
    # bound can certify: exact expected samples with the engine's defaults (alpha 0.001, cap
    # 2,000) against the same engine stopping on the plain upper bound of the votes so far
    # (the control), which keeps chasing r = 0.25 while the cap has little chance left.
    alpha = 0.001
    looks, levels = default_looks(alpha, n_first=64, n_max=2000)
    common = dict(sigma=0.25, alpha=alpha, looks=looks, level=levels,
                  all_correct=alpha * DEFAULT.all_correct, **default_futility(looks[-1]))
    pA = stats.norm.cdf(1.0) + 0.01
    wrong, predictive, _ = exact_single_sigma(pA, **common)
    monkeypatch.setattr(sequential, "predictive_upper",
                        lambda nA, n, n_max, level: sequential.cp_upper(nA, n, level))
    assert predictive < 0.93 * exact_single_sigma(pA, **common)[1]  # 425 against 474
    assert wrong <= alpha


def test_the_ramped_futility_level_keeps_clear_images_and_drops_borderline_ones_sooner():
    # Exact, alpha 0.001, cap 2,000. A flat level gives up on an image well above the
    # threshold of r = 0 (7 standard errors of the cap) when its first few dozen votes
    # happen to fall short, a high flat level (0.2) often: the ramp to 0.2 certifies it
    # more often than the flat 0.09 it replaces, and spends fewer samples on an image just
    # above the threshold of r = 0.25 that the cap cannot certify (the test above).
    alpha = 0.001
    looks, levels = default_looks(alpha, n_first=64, n_max=2000)
    common = dict(sigma=0.25, alpha=alpha, looks=looks, level=levels,
                  all_correct=alpha * DEFAULT.all_correct)
    ramp = default_futility(looks[-1])
    assert 0 < ramp["stop_ramp"] < looks[-1]
    clear, borderline = 0.5 + 7 * math.sqrt(0.25 / 2000), stats.norm.cdf(1.0) + 0.01
    certified = {name: exact_single_sigma(clear, **common, **kw)[2] for name, kw in
                 [("ramp", ramp), ("flat", dict(stop_level=0.09)),
                  ("high", dict(stop_level=DEFAULT.stop_level))]}
    assert certified["ramp"] > certified["flat"] > certified["high"] + 0.05  # 0.96 0.94 0.87
    wrong, samples, _ = exact_single_sigma(borderline, **common, **ramp)
    assert samples < 0.95 * exact_single_sigma(borderline, **common, stop_level=0.09)[1]
    assert wrong <= alpha
    with pytest.raises(ValueError, match="stop_ramp must be an integer >= 0"):
        Schedule(stop_ramp=0.5)


def test_the_all_correct_sequence_is_anytime_valid_exactly():
    # P(some n has all n votes right and level^(1/n) > pA) = pA^n* for the first n* with
    # pA^n* < level: at most level, and close to it (no union bound wasted).
    for pA, level in [(0.9, 0.05), (0.99, 0.001), (0.5, 0.3)]:
        n_star = next(n for n in range(1, 10_000) if pA**n < level)
        assert sequential.all_correct_lower(n_star, n_star, level) > pA
        assert sequential.all_correct_lower(n_star - 1, n_star - 1, level) <= pA
        assert level * pA < pA**n_star < level
    assert sequential.all_correct_lower(99, 100, 0.05) == 0.0  # one miss: no bound


def test_aligned_looks_stop_an_all_correct_image_exactly_when_it_can():
    looks, levels = aligned_schedule(64, 150_000, 2.0, sigma=0.25, radii=RADII, alpha=0.001,
                                     all_correct=0.5)
    geometric = look_schedule(64, 150_000, 2.0)
    assert [levels[looks.index(n)] for n in geometric] == [0.0005 / len(geometric)] * len(
        geometric)
    # The aligned look of r = 0.75: votes all for c_hat first certify it there, not before.
    n = min(n for n in looks if n > 4096)
    assert n not in geometric and levels[looks.index(n)] == 0.0
    target = stats.norm.cdf(0.75 / 0.25)
    common = dict(sigma=0.25, level=0.0, radii=RADII, n_max=150_000, all_correct=0.0005)
    assert decide_single(n, n, **common)[1] >= target > decide_single(n - 1, n - 1, **common)[1]
    assert n == math.ceil(math.log(0.0005) / math.log(target))
    with pytest.raises(ValueError, match="power must be a finite number >= 0, got -1"):
        aligned_schedule(64, 1000, 2.0, sigma=0.25, radii=RADII, alpha=0.001, power=-1)


def test_the_exact_check_has_power_a_rule_without_the_union_bound_fails_it():
    # The same stopping rule with every look at the full alpha (optional stopping without a
    # confidence sequence) certifies wrongly more often than alpha at a threshold pA.
    looks = look_schedule(8, 400, 1.5)
    worst = max(exact_single_sigma(stats.norm.cdf(z), sigma=0.25, alpha=0.05, looks=looks,
                                   level=0.05)[0] for z in (1.0, 2.0))
    assert worst > 0.05


def threshold_classifier(threshold):
    """f(x) = class 0 if the first pixel exceeds threshold, else class 1 (a linear classifier)."""
    def logits_fn(images):
        score = images[:, 0, 0, 0] - threshold
        return jnp.stack([score, -score], axis=-1)
    return logits_fn


def test_real_sampler_wrong_certificate_rate_at_a_threshold_pA_is_at_most_alpha():
    # pA = Phi(1): the smoothed classifier's true radius is exactly 0.25 = sigma, a grid
    # radius, the hardest case: any bound above pA certifies 0.25 wrongly.
    sigma, alpha, images = 0.25, 0.05, 80
    x = np.full((1, 1, 1), 0.5, np.float32)
    fn = threshold_classifier(0.5 - sigma)
    certify_one = sequential.make_certify_one(
        fn, Settings(sigma=sigma, n0=16, alpha=alpha, n=600, batch_size=128, num_classes=2),
        rng=jax.random.key(0), schedule=Schedule(n_first=16))
    rows = [certify_one(i, x, 0) for i in range(images)]
    true_radius = sigma * stats.norm.ppf(stats.norm.cdf(1.0))
    wrong = sum(r["predict"] == 0 and r["radius"] > true_radius + 1e-9 for r in rows)
    assert wrong <= stats.binom.ppf(0.999, images, alpha)
    assert any(r["predict"] == 0 for r in rows)  # it does certify
    assert np.mean([r["n_drawn"] for r in rows]) < 16 + 600
    assert set(rows[0]) == {"predict", "radius", *LOG_COLUMNS, *sequential.SEQUENTIAL_COLUMNS}
    assert all(1 <= r["looks"] for r in rows)
    for r in rows:
        assert r["n_drawn"] == 16 + r["n"] and r["nA"] <= r["n"]


def test_an_easy_image_stops_early_and_matches_the_fixed_protocol():
    x = np.full((1, 1, 1), 0.9, np.float32)
    fn = threshold_classifier(-10.0)  # always class 0
    got = certify_sequential(fn, x, Settings(sigma=0.25, n0=100, alpha=0.001, n=100_000,
                                             batch_size=4096, num_classes=2),
                             rng=jax.random.key(1))
    # Fixed N = 100,000: every vote for class 0, radius 0.25 Phi^-1(alpha^(1/N)) = 0.953.
    fixed = certify_detailed(fn, x, sigma=0.25, n0=100, n=100, alpha=0.001 ** (100 / 100_000),
                             batch_size=128, rng=jax.random.key(1), num_classes=2)
    assert fixed.radius == pytest.approx(0.25 * stats.norm.ppf(0.001 ** (1 / 100_000)))
    # Both certify the grid radius 0.75, the largest below that cap.
    assert grid_level(got.radius, RADII) == grid_level(fixed.radius, RADII) == 4
    assert got.n_drawn < 12_000
    assert got.prediction == fixed.prediction == 0


def test_an_abstaining_image_stops_after_a_few_hundred_samples():
    rng = np.random.default_rng(0)

    def sampler(fn, image, key, num, sigma):
        return rng.multinomial(num, [0.3, 0.3, 0.4])

    got = certify_sequential(None, np.zeros((1, 1, 1), np.float32),
                             Settings(sigma=0.5, n0=100, alpha=0.001, n=100_000, batch_size=4,
                                      num_classes=3),
                             rng=jax.random.key(0), sampler=sampler)
    assert got.prediction == ABSTAIN and got.n < 1000


class Poison:
    """A label that fails the test if anything reads it."""

    def __getattribute__(self, name):
        raise AssertionError(f"the label was read ({name})")

    def __index__(self):
        raise AssertionError("the label was read")

    def __eq__(self, other):
        raise AssertionError("the label was read")

    __hash__ = None


def test_the_label_never_reaches_the_sequential_path():
    x = np.full((1, 1, 1), 0.7, np.float32)
    certify_one = sequential.make_certify_one(
        threshold_classifier(0.5),
        Settings(sigma=0.25, n0=32, alpha=0.01, n=1000, batch_size=128, num_classes=2),
        rng=jax.random.key(3))
    rows = [certify_one(5, x, label) for label in (0, 1, Poison())]
    assert rows[0] == rows[1] == rows[2]
    for fn in (certify_sequential, certify_cascade_sequential, sequential.sequential_image,
               sequential.cascade_sequential_image, sequential.run_stage):
        assert "label" not in fn.__code__.co_varnames


# ------------------------------------------------------------------------------------------
# Cascade.
# ------------------------------------------------------------------------------------------


class Probs:
    """A base classifier known only by its smoothed class probabilities at one sigma."""

    def __init__(self, probs):
        self.probs = np.asarray(probs, np.float64)


def table_sampler(seed):
    """Multinomial votes from Probs.probs, from one NumPy stream (the keys are ignored)."""
    rng = np.random.default_rng(seed)

    def sampler(fn, image, key, num, sigma):
        return rng.multinomial(num, fn.probs)

    return sampler


def cascade_settings(sigmas, n0, alpha, n_max, num_classes):
    return Settings(sigma=tuple(sigmas), n0=n0, alpha=alpha, n=n_max, batch_size=4,
                    num_classes=num_classes)


def test_sequential_cascade_on_the_official_boundary_case_stays_below_alpha():
    # Stage 0: p(a) = 0.501, p(b) = 0.499; stage 1 always b (the case where the official
    # alpha split certifies b wrongly ~11% of the time at alpha = 0.1).
    fns = [Probs([0.501, 0.499]), Probs([0.0, 1.0])]
    sampler = table_sampler(0)
    runs, alpha, wrong = 200, 0.1, 0
    for i in range(runs):
        result = certify_cascade_sequential(
            fns, np.zeros((1, 1, 1), np.float32), cascade_settings([1.0, 0.5], 20, alpha, 400, 2),
            rng=jax.random.key(i), schedule=Schedule(n_first=20, growth=2.0, power=0.0),
            sampler=sampler)
        wrong += result.prediction == 1  # b is never the cascade's class at x
    assert wrong <= stats.binom.ppf(0.999, runs, alpha)


def test_sequential_cascade_decides_like_the_fixed_one_on_clear_cases():
    x = np.zeros((1, 1, 1), np.float32)
    settings = cascade_settings([1.0, 0.5], 50, 0.001, 20_000, 3)
    common = dict(rng=jax.random.key(0), sampler=table_sampler(1))
    # Stage 0 certain of class 2: predicts at stage 0 with sigma 1's radius, early.
    got = certify_cascade_sequential([Probs([0, 0, 1]), Probs([1, 0, 0])], x, settings,
                                     **common)
    assert (got.prediction, got.stage) == (2, 0) and got.radius > 2.5
    assert got.num_samples < 10_000
    # Stage 0 spread out (abstains), stage 1 certain of class 0: predicts 0 at stage 1,
    # radius limited by stage 0's off-class term sigma_0 (Phi^-1(1/2) - Phi^-1(U)) > 0.
    got = certify_cascade_sequential([Probs([0.2, 0.35, 0.45]), Probs([1, 0, 0])], x,
                                     settings, **common)
    assert (got.prediction, got.stage) == (0, 1)
    assert 0 < got.radius <= -stats.norm.ppf(0.45) + 1e-9
    assert got.radius <= -got.r_neg
    # Stage 0 straddles p0: ambiguous without visiting stage 1.
    got = certify_cascade_sequential([Probs([0.5, 0.5, 0]), Probs([1, 0, 0])], x, settings,
                                     **common)
    assert (got.prediction, got.stage) == (AMBIGUOUS, 0)


def test_sequential_cascade_rows_are_label_free_but_for_corr_uc():
    certify_one = sequential.make_cascade_certify_one(
        [Probs([0.1, 0.9]), Probs([0.9, 0.1])], cascade_settings([1.0, 0.5], 20, 0.01, 2000, 2),
        rng=jax.random.key(0), sampler=lambda *a: table_sampler(7)(*a))
    rows = [certify_one(3, np.zeros((1, 1, 1), np.float32), label) for label in (0, 1)]
    assert set(rows[0]) == {"predict", "radius", *CASCADE_COLUMNS,
                            *sequential.CASCADE_EXTRA_COLUMNS}
    assert 0.0 <= rows[0]["pA_lower"] <= 1.0
    assert rows[0]["corr_uc"] != rows[1]["corr_uc"]
    assert {k: v for k, v in rows[0].items() if k != "corr_uc"} == \
        {k: v for k, v in rows[1].items() if k != "corr_uc"}
    assert math.isfinite(rows[0]["radius"])


# ------------------------------------------------------------------------------------------
# Cascade: no stalls, never dearer than the fixed cascade on boundary cases, exact soundness.
# ------------------------------------------------------------------------------------------

BOUNDARY_CASES = {  # stage 0 (sigma 1.0), stage 1 (sigma 0.5); alpha 0.1, n0 100
    # a selection error or two classes near 1/2 at stage 0: the old engine sampled to the cap
    "selection_error": [(0.45, 0.55), (0.9, 0.1)],
    "official_boundary": [(0.501, 0.499), (0.0, 1.0)],  # the official split's 0.11 > alpha
    "near_boundary": [(0.505, 0.495), (0.0, 1.0)],
}


def mean_passes(probs, runs, *, sequential_engine):
    """Mean noisy forward passes of one engine on 2-class stages of known probabilities:
    the sequential cascade capped at 150,000, or the fixed one at N = 100,000 (the task's
    default cap is 1.5 N)."""
    fns = [Probs(p) for p in probs]
    x = np.zeros((1, 1, 1), np.float32)
    passes = []
    for i in range(runs):
        sampler = table_sampler(i)
        if sequential_engine:
            settings = cascade_settings([1.0, 0.5], 100, 0.1, 150_000, 2)
            result = certify_cascade_sequential(fns, x, settings, rng=jax.random.key(i),
                                                sampler=sampler)
        else:
            settings = cascade_settings([1.0, 0.5], 100, 0.1, 100_000, 2)
            result = cascade.certify_cascade(fns, x, settings, rng=jax.random.key(i),
                                             sampler=sampler)
        passes.append(result.num_samples)
    return float(np.mean(passes))


def test_a_stage_whose_selected_class_is_below_p0_continues_instead_of_sampling_to_the_cap():
    # Stage 0 has 0.55 on class 1; when selection picks class 0 (0.45) the old engine never
    # stopped (27,616 passes on average, 17.5% of images at the cap). U(c_hat) < p0 now
    # continues at once (stage 1 then certifies nothing for class 0: class 1 may exceed p0
    # at stage 0), so an image costs a few thousand passes.
    fns = [Probs(p) for p in BOUNDARY_CASES["selection_error"]]
    settings = cascade_settings([1.0, 0.5], 100, 0.1, 150_000, 2)
    results = [certify_cascade_sequential(fns, np.zeros((1, 1, 1), np.float32), settings,
                                          rng=jax.random.key(i), sampler=table_sampler(i))
               for i in range(60)]
    assert np.mean([r.num_samples for r in results]) < 5_000
    assert max(c.sum() for r in results for c in r.counts) < 150_000
    assert {r.prediction for r in results} <= {1, ABSTAIN}  # class 1 or no certificate


@pytest.mark.parametrize("case", sorted(BOUNDARY_CASES))
def test_the_sequential_cascade_costs_less_than_the_fixed_one_on_boundary_cases(case):
    probs = BOUNDARY_CASES[case]
    sequential_passes = mean_passes(probs, 40, sequential_engine=True)
    # The fixed cascade spends N0 + N on stage 0 alone, and more when it continues.
    assert sequential_passes < 100_100 <= mean_passes(probs, 10, sequential_engine=False)


class NeedDraw(Exception):
    """The cascade asked for a draw beyond the enumerated prefix."""

    def __init__(self, fn, num):
        self.fn, self.num = fn, num


def draw_outcomes(probs, num, n0):
    """(votes [2], probability) of every outcome of one draw of num samples; a selection
    draw (num == n0) only matters through c_hat = argmax (lowest class on ties)."""
    outcomes = [(np.array([k, num - k]), stats.binom.pmf(k, num, probs[0]))
                for k in range(num + 1) if stats.binom.pmf(k, num, probs[0]) > 0]
    if num != n0:
        return outcomes
    c_hat = np.zeros(2)
    for votes, weight in outcomes:
        c_hat[int(np.argmax(votes))] += weight
    return [(np.eye(2, dtype=np.int64)[c] * n0, w) for c, w in enumerate(c_hat) if w > 0]


def theorem_radius(y, k, probs, sigmas, p0=0.5):
    """The cascade theorem's radius of output y at stage k from the true probabilities."""
    z0 = stats.norm.ppf(p0)
    with np.errstate(divide="ignore"):
        radius = sigmas[k] * (stats.norm.ppf(probs[k][y]) - z0)
        for j in range(k):
            radius = min(radius, sigmas[j] * (z0 - stats.norm.ppf(1.0 - probs[j][y])))
    return radius


def exact_sequential_cascade(probs, alpha, *, n0=3, looks=(4, 8)):
    """(P(wrong certificate), E[passes]) of the real sequential cascade, by enumeration.

    Every selection and every look's votes are enumerated with their probabilities: a
    replaying sampler feeds the engine a prefix of draws and raises NeedDraw past it, and
    the enumeration extends the prefix by every outcome of that draw.
    """
    fns = [Probs(p) for p in probs]
    settings = cascade_settings([1.0, 0.5], n0, alpha, looks[-1], 2)
    schedule = Schedule(n_first=looks[0], growth=2.0, power=0.0,
                        stop_level=sequential.DEFAULT_CASCADE_STOP_LEVEL)
    assert look_schedule(looks[0], looks[-1], 2.0) == looks
    wrong, passes = 0.0, 0.0

    def visit(prefix, weight):
        nonlocal wrong, passes
        replies = iter(prefix)

        def sampler(fn, image, key, num, sigma):
            reply = next(replies, None)
            if reply is None:
                raise NeedDraw(fn, num)
            return reply

        try:
            result = certify_cascade_sequential(
                fns, np.zeros((1, 1, 1), np.float32), settings, rng=jax.random.key(0),
                schedule=schedule, sampler=sampler)
        except NeedDraw as need:
            for votes, w in draw_outcomes(need.fn.probs, need.num, n0):
                visit([*prefix, votes], weight * w)
            return
        passes += weight * result.num_samples
        if result.prediction >= 0 and result.radius > theorem_radius(
                result.prediction, result.stage, probs, (1.0, 0.5)) + 1e-12:
            wrong += weight

    visit([], 1.0)
    return wrong, passes


EXACT_CASES = [
    [(0.5, 0.5), (0.0, 1.0)],  # stage 0 exactly at p0: any radius > 0 there is wrong
    [(0.501, 0.499), (0.0, 1.0)],
    [(0.45, 0.55), (0.9, 0.1)],  # the selection-error case: continues at U(c_hat) < p0
    [(0.3, 0.7), (0.5, 0.5)],  # the last stage exactly at p0
]


def test_sequential_cascade_wrong_certificates_are_at_most_alpha_exactly():
    for probs in EXACT_CASES:
        for alpha in (0.1, 0.3):
            wrong, _ = exact_sequential_cascade(probs, alpha)
            assert wrong <= alpha


def test_the_exact_check_fails_a_cascade_that_forgets_the_earlier_stages(monkeypatch):
    # Stage 0 outputs class 1 (0.7); one selection sample picks class 0 w.p. 0.3, whose
    # upper bound often falls below p0, so the stage continues and stage 1 (always class 0)
    # predicts 0. The earlier stage's off-class term (class 1 may exceed p0 there) makes
    # that an abstention; a cascade without it certifies class 0: a wrong certificate.
    case, looks = [(0.3, 0.7), (1.0, 0.0)], (8, 16, 32)
    assert exact_sequential_cascade(case, 0.1, n0=1, looks=looks)[0] <= 0.1
    monkeypatch.setattr(sequential, "earlier_stages_term",
                        lambda abstained, y, z0: cascade.R_NEG_NONE)
    assert exact_sequential_cascade(case, 0.1, n0=1, looks=looks)[0] > 0.1


def test_report_refuses_to_recompute_a_sequential_log_at_another_alpha(tmp_path, capsys):
    from dmae_jax import report
    from dmae_jax.smoothing import LOG_COLUMNS, make_certify_one, run_certification

    x = np.full((1, 1, 1), 0.7, np.float32)
    settings = Settings(sigma=0.25, n0=32, alpha=0.01, n=1000, batch_size=128, num_classes=2)
    items = [(i, x, 0) for i in range(3)]
    fixed, seq = str(tmp_path / "fixed.tsv"), str(tmp_path / "sequential.tsv")
    run_certification(items, make_certify_one(threshold_classifier(0.5), settings,
                                              rng=jax.random.key(0)),
                      log_path=fixed, extra_columns=LOG_COLUMNS, print_fn=lambda s: None)
    run_certification(items, sequential.make_certify_one(threshold_classifier(0.5), settings,
                                                         rng=jax.random.key(0)),
                      log_path=seq, extra_columns=(*LOG_COLUMNS, *sequential.SEQUENTIAL_COLUMNS),
                      print_fn=lambda s: None)
    assert report.main([fixed, "--alpha", "0.001"]) == 0  # the control: a fixed log is fine
    with pytest.raises(SystemExit) as exit_:
        report.main([seq, "--alpha", "0.001"])
    assert exit_.value.code == 2
    assert "optional stopping" in capsys.readouterr().err
