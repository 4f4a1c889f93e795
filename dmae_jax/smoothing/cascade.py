"""Multi-scale cascaded randomized smoothing (Jeong & Shin, NeurIPS 2023).

The cascaded classifier visits smoothed classifiers g_sigma from the largest sigma down and
outputs the first one whose top-class probability exceeds p0 (abstaining if none does):
the largest scale keeps the largest radii, smaller scales rescue inputs it over-smooths.

`certify_cascade` is the official `certify.py` / `third_party/core_mdds.py` algorithm with
a sound split of alpha between the stages (`alpha_split`, below). Stage j (0 = largest
sigma) draws fresh n0 selection and n estimation samples and tests its top class c_hat:
    pA_lower >= p0            -> predict c_hat, stop;
    pA_lower < p0 <= pA_upper -> abstain AMBIGUOUS (-2), stop (no fall-through);
    pA_upper < p0             -> this scale abstains, keep its counts, go to the next sigma.
When stage k predicts y, every earlier stage j must keep every class != y below p0 too:
    radius = min(sigma_k (Phi^-1(pA_lower) - Phi^-1(p0)),
                 min_{j<k} sigma_j (Phi^-1(p0) - Phi^-1(pB_upper_j)))
where pB_upper_j bounds max_{c != y} p_j(c). A negative radius becomes ABSTAIN (-1) with
radius 0; a radius of exactly 0 keeps y. p0 must be >= 1/2 (official default 1/2): below it
two classes of one scale could both exceed p0 near x and the certificate would not hold.

Alpha split. `alpha_split="official"` tests stage j at alpha / (j + 1) (Clopper-Pearson
for c_hat, Goodman's simultaneous intervals over pooled cells for pB_upper at the deciding
stage's level), exactly as the official code. That is NOT a level-alpha procedure: the stage
that decides is itself random, the events "stage k decides and one of its bounds fails" add
up over k, and the counts of an abstaining stage feed both its own continue test and later
off-class bounds (two stages, sigmas (1.0, 0.5), alpha = 0.1, stage 0 with p(a) = 0.501,
p(b) = 0.499, stage 1 always b: a wrong certificate has probability about 0.11 > alpha; the
tests compute it exactly). Goodman's intervals are moreover a chi-square approximation.

`alpha_split="sound"` (the default) gives each of the K stages alpha / K, all of it exact:
    stage j < K - 1: pA_lower_j = Clopper-Pearson lower bound on p_j(c_hat_j) at alpha/(2K);
                     U_j(c) = Clopper-Pearson upper bound on p_j(c) at alpha/(2K m) for
                     EVERY class c of the m classes (a Bonferroni family);
    stage K - 1:     pA_lower at alpha / K (it is never an earlier stage, so needs no U);
    pB_upper_j(y) = max_{c != y} U_j(c);  the continue test is U_j(c_hat_j) < p0 (the last
    stage: the Clopper-Pearson upper bound of c_hat at alpha / K).
Theorem: whatever stage the cascade stops at, P(it returns y with a radius R that is not a
certificate) <= alpha. Proof. Couple the run with independent draws for all K stages made in
advance (the cascade reads stage j's draws only if it reaches it; this does not change the
law of what it returns). Let G_j be the event that the bounds of stage j hold: p_j(c_hat_j)
>= pA_lower_j and (for j < K - 1) p_j(c) <= U_j(c) for every class c. c_hat_j comes from
stage j's own selection samples, independent of its estimation counts, so conditionally on
c_hat_j the Clopper-Pearson bound fails with probability <= its level, and the union over
the m classes of the U_j(c) failures has probability <= m times each level: P(not G_j) <=
alpha / K, and P(G_0 and ... and G_{K-1}) >= 1 - alpha. On that event, suppose the cascade
returns y at stage k with radius R >= 0. Then p_k(y) >= pA_lower_k and, for every j < k and
c != y, p_j(c) <= pB_upper_j(y), whatever y is (the bounds hold for every class at once, so
the data-dependent choice of y and k cannot break them). By the cascade theorem (Phi^-1 of
each smoothed probability is 1/sigma-Lipschitz in x), for every x' with |x' - x| < R:
p_k(x', y) > p0 and, for j < k, every class c != y has p_j(x', c) < p0, so no earlier stage
outputs a class other than y and stage k outputs y: casc(x') = y. Hence a wrong certificate
implies that some G_j failed, which has probability <= alpha. The decision tests (continue
or ambiguous) may use any statistic: a wrong "continue" only makes a later radius smaller
(its off-class term is negative if some class != y may exceed p0).
The price: each bound is at a smaller level than the official one (e.g. alpha / 6 for
the first stage of three instead of alpha), a few percent of radius at N = 100,000.

Units. The official code works on images in [-1, 1] (u = 2x - 1) with noise std 2 sigma
and divides its radius by 2 at the end. Our images are in [0, 1] and we add noise of std
sigma, which is the same experiment: u + N(0, (2 sigma)^2) = 2 (x + N(0, sigma^2)) - 1, so
the base classifier sees identically distributed inputs and every count, bound and
decision has the same distribution. Every radius term is linear in the noise std, so the
official u-space radius is 2 sigma (...) = 2 R, and an L2 ball of radius 2R in u-space is
the ball of radius R in x-space (|u - u'| = 2 |x - x'|). Hence official radius / 2 equals
our sigma (...) exactly, and the sign tests agree. The official `r_neg` column is in
u-space; ours is in [0, 1]-pixel units, i.e. official r_neg / 2 (sentinel -100 unchanged).
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from scipy import special, stats

from dmae_jax.smoothing import sound
from dmae_jax.smoothing.certify import ABSTAIN, margin_for
from dmae_jax.smoothing.multinomial import clopper_pearson, goodman_intervals, reduce_counts
from dmae_jax.smoothing.sampling import (
    LogitsFn,
    Sampler,
    check_images,
    key_array,
    sampler_for,
    single_key,
    split_keys,
)
from dmae_jax.smoothing.settings import Settings

# The interval for the stage's top class contains p0: the cascade stops without deciding.
AMBIGUOUS = -2
# Logged r_neg when no larger scale abstained before the deciding stage (official value).
R_NEG_NONE = -100.0

# "sound": alpha / K per stage, every bound exact and simultaneous (total <= alpha);
# "official": stage j at alpha / (j + 1), as jh-jeong/smoothing-multiscale (not level alpha).
ALPHA_SPLITS = ("sound", "official")

# Log columns after the contract's `idx label predict radius correct time`.
CASCADE_COLUMNS = ("r_neg", "pred_uc", "corr_uc", "stage", "sigma", "num_samples")


@dataclasses.dataclass(frozen=True)
class Certificate:
    """Outcome of the cascade's statistical tests on per-stage counts."""

    prediction: int  # class, ABSTAIN (-1) or AMBIGUOUS (-2)
    radius: float  # certified L2 radius in [0, 1]-pixel units, 0 unless a class is returned
    stage: int  # last stage visited (0 = largest sigma)
    sigma: float  # sigma of that stage
    r_neg: float  # max_{j<k} sigma_j (Phi^-1(pB_upper_j) - Phi^-1(p0)), or R_NEG_NONE
    pA_lower: float  # lower bound of the last stage's top class (nan if it was never bounded)


