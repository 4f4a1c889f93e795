"""Confidence bounds on binomial and multinomial proportions for the cascade certificate.

Plain NumPy/SciPy on host: these run once per image and stage, never inside a jitted step.
`clopper_pearson` matches statsmodels' `proportion_confint(count, nobs, alpha=2 * alpha,
method="beta")`, and `goodman_intervals` matches statsmodels'
`multinomial_proportions_confint(counts, alpha, method="goodman")`, which is what the
official multi-scale code calls (tests/test_cascade.py checks both against statsmodels).
"""

from collections.abc import Sequence

import numpy as np
from scipy import special, stats

# Goodman's intervals rest on a chi-square approximation that is trusted only when every
# cell holds at least this many counts (Goodman 1965; statsmodels' documentation).
MIN_CELL_COUNT = 5


def cp_lower(count: int, nobs: int, level: float) -> float:
    """One-sided Clopper-Pearson lower bound on p from count of nobs; fails w.p. <= level.

    The level-quantile of Beta(count, nobs - count + 1) (SciPy's special function: the same
    Boost routine and bits as stats.beta.ppf, without its ~40x overhead per call). The
    quantile is NaN at count 0; the bound is 0 there (a NaN bound would pass every
    `< threshold` test as False and certify).
    """
    return 0.0 if count <= 0 else float(special.betaincinv(count, nobs - count + 1, level))


def cp_upper(count: int, nobs: int, level: float) -> float:
    """One-sided Clopper-Pearson upper bound on p from count of nobs; fails w.p. <= level.

    The upper level-quantile of Beta(count + 1, nobs - count) (stats.beta.isf's bits).
    """
    return 1.0 if count >= nobs else float(special.betainccinv(count + 1, nobs - count, level))


def clopper_pearson(count: int, nobs: int, alpha: float) -> tuple[float, float]:
    """Exact binomial (lower, upper) bounds on count/nobs, each side failing w.p. <= alpha."""
    if nobs < 1:
        raise ValueError(f"nobs must be >= 1, got {nobs}")
    if not 0 <= count <= nobs:
        raise ValueError(f"count must be in [0, nobs={nobs}], got {count}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    return cp_lower(count, nobs, alpha), cp_upper(count, nobs, alpha)


def goodman_intervals(counts: Sequence[int] | np.ndarray, alpha: float) -> np.ndarray:
    """Goodman's simultaneous two-sided intervals [k, 2] (lower, upper), joint level 1 - alpha."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"counts must be a 1-D array of >= 2 cells, got shape {counts.shape}")
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"counts must be >= 0 with a positive total, got {counts.tolist()}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = counts.sum()
    k = counts.size
    p_hat = counts / n
    # Bonferroni over the k cells: each cell gets a chi-square(1) score interval at alpha / k,
    # i.e. the roots in p of (n p_hat - n p)^2 = a n p (1 - p) with a the chi-square quantile.
    a = stats.chi2.ppf(1.0 - alpha / k, 1)
    half_width = np.sqrt(a * a + 4.0 * n * p_hat * (1.0 - p_hat) * a)
    centre = 2.0 * n * p_hat + a
    denominator = 2.0 * (n + a)
    return np.stack([(centre - half_width) / denominator, (centre + half_width) / denominator], 1)


def reduce_counts(counts: Sequence[int] | np.ndarray, c: int) -> np.ndarray:
    """Cells [n_c, pooled off-class cells...] with small off-class counts pooled to >= 5.

    Off-class counts are visited from largest to smallest: a count >= 5 is its own cell;
    smaller counts accumulate until they reach 5 and then form one cell; a remainder below
    5 is added to the last cell (to the class-c cell when no off-class cell exists). Only
    the cell sizes matter to the bound, so ties between classes need no rule. This is the
    official `SmoothedConfidence._reduce_counts`.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D [K], got shape {counts.shape}")
    if not 0 <= c < counts.size:
        raise ValueError(f"c must be a class in [0, {counts.size}), got {c}")
    off_class = np.sort(np.delete(counts, c))[::-1]
    cells = [int(counts[c])]
    pooled = 0
    for count in off_class:
        if count >= MIN_CELL_COUNT:
            cells.append(int(count))
        else:
            pooled += int(count)
            if pooled >= MIN_CELL_COUNT:
                cells.append(pooled)
                pooled = 0
    cells[-1] += pooled
    return np.asarray(cells, dtype=np.int64)
