"""Randomized-smoothing PREDICT and CERTIFY (Cohen, Rosenfeld & Kolter, ICML 2019), in JAX.

The algorithms read like the paper's pseudocode (and locuslab/smoothing `core.py`):

    CERTIFY: counts_selection = SampleUnderNoise(f, x, n0, sigma)      # key k_sel
             cAHat = argmax counts_selection                            # lowest index on ties
             counts_estimation = SampleUnderNoise(f, x, n, sigma)       # fresh key k_est
             pA_lower = LowerConfBound(counts_estimation[cAHat], n, 1 - alpha)
             abstain if pA_lower < 0.5, else return cAHat, sigma * Phi^-1(pA_lower)
    PREDICT: counts = SampleUnderNoise(f, x, n, sigma); top two counts n_A, n_B;
             abstain if BinomPValue(n_A, n_A + n_B, 0.5) > alpha, else return the top class

SampleUnderNoise is the engine's sampler (module `sampling`, on the devices); the statistics
run on the host in float64 (SciPy). With noise="sound" (module `sound`) the samples are
those of the quantised classifier under exactly sampled noise, pA_lower is lowered by the
sampler's total-variation error and the float margin, and the radius by the input's
distance to the grid: the certificate then holds in floating point too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from scipy import stats

from dmae_jax.smoothing import sound
from dmae_jax.smoothing.logs import format_sparse_counts
from dmae_jax.smoothing.multinomial import cp_lower
from dmae_jax.smoothing.sampling import (
    LogitsFn,
    check_images,
    draw,
    key_array,
    single_key,
    split_keys,
)
from dmae_jax.smoothing.settings import Settings, check_alpha, check_positive_int

ABSTAIN = -1

# Extra log columns `make_certify_one` fills (after idx label predict radius correct time):
# enough to recompute the bound at another alpha and to audit every certificate.
LOG_COLUMNS = (
    "sigma", "cAHat", "nA", "n", "pA_lower", "n_drawn", "abstained_early",
    "counts_selection", "counts_estimation",
)


@dataclasses.dataclass(frozen=True)
class CertifyResult:
    """Everything CERTIFY computed for one image (what the certification log records)."""

    prediction: int  # cAHat, or ABSTAIN (-1)
    radius: float  # sigma * Phi^-1(pA_lower), 0.0 on abstain
    pA_lower: float  # one-sided (1 - alpha) Clopper-Pearson bound; NaN if never estimated
    counts_selection: np.ndarray  # [K] int64 votes of the n0 selection samples
    counts_estimation: np.ndarray  # [K] int64 votes of the n estimation samples (0 if skipped)
    n_drawn: int  # noisy forward passes made: n0 + n, or n0 after an early abstain
    abstained_early: bool  # early_abstain_label was set and cAHat differed from it


# ---------------------------------------------------------------------------------------------
# Statistics (host, float64).
# ---------------------------------------------------------------------------------------------


def lower_confidence_bound(nA: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on pA from nA successes in n draws."""
    check_positive_int("n", n)
    if not 0 <= nA <= n:
        raise ValueError(f"nA must be in [0, n={n}], got {nA}")
    check_alpha(alpha)
    return cp_lower(nA, n, alpha)


def radius_from_bound(pA_lower: float, sigma: float) -> float:
    """Certified L2 radius sigma * Phi^-1(pA_lower) (Cohen et al., Theorem 1 with pB = 1 - pA)."""
    return float(sigma * stats.norm.ppf(pA_lower))