@dataclasses.dataclass(frozen=True)
class CascadeResult:
    """Cascade certificate of one image plus the official fallback prediction and its cost."""

    prediction: int
    radius: float
    stage: int
    sigma: float
    r_neg: float
    pred_uc: int  # prediction if >= 0, else the clean classifier's class (certify_cascade)
    pA_lower: float
    counts: tuple[np.ndarray, ...]  # estimation counts [K] of every visited stage, in order
    num_samples: int  # noisy forward passes used: (stage + 1) * (n0 + n)
    looks: int = 0  # the sequential cascade: looks made over all stages (0: fixed)


def processing_order(sigmas: Sequence[float]) -> list[int]:
    """Indices of `sigmas` from the largest sigma to the smallest: the cascade's stage order."""
    return sorted(range(len(sigmas)), key=lambda i: -sigmas[i])


def off_class_upper_bound(counts: np.ndarray, c: int, alpha: float) -> float:
    """Upper confidence bound on max_{c' != c} p(c') from one stage's counts [K].

    Off-class counts are pooled into cells of >= 5 (`reduce_counts`). With at least two
    off-class cells, the bound is the largest upper end of Goodman's simultaneous intervals
    at 2 alpha (one-sided alpha per side, as the official code). With fewer, all off-class
    mass is in one cell and the bound is 1 - pA_lower(n_c), the Clopper-Pearson upper bound
    on that total. (The official code computes this from the stage's own top class instead
    of c; that is the same when they agree, and when they differ it is no bound on the
    off-class probabilities: for p0 > 1/2 it can overstate the radius.)
    """
    counts = np.asarray(counts, dtype=np.int64)
    cells = reduce_counts(counts, c)
    if len(cells) <= 2:
        pA_lower, _ = clopper_pearson(int(counts[c]), int(counts.sum()), alpha)
        return 1.0 - pA_lower
    return float(goodman_intervals(cells, 2.0 * alpha)[1:, 1].max())