def recompute_at_alpha(rows: Sequence[dict[str, Any]], alpha: float) -> list[dict[str, Any]]:
    """CERTIFY rows with pA_lower, predict, radius and correct recomputed at another alpha.

    Each row's bound is the Clopper-Pearson one of its nA votes for cAHat in n estimation
    samples (LOG_COLUMNS), exactly as CERTIFY computes it, so a fixed-protocol log answers
    "what would alpha' have certified" without sampling again. Refused, with ValueError:
    rows of a sequential log (a `looks` column): their bounds were computed at per-look
    levels and the engine stopped once the answer at ITS alpha was settled, so nA and n at
    the stopping look carry no valid bound at another alpha (optional stopping); rows
    without the counts (Cohen et al.'s or a cascade's logs); sound-noise rows can be
    recomputed only by the certify task (their margins depend on the image).
    """
    check_alpha(alpha)
    if rows and "looks" in rows[0]:
        raise ValueError(
            "the log is sequential (it has a `looks` column): its bounds were computed at "
            "per-look levels and sampling stopped once the answer at the log's alpha was "
            "settled, so recomputing them from nA and n at another alpha is optional "
            "stopping, not a bound; certify again at that alpha")
    missing = [c for c in ("sigma", "cAHat", "nA", "n") if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"the log has no {', '.join(missing)} column(s) (only logs written "
                         f"by CERTIFY with LOG_COLUMNS record the counts a bound needs)")
    recomputed = []
    for row in rows:
        row = dict(row)
        if int(row["n"]) > 0:  # 0: DMAE's early abstain, never estimated
            pA_lower = cp_lower(int(row["nA"]), int(row["n"]), alpha)
            sigma = float(row["sigma"])
            certified = pA_lower >= 0.5
            row["pA_lower"] = pA_lower
            row["predict"] = int(row["cAHat"]) if certified else ABSTAIN
            row["radius"] = radius_from_bound(pA_lower, sigma) if certified else 0.0
            row["correct"] = int(row["predict"] == int(row["label"]))
        recomputed.append(row)
    return recomputed


def margin_for(settings: Settings, sigma: float, image: np.ndarray) -> sound.Margin:
    """How far this image's bounds move for soundness: not at all with float noise."""
    if settings.noise == "float":
        return sound.EXACT
    return sound.margin(sigma, settings.levels, image)


# ---------------------------------------------------------------------------------------------
# PREDICT and CERTIFY.
# ---------------------------------------------------------------------------------------------


def certify_image(settings: Settings, logits_fn: LogitsFn, image: np.ndarray, key: jax.Array,
                  early_abstain_label: int | None = None) -> CertifyResult:
    """CERTIFY on a checked image [H, W, C] with one key (the settings were checked when built).

    With `early_abstain_label` set (DMAE's util/smooth.py shortcut; off by default), the
    estimation samples are skipped and the result is an abstention whenever cAHat differs
    from that label: certified accuracy is unchanged, but the prediction is then no longer
    the smoothed classifier's output.
    """
    sigma = settings.one_sigma("certify")
    # Selecting cAHat on the estimation samples would bias pA_lower upwards: fresh keys.
    k_sel, k_est = split_keys(key)
    counts_selection = draw(settings, logits_fn, image, k_sel, settings.n0, sigma)
    cAHat = int(np.argmax(counts_selection))  # lowest class index on ties
    if early_abstain_label is not None and cAHat != int(early_abstain_label):
        return CertifyResult(
            prediction=ABSTAIN, radius=0.0, pA_lower=float("nan"),
            counts_selection=counts_selection,
            counts_estimation=np.zeros(settings.num_classes, np.int64),
            n_drawn=settings.n0, abstained_early=True,
        )
    counts_estimation = draw(settings, logits_fn, image, k_est, settings.n, sigma)
    margin = margin_for(settings, sigma, image)
    pA_lower = margin.lower(cp_lower(int(counts_estimation[cAHat]), settings.n, settings.alpha))
    # Cohen's code abstains only below 0.5, so pA_lower == 0.5 certifies radius 0.
    radius = margin.radius(radius_from_bound(pA_lower, sigma)) if pA_lower >= 0.5 else -1.0
    if radius < 0.0:
        prediction, radius = ABSTAIN, 0.0
    else:
        prediction = cAHat
    return CertifyResult(
        prediction=prediction, radius=radius, pA_lower=pA_lower,
        counts_selection=counts_selection, counts_estimation=counts_estimation,
        n_drawn=settings.n0 + settings.n, abstained_early=False,
    )