def class_upper_bounds(counts: np.ndarray, alpha: float) -> np.ndarray:
    """[K] Clopper-Pearson upper bounds on every class probability, jointly valid w.p. >= 1 - alpha.

    Each class gets the one-sided level alpha / K (Bonferroni), so the union of the K
    failure events has probability <= alpha whatever the true probabilities.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size < 2 or (counts < 0).any() or counts.sum() < 1:
        raise ValueError(f"counts must be >= 0 over >= 2 classes with a positive total, "
                         f"got {counts.tolist()}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = int(counts.sum())
    full = counts == n
    upper = special.betainccinv(counts + 1, np.where(full, 1, n - counts), alpha / counts.size)
    return np.where(full, 1.0, upper).astype(np.float64)


def sound_levels(stage: int, num_stages: int, alpha: float) -> tuple[float, float]:
    """(level of stage's pA_lower, level of its all-class upper-bound family) in the sound split.

    Each of the K stages gets alpha / K: half for the lower bound on its top class, half for
    the upper bounds on every class it may later be asked about as an earlier stage; the
    last stage is never an earlier stage and puts all of alpha / K on its lower bound.
    """
    share = alpha / num_stages
    if stage == num_stages - 1:
        return share, 0.0
    return share / 2.0, share / 2.0


def certify_from_counts(
    stages: Iterable[tuple[int, np.ndarray]],
    *,
    sigmas: Sequence[float],
    alpha: float,
    p0: float = 0.5,
    alpha_split: str = "sound",
    margins: Sequence[sound.Margin] | None = None,
) -> Certificate:
    """Run the cascade's tests on (c_hat, estimation counts [K]) per stage, largest sigma first.

    `stages` is consumed lazily, one stage at a time, and not beyond the deciding stage, so
    a generator that samples on demand gives the cascade's early stopping. `sigmas` must be
    strictly decreasing (the processing order). alpha_split "sound" (default) spends alpha / K
    per stage with bounds valid for every class at once (total error <= alpha, see the module
    docstring); "official" tests stage j at alpha / (j + 1) as the official code. margins[j]
    moves stage j's bounds and the radius in their safe directions (sound noise; default: not
    at all).
    """
    check_sigmas(sigmas)
    if any(later >= earlier for earlier, later in zip(sigmas, sigmas[1:], strict=False)):
        raise ValueError(f"sigmas must be strictly decreasing (processing order), got {sigmas}")
    check_level(alpha, p0)
    check_alpha_split(alpha_split)
    margins = [sound.EXACT] * len(sigmas) if margins is None else list(margins)
    z0 = stats.norm.ppf(p0)
    num_stages = len(sigmas)
    # (sigma_j, pB_upper_j as a function of the predicted class y) of every abstaining stage.
    abstained: list[tuple[float, Callable[[int, float], float]]] = []
    stage, sigma, pA_lower = -1, float("nan"), float("nan")
    for stage, (sigma, (c_hat, counts)) in enumerate(zip(sigmas, stages, strict=True)):
        counts = np.asarray(counts, dtype=np.int64)
        margin = margins[stage]
        nA, total = int(counts[c_hat]), int(counts.sum())
        off_class: Callable[[int, float], float] | None = None
        if alpha_split == "official":
            alpha_stage = alpha / (stage + 1)
            pA_lower, pA_upper = clopper_pearson(nA, total, alpha_stage)

            def off_class(y, level, counts=counts, margin=margin):
                return margin.upper(off_class_upper_bound(counts, y, level))
        else:
            alpha_stage = float("nan")  # the sound bounds carry their own levels
            level_lower, level_family = sound_levels(stage, num_stages, alpha)
            pA_lower, pA_upper = clopper_pearson(nA, total, level_lower)
            if level_family > 0.0:
                uppers = margin.uppers(class_upper_bounds(counts, level_family))
                pA_upper = float(uppers[c_hat])

                def off_class(y, level, uppers=uppers):
                    return float(np.delete(uppers, y).max())
        pA_lower, pA_upper = margin.lower(pA_lower), margin.upper(pA_upper)
        if pA_lower >= p0:
            radius = sigma * (stats.norm.ppf(pA_lower) - z0)
            r_neg = R_NEG_NONE
            if abstained:
                r_neg = max(
                    sigma_j * (stats.norm.ppf(bound_j(c_hat, alpha_stage)) - z0)
                    for sigma_j, bound_j in abstained
                )
                radius = min(radius, -r_neg)
            radius = margin.radius(radius)
            if radius < 0.0:
                return Certificate(ABSTAIN, 0.0, stage, sigma, float(r_neg), pA_lower)
            return Certificate(int(c_hat), float(radius), stage, sigma, float(r_neg), pA_lower)
        if pA_upper >= p0:
            return Certificate(AMBIGUOUS, 0.0, stage, sigma, R_NEG_NONE, pA_lower)
        if off_class is not None and stage < num_stages - 1:
            abstained.append((sigma, off_class))
    return Certificate(ABSTAIN, 0.0, stage, sigma, R_NEG_NONE, pA_lower)


def certify_cascade(
    logits_fns: Sequence[LogitsFn],
    x: Any,
    settings: Settings,
    *,
    rng: jax.Array,
    p0: float = 0.5,
    alpha_split: str = "sound",
    clean_logits_fn: LogitsFn | None = None,
    sampler: Sampler | None = None,
) -> CascadeResult:
    """Certify one image [H, W, C] in [0, 1] with the multi-scale cascade (official CERTIFY).

    logits_fns[i] is the base classifier ([B, H, W, C] -> logits [B, K]) smoothed at
    settings.sigma[i]: one per sigma (per-sigma fine-tuned classifiers) or the same
    denoise-and-classify function built for each sigma. Stages run from the largest sigma
    down whatever the order given; stage j uses jax.random.split(rng, K)[j], split again
    into its selection and estimation keys. pred_uc is the official fallback: the
    prediction if it is a class, else argmax clean_logits_fn(x[None]) (the classifier on
    the clean image, no noise), or the prediction itself (-1/-2) when clean_logits_fn is
    None. `sampler` (logits_fn, image, key, num, sigma) -> votes [K] defaults to the
    engine's. alpha_split: see `certify_from_counts`.
    """
    check_cascade(settings, logits_fns, p0, alpha_split)
    image = check_images("x", x, rank=3)
    sigmas = settings.sigmas
    sampler = sampler_for(settings) if sampler is None else sampler
    order = processing_order(sigmas)
    stage_keys = split_keys(single_key(rng), len(order))
    visited: list[np.ndarray] = []

    def sample_stages() -> Iterator[tuple[int, np.ndarray]]:
        for stage, i in enumerate(order):
            key_select, key_estimate = split_keys(stage_keys[stage])
            counts_select = sample_stage(sampler, settings, logits_fns[i], image, settings.n0,
                                         key_select, sigmas[i])
            counts_estimate = sample_stage(sampler, settings, logits_fns[i], image, settings.n,
                                           key_estimate, sigmas[i])
            visited.append(counts_estimate)
            yield int(np.argmax(counts_select)), counts_estimate

    certificate = certify_from_counts(
        sample_stages(), sigmas=[sigmas[i] for i in order], alpha=settings.alpha, p0=p0,
        alpha_split=alpha_split,
        margins=[margin_for(settings, sigmas[i], image) for i in order],
    )
    pred_uc = certificate.prediction
    if pred_uc < 0 and clean_logits_fn is not None:
        pred_uc = int(np.argmax(np.asarray(clean_logits_fn(image[None]))[0]))
    return CascadeResult(
        prediction=certificate.prediction,
        radius=certificate.radius,
        stage=certificate.stage,
        sigma=certificate.sigma,
        r_neg=certificate.r_neg,
        pred_uc=pred_uc,
        pA_lower=certificate.pA_lower,
        counts=tuple(visited),
        num_samples=len(visited) * (settings.n0 + settings.n),
    )


def make_certify_one(
    logits_fns: Sequence[LogitsFn],
    settings: Settings,
    *,
    rng: jax.Array,
    p0: float = 0.5,
    alpha_split: str = "sound",
    clean_logits_fn: LogitsFn | None = None,
    sampler: Sampler | None = None,
) -> Callable[[int, Any, int], dict[str, Any]]:
    """certify_one(idx, image, label) -> log row for run_certification (columns CASCADE_COLUMNS).

    The row has every column but `time`, which run_certification measures. The image's key
    is jax.random.fold_in(rng, idx), so a resumed run certifies each image exactly as an
    uninterrupted run does. A bad argument fails here, before the first image.
    """
    check_cascade(settings, logits_fns, p0, alpha_split)
    key = key_array(rng)

    def certify_one(idx: int, image: Any, label: int) -> dict[str, Any]:
        result = certify_cascade(
            logits_fns, image, settings, rng=jax.random.fold_in(key, idx), p0=p0,
            alpha_split=alpha_split, clean_logits_fn=clean_logits_fn, sampler=sampler)
        label = int(label)
        return {
            "idx": int(idx),
            "label": label,
            "predict": result.prediction,
            "radius": result.radius,
            "correct": int(result.prediction == label),
            "r_neg": result.r_neg,
            "pred_uc": result.pred_uc,
            "corr_uc": int(result.pred_uc == label),
            "stage": result.stage,
            "sigma": result.sigma,
            "num_samples": result.num_samples,
        }

    return certify_one


def expected_num_stages(continue_rates: Sequence[float]) -> float:
    """Expected stages visited per image, i.e. cost relative to one sigma with the same n0, n.

    continue_rates[j] is P(stage j abstains with pA_upper < p0 | stage j is reached), for
    j = 0 .. K-2 (largest sigma first); the result is sum_k prod_{j<k} continue_rates[j].
    """
    expected, reach = 1.0, 1.0
    for j, rate in enumerate(continue_rates):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"continue_rates[{j}] must be in [0, 1], got {rate}")
        reach *= rate
        expected += reach
    return expected


def sample_stage(sampler: Sampler, settings: Settings, logits_fn: LogitsFn, image: np.ndarray,
                 num: int, key: jax.Array, sigma: float) -> np.ndarray:
    """Draw `num` noisy counts [K] and check the sampler kept its contract."""
    counts = np.asarray(sampler(logits_fn, image, key, num, sigma), dtype=np.int64)
    if counts.shape != (settings.num_classes,) or counts.sum() != num or (counts < 0).any():
        raise ValueError(
            f"sampler must return {num} non-negative counts of shape ({settings.num_classes},), "
            f"got shape {counts.shape} summing to {counts.sum()}"
        )
    return counts


def check_sigmas(sigmas: Sequence[float]) -> None:
    """Non-empty, finite, positive, distinct noise levels."""
    if len(sigmas) == 0:
        raise ValueError("sigmas must hold at least one noise level, got []")
    for i, sigma in enumerate(sigmas):
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigmas[{i}] must be > 0 and finite, got {sigma}")
    if len(set(sigmas)) != len(sigmas):
        raise ValueError(f"sigmas must be distinct, got {list(sigmas)}")


def check_level(alpha: float, p0: float) -> None:
    """alpha in (0, 1/2); p0 in [1/2, 1), below which two classes could both exceed p0."""
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    if not 0.5 <= p0 < 1.0:
        raise ValueError(f"p0 must be in [0.5, 1) (below 0.5 the certificate is unsound), got {p0}")


def check_alpha_split(alpha_split: str) -> None:
    """One of ALPHA_SPLITS."""
    if alpha_split not in ALPHA_SPLITS:
        raise ValueError(f"alpha_split must be one of {ALPHA_SPLITS}, got {alpha_split!r}")


def check_cascade(settings: Settings, logits_fns: Sequence[LogitsFn], p0: float,
                  alpha_split: str = "sound") -> None:
    """What a cascade needs beyond valid settings: one classifier per sigma, alpha < 1/2, p0."""
    if len(logits_fns) != len(settings.sigmas):
        raise ValueError(
            f"logits_fns must have one entry per sigma ({len(settings.sigmas)}), got "
            f"{len(logits_fns)}")
    check_level(settings.alpha, p0)
    check_alpha_split(alpha_split)