def _check_label(label: Any, num_classes: int) -> None:
    if label is not None and not (isinstance(label, int | np.integer) and 0 <= label < num_classes):
        raise ValueError(
            f"early_abstain_label must be None or a class in [0, {num_classes}), got {label!r}")


def certify_detailed(logits_fn: LogitsFn, x: Any, *, rng: jax.Array,
                     early_abstain_label: int | None = None, **settings: Any) -> CertifyResult:
    """Cohen et al.'s CERTIFY on one image x [H, W, C] in [0, 1], with its counts and bound.

    `settings` are the `Settings` fields: sigma, n0, n, alpha, batch_size, num_classes and
    optionally compute_dtype, devices, noise, levels. See `certify_image` for
    `early_abstain_label`.
    """
    checked = Settings(**settings)
    _check_label(early_abstain_label, checked.num_classes)
    key = single_key(rng)
    return certify_image(checked, logits_fn, check_images("x", x, rank=3), key,
                         early_abstain_label)


def certify(logits_fn: LogitsFn, x: Any, *, rng: jax.Array, **settings: Any) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY: (class, L2 radius) of the smoothed classifier at x, or (-1, 0.0).

    certify(logits_fn, x, sigma=..., n0=..., n=..., alpha=..., batch_size=..., rng=...,
    num_classes=...); the keywords are `certify_detailed`'s.
    """
    result = certify_detailed(logits_fn, x, rng=rng, **settings)
    return result.prediction, result.radius


def predict(logits_fn: LogitsFn, x: Any, *, rng: jax.Array, **settings: Any) -> int:
    """Cohen et al.'s PREDICT: the smoothed classifier's class at x [H, W, C], or -1 (abstain).

    Draws `n` samples (keywords: the `Settings` fields sigma, n, alpha, batch_size,
    num_classes, ...). Returns a wrong class with probability <= alpha (two-sided exact
    binomial test on the top two counts; Hung & Fithian 2019). With n samples the smallest
    p-value is 2^(1-n), so alpha = 0.001 needs n >= 11 to ever answer.
    """
    checked = Settings(**settings)
    counts = draw(checked, logits_fn, check_images("x", x, rank=3), single_key(rng), checked.n,
                  checked.one_sigma("predict"))
    # A stable sort keeps the lowest class index first among equal counts.
    top2 = np.argsort(-counts, kind="stable")[:2]
    count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
    if stats.binomtest(count1, count1 + count2, 0.5).pvalue > checked.alpha:
        return ABSTAIN
    return int(top2[0])


def make_certify_one(logits_fn: LogitsFn, settings: Settings, *, rng: jax.Array,
                     early_abstain: bool = False) -> Callable[[int, Any, int], dict[str, Any]]:
    """certify_one(idx, image, label) -> log row (predict, radius, LOG_COLUMNS) for the runner.

    Image idx uses the key fold_in(rng, idx), so a resumed or multi-process run certifies
    each image exactly as one uninterrupted run does. early_abstain=True passes the label as
    `early_abstain_label` (DMAE's shortcut), which the `abstained_early` column records.
    """
    sigma = settings.one_sigma("certify")
    key = key_array(rng)

    def certify_one(idx: int, image: Any, label: int) -> dict[str, Any]:
        result = certify_image(
            settings, logits_fn, check_images("image", image, rank=3),
            jax.random.fold_in(key, idx), int(label) if early_abstain else None)
        cAHat = int(np.argmax(result.counts_selection))
        return {
            "predict": result.prediction,
            "radius": result.radius,
            "sigma": float(sigma),
            "cAHat": cAHat,
            "nA": int(result.counts_estimation[cAHat]),
            "n": 0 if result.abstained_early else settings.n,
            "pA_lower": result.pA_lower,
            "n_drawn": result.n_drawn,
            "abstained_early": int(result.abstained_early),
            "counts_selection": format_sparse_counts(result.counts_selection),
            "counts_estimation": format_sparse_counts(result.counts_estimation),
        }

    return certify_one
