"""Sequential, anytime-valid certification: draw noise in rounds, stop once the answer is settled.

Cohen et al.'s CERTIFY spends N = 100,000 noisy forward passes on every image, although many
images are settled far earlier: a digit the classifier gets right under every noise draw
reaches the largest radius it can certify after a few thousand samples, and an image whose
top class holds 30% of the votes shows that it must abstain after a few hundred. Here the
estimation samples come in rounds at a fixed schedule of looks n_1 < n_2 < ... < n_T = N_max
(`aligned_schedule`: geometric from n_first, plus for each radius of interest the sample
count at which votes all for c_hat first certify it), and after each look the engine asks
whether more samples could still change the answer at the radii the user cares about
(`Schedule.radii`, default the report's grid). "Anytime" means: at every scheduled look up
to N_max at once, per image; not beyond N_max, not between looks, not at another alpha.

Single sigma (`certify_sequential`), per image:
    c_hat = argmax of n0 selection samples (fresh key, as Cohen: never reused below);
    at look t with n_t estimation samples of which nA_t vote c_hat:
        L_t = max(CP_t, A_t), where
        CP_t = Clopper-Pearson lower bound on pA = P(f(x + noise) = c_hat) at level alpha_t,
               the levels fixed with the schedule, alpha_1 + ... + alpha_T = alpha (1 - a)
               (`aligned_schedule`: alpha_t proportional to (n_t / N_max)^power on the
               geometric looks, 0 on the aligned ones), a = `Schedule.all_correct`;
        A_t  = (alpha a)^(1 / n_t) if nA_t = n_t (every vote so far for c_hat), else 0;
        U_t  = upper bound at s_t = stop_level min(1, n_t / stop_ramp) (defaults 0.2 and
               5,000: the futility level rises with the samples drawn) on the fraction
               of votes for c_hat the cap will show, given the votes so far
               (`predictive_upper`: the conditional power of group-sequential trials;
               used only to decide when to stop);
        stop when the grid level of sigma Phi^-1(L_t) (how many radii of interest it
        certifies) already equals the best level reachable at the cap: that of the larger
        of the CP bound at alpha_T of ceil(U_t N_max) votes in N_max draws and, while
        every vote was for c_hat, (alpha a)^(1 / N_max), i.e. once the next radius has
        less than an s_t chance of being certified by the cap;
        this covers "pA <= 1/2: abstain" (the best level is then 0) and the cap (t = T);
    return (c_hat, sigma Phi^-1(L_tau)) if L_tau >= 1/2, else abstain, at the stopping look tau.

Theorem: P(return c_hat with radius R and pA < Phi(R / sigma)) <= alpha, i.e. with
probability >= 1 - alpha the result is an abstention or a correct Cohen certificate.
Proof. Given c_hat (independent of the estimation samples), the votes for c_hat are i.i.d.
Bernoulli(pA) in the order they are drawn, and look t sees the first n_t of them.
(i) At each fixed look, P(CP_t > pA) <= alpha_t (Clopper-Pearson is exact); by the union
bound over the T looks of the fixed schedule, P(some look has CP_t > pA) <= alpha (1 - a).
This needs only that the looks and their levels are fixed before any sample is drawn (they
depend on n_first, growth, N_max, sigma, the radii, alpha, power and a), not that the
levels are equal. (ii) For pA = 1, A_t <= 1 = pA always. For pA < 1 let m be the first
n with pA^n < alpha a. A_t > pA means that the first n_t votes were all for c_hat and
(alpha a)^(1/n_t) > pA, i.e. pA^n_t < alpha a, i.e. n_t >= m; then in particular the first m
votes were all for c_hat. So P(some look has A_t > pA) <= pA^m < alpha a, for every set of
looks at once: no union bound. (iii) L_t > pA needs (i) or (ii): P(some look has L_t > pA)
<= alpha. The stopping look tau is random, but whatever it is, L_tau > pA implies that
event, so P(L_tau > pA) <= alpha for ANY stopping rule, including one that looks at U_t, at
the radii, or at anything else computed from the samples. On the complementary event,
pA >= L_tau and Cohen et al.'s Theorem 1 makes sigma Phi^-1(L_tau) a certified radius when
L_tau >= 1/2. The upper bound U_t therefore needs no validity: it only decides when to
stop, i.e. how many samples are spent and how close the radius comes to the fixed-N one.
tests/test_sequential.py computes the wrong-certificate probability of `decide_single`
exactly (dynamic programming over the looks) at threshold pA, with the engine's default
levels, all-correct share, aligned looks and stopping rule, and with controls (no union
bound; every look at the whole Clopper-Pearson share) that fail.

The label never enters: `certify_sequential` and `make_certify_one` do not look at it (the
runner compares the prediction with the label afterwards), so the stopping rule cannot
favour correct predictions, unlike DMAE's early abstain.

Cascade (`certify_cascade_sequential`): the sound cascade of `cascade.py` with each stage
sequential. Stage j < K - 1 spends alpha / (2 K) on its lower bound and alpha / (2 K) on the
upper bounds of all m classes (each at alpha / (2 K m)), stage K - 1 spends alpha / K on its
lower bound, and each is spent over the looks (look t gets the share (n_t / n_T)^power,
normalised; power 0 by default: an even split): every bound is a time-uniform confidence
sequence by the union bound over looks, so the proof of the sound cascade (module
`cascade`) applies verbatim with "bound at the stopping look" in place of "bound": the event
that all bounds of all stages hold at every look has probability >= 1 - alpha, and on it
every returned certificate is correct, whatever the rules below decide (they read only the
samples, and a stage's decision to continue only ever makes a later radius smaller: its
off-class term enters every later certificate). A stage (`run_stage`) looks until its
outcome is settled:
    predict   once L(c_hat) >= p0 and the grid level of its radius (with the earlier
              stages' off-class terms) is the best reachable by the cap;
    continue  as soon as U(c_hat) < p0 (this stage will not predict c_hat, exactly the
              fixed cascade's rule), unless more samples can still raise the grid level of
              the off-class term sigma_j (Phi^-1(p0) - Phi^-1(max_{c != y} U_j(c))) a later
              prediction y would get;
    ambiguous once c_hat straddles p0 and can neither be predicted nor fall below p0 by
              the cap (the last stage: abstain once U(c_hat) < p0);
and always at the cap. "Reachable" projects the stop-level bounds (`Schedule.stop_level`)
to the cap. Continuing at U(c_hat) < p0 rather than when every class is below p0 (the
engine's earlier rule, which sampled to the cap when the selection picked the wrong class
of a stage with another class above p0: 27,616 passes per image on the tests' case, 17.5%
at the cap, now ~1,500) also keeps the certificates a later stage can give: if the class
above p0 here is the one a later stage predicts, its off-class term here is positive and
the cascade certifies it. The alternative, stopping as ambiguous when another class is
clearly above p0, would save that later stage's few hundred samples on images it then
cannot certify; it is not taken.

What it optimises: certified accuracy at the radii of interest for the fewest samples. It
stops as soon as an image's radius clears the highest grid radius it can reach, so radii
sit just above grid points and the average certified radius (ACR) is lower than the fixed
protocol's; pass finer `radii` when ACR matters (more samples).

Where the samples go, and why the bound is a union of Clopper-Pearson looks. Against an
oracle that knows pA and runs Wald's SPRT (n KL(pA || q) = log(1 / alpha) to certify the
threshold q), the bound itself costs little: a Clopper-Pearson look at level alpha_t uses
the exact Binomial tail, ~z^2 v / delta^2 samples for pA = q + delta (z^2 = 15 at the last
look's alpha / 19, 17 at a look of 10,000 samples), beside Wald's 2 log(1 / alpha) = 13.8.
Confidence sequences valid at every n through Ville's inequality (betting, Waudby-Smith and
Ramdas; mixtures and stitching, Howard et al.) stop where a nonnegative martingale reaches
1 / alpha: at best (the alternative known) Wald's 13.8, in practice that plus twice the
mixture's regret (the log of its number of components, or ~(1/2) log n, nats), no better
than the union over ~40 exact looks at alpha = 0.001. The cost above the oracle is in the
stopping rule: an image whose pA sits just below a grid threshold, or just above it but
short of what the cap can certify, must sample until it is sure the next radius is out of
reach, which the oracle never does. Hence the futility rule on the cap's predicted vote
fraction (U_t above): it gives up on a radius once its conditional power is below s_t,
where the plain upper bound of the votes so far stays wide and chases it to the cap. The
level rises with n because the price of chasing does: after a few hundred samples the
estimate is noisy and settling it costs about as many samples again, so a flat level gave
up on images well above a threshold (most of the accuracy lost on the benchmark's
mixtures); after thousands, a borderline image costs up to the cap for a small chance.
On benchmarks/certify_compute.py's mixtures the ramp to 0.2 spends 1.23-1.44x the oracle
floor at <= 0.28 points lost, where the flat 0.09 spent 1.28-1.65x at <= 0.42.

Log rows use the same columns as the fixed protocol (`certify.LOG_COLUMNS`,
`cascade.CASCADE_COLUMNS`) and then SEQUENTIAL_COLUMNS (`looks`, which marks the log as
sequential): `n` is the number of estimation samples drawn, `n_drawn` / `num_samples` all
noisy forward passes, `pA_lower` the bound at the stopping look. It cannot be recomputed
from nA and n at another alpha: the engine stopped where the answer at ITS alpha was
settled (optional stopping), and `report --alpha` refuses the log.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from scipy import special, stats

from dmae_jax.smoothing import cascade as cascade_lib
from dmae_jax.smoothing import sound
from dmae_jax.smoothing.certify import ABSTAIN, margin_for
from dmae_jax.smoothing.logs import format_sparse_counts
from dmae_jax.smoothing.multinomial import cp_lower, cp_upper
from dmae_jax.smoothing.sampling import (
    LogitsFn,
    Sampler,
    check_images,
    fold_in_keys,
    key_array,
    sampler_for,
    single_key,
    split_keys,
)
from dmae_jax.smoothing.settings import Settings, check_alpha, check_positive_int

# The report's grid: 0, 0.25, ..., 3.0.
DEFAULT_RADII = tuple(0.25 * i for i in range(13))
DEFAULT_N_FIRST = 64
# Single sigma: dense looks (x1.25) with alpha_t proportional to sqrt(n_t): the simulated
# digits benchmark (benchmarks/certify_compute.py) spends ~12% fewer samples than x2 with an
# even split, at the same certified accuracy.
DEFAULT_GROWTH = 1.25
# Cascade: looks x1.5 with an even split, and a stage gives up on an outcome once it is out
# of reach with 90% confidence: on the boundary cases of tests/test_sequential.py (a stage
# whose top class sits within 0.01 of p0) this stops 27-48% earlier than x2 at 95%, with
# the fixed cascade's certified accuracy, and costs less than the fixed cascade.
DEFAULT_CASCADE_GROWTH = 1.5
DEFAULT_CASCADE_STOP_LEVEL = 0.1
# Futility (no effect on soundness): an image gives up on the next radius once its
# conditional power, the chance that the cap's bound certifies it given the votes so far
# (`predictive_upper`), is below stop_level min(1, n / stop_ramp): 20% from 5,000 estimation
# samples on, less before (0.26% at the first look of 64). Early looks are cheap to continue
# and their estimate is noisy: a flat level there gave up on images well above a threshold
# (CIFAR-10, sigma 1: most of the 0.40 points lost at r = 0 came from pA 5-12 standard
# errors of the fixed protocol above 1/2). Late looks are where a borderline image spends
# tens of thousands of samples for a small chance. On benchmarks/certify_compute.py's
# 1,000-image mixtures (4 runs per image) the ramp to 0.2 spends 1.23-1.44x the oracle floor
# at <= 0.28 +- 0.09 points of certified accuracy lost; a flat 0.09 (no ramp) spent
# 1.28-1.65x at <= 0.42 +- 0.13, a flat 0.1 1.25-1.60x at 0.50 +- 0.13, the ramp to 0.15
# 1.25-1.50x at <= 0.28 +- 0.10, to 0.25 1.18-1.33x at up to 0.52 +- 0.14.
DEFAULT_STOP_LEVEL = 0.2
DEFAULT_STOP_RAMP = 5000
DEFAULT_POWER = 0.5
# Share of alpha spent on the all-correct confidence sequence alpha_A^(1/n) (valid at every
# n at once, no union over looks; `all_correct_lower`): an image the classifier never gets
# wrong then stops at log(1 / alpha_A) / -log Phi(r / sigma) samples, 1.10x the Wald
# minimum log(1 / alpha) / -log Phi(r / sigma) at alpha = 0.001, where a union over the ~40
# looks costs 1.55x; the Clopper-Pearson sequence keeps the rest.
DEFAULT_ALL_CORRECT = 0.5
# Sequential log columns after the fixed protocol's (and the task's "image"): `looks`, the
# looks made (over all stages for the cascade). It marks the log as sequential: its bounds
# were computed at per-look levels and the engine stopped once its answer at THIS alpha was
# settled, so recomputing them from nA and n at another alpha would be optional stopping
# (`certify.recompute_at_alpha` and `report --alpha` refuse such a log).
SEQUENTIAL_COLUMNS = ("looks",)
# The cascade's rows also hold the deciding stage's lower bound on its top class's
# probability at the stopping look.
CASCADE_EXTRA_COLUMNS = ("pA_lower", "looks")


def look_schedule(n_first: int, n_max: int, growth: float) -> tuple[int, ...]:
    """Cumulative sample counts at which to look: n_first, x growth (rounded up), ..., n_max."""
    check_positive_int("n_first", n_first)
    check_positive_int("n_max", n_max)
    if n_first > n_max:
        raise ValueError(f"n_first must be <= n_max={n_max}, got {n_first}")
    if not (isinstance(growth, int | float) and math.isfinite(growth) and growth > 1.0):
        raise ValueError(f"growth must be a number > 1, got {growth!r}")
    looks = [n_first]
    while looks[-1] < n_max:
        looks.append(min(n_max, max(looks[-1] + 1, math.ceil(looks[-1] * growth))))
    return tuple(looks)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """When the sequential engine looks and how it spends alpha; checked when built.

    radii: the radii of interest (it stops once more samples cannot certify another one);
    n_first: estimation samples at the first look; growth: the ratio between looks;
    stop_level: the futility level, which only decides when to stop (single sigma: give up
    on a radius once the chance that the cap certifies it, given the votes so far, is
    below stop_level min(1, n / stop_ramp); cascade: the level of the upper bounds
    projected to the cap); stop_ramp: the estimation samples over which the single-sigma
    futility level rises linearly to stop_level (0: flat; the cascade does not ramp);
    power: alpha_t proportional to n_t^power (0: an even split over the looks);
    all_correct: the share of alpha spent on the all-correct confidence sequence (0: none).
    """

    radii: tuple[float, ...] = DEFAULT_RADII
    n_first: int = DEFAULT_N_FIRST
    growth: float = DEFAULT_GROWTH
    stop_level: float = DEFAULT_STOP_LEVEL
    stop_ramp: int = DEFAULT_STOP_RAMP
    power: float = DEFAULT_POWER
    all_correct: float = DEFAULT_ALL_CORRECT

    def __post_init__(self) -> None:
        radii = tuple(float(r) for r in self.radii)
        if not radii or any(not math.isfinite(r) or r < 0 for r in radii):
            raise ValueError(f"radii must be finite numbers >= 0, got {list(radii)}")
        object.__setattr__(self, "radii", tuple(sorted(set(radii))))
        check_positive_int("n_first", self.n_first)
        look_schedule(self.n_first, self.n_first, self.growth)
        check_alpha(self.stop_level, "stop_level")
        if not (isinstance(self.stop_ramp, int) and self.stop_ramp >= 0):
            raise ValueError(f"stop_ramp must be an integer >= 0 (estimation samples), got "
                             f"{self.stop_ramp!r}")
        if not (isinstance(self.power, int | float) and math.isfinite(self.power)
                and self.power >= 0):
            raise ValueError(f"power must be a finite number >= 0, got {self.power!r}")
        if not (isinstance(self.all_correct, int | float) and 0 <= self.all_correct < 1):
            raise ValueError(f"all_correct must be a share of alpha in [0, 1), got "
                             f"{self.all_correct!r}")


CASCADE_SCHEDULE = Schedule(growth=DEFAULT_CASCADE_GROWTH,
                            stop_level=DEFAULT_CASCADE_STOP_LEVEL, stop_ramp=0, power=0.0)


def all_correct_lower(nA: int, n: int, level: float) -> float:
    """The all-correct confidence sequence: level^(1/n) while all n votes are c_hat, else 0.

    Valid at every n at once (module docstring): P(some n has nA = n and level^(1/n) > pA)
    <= level, without a union over looks.
    """
    return level ** (1.0 / n) if level > 0 and nA == n else 0.0


@functools.lru_cache(maxsize=64)
def aligned_schedule(
    n_first: int, n_max: int, growth: float, *, sigma: float, radii: tuple[float, ...],
    alpha: float, power: float = 0.0, all_correct: float = 0.0,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(looks, per-look Clopper-Pearson levels alpha_t): geometric looks plus aligned ones.

    The Clopper-Pearson sequence spends alpha (1 - all_correct) over the geometric looks:
    alpha_t proportional to (n_t / n_max)^power, summing to it; power = 0 is the even
    split, power > 0 gives the late looks (where an image whose pA sits just above a grid
    threshold needs its bound tight) more and the early ones less. With all_correct > 0
    there is one more look per radius of interest, at the fewest samples with which votes
    all for c_hat certify it through the all-correct sequence at level alpha all_correct,
    n_r = ceil(log(alpha all_correct) / log(Phi(r / sigma))), and no Clopper-Pearson level
    of its own (level 0): an image the classifier never gets wrong stops exactly when it
    can, and the extra looks cost the union bound nothing. Looks and levels depend only on
    the arguments, never on the samples, as the union bound needs.
    """
    if not (isinstance(power, int | float) and math.isfinite(power) and power >= 0):
        raise ValueError(f"power must be a finite number >= 0, got {power!r}")
    geometric = look_schedule(n_first, n_max, growth)
    weights = {n: (n / n_max) ** power for n in geometric}
    total = sum(weights.values())
    levels = {n: alpha * (1 - all_correct) * w / total for n, w in weights.items()}
    if all_correct > 0:
        for r in radii:
            target = stats.norm.cdf(r / sigma)
            if 0.5 < target < 1.0:
                n_r = math.ceil(math.log(alpha * all_correct) / math.log(target))
                if n_first < n_r < n_max:
                    levels.setdefault(n_r, 0.0)
    looks = tuple(sorted(levels))
    return looks, tuple(levels[n] for n in looks)


def predictive_upper(nA: int, n: int, n_max: int, level: float) -> float:
    """Upper bound at `level` on the fraction of votes for c_hat the cap n_max will show.

    Given nA of n votes, the cap's fraction nA_cap / n_max = (n / n_max) p_hat + (1 - n /
    n_max) (mean of the n_max - n votes still to come) spreads around p_hat with variance
    v (1 / n - 1 / n_max) (v = pA (1 - pA), pA uncertain with variance v / n): the spread
    of n_eff = n n_max / (n_max - n) votes, not of n. So this is the Clopper-Pearson upper
    bound of nA n_eff / n in n_eff (a Beta quantile takes fractional counts): the
    conditional-power ("stochastic curtailment") bound of group-sequential trials, which
    narrows to p_hat as n nears the cap, where the plain bound of nA in n stays wide and
    keeps an image sampling for a radius the cap can no longer certify. It only decides
    when to stop.
    """
    if nA >= n:
        return 1.0
    if n >= n_max:
        return nA / n
    scale = n_max / (n_max - n)
    return float(special.betainccinv(nA * scale + 1, (n - nA) * scale, level))


def grid_level(radius: float, radii: Sequence[float]) -> int:
    """How many of the (sorted) radii of interest `radius` certifies (radius >= r); 0 if none."""
    return int(np.searchsorted(np.asarray(radii), radius, side="right"))


def _best_lower(upper: float, n_max: int, level: float) -> float:
    """The lower bound the cap would give if the probability were `upper` (optimistic)."""
    return cp_lower(min(n_max, math.ceil(upper * n_max)), n_max, level)


def _phi_inv(p: float) -> float:
    return float(special.ndtri(p))  # stats.norm.ppf's bits, without its overhead


@dataclasses.dataclass(frozen=True)
class SequentialResult:
    """One image's sequential certificate and what it cost."""

    prediction: int  # c_hat, or ABSTAIN (-1)
    radius: float  # sigma * Phi^-1(pA_lower), 0.0 on abstain
    pA_lower: float  # time-uniform lower bound at the stopping look
    c_hat: int
    counts_selection: np.ndarray  # [K] votes of the n0 selection samples
    counts_estimation: np.ndarray  # [K] votes of all estimation samples drawn
    n: int  # estimation samples drawn
    n_drawn: int  # n0 + n noisy forward passes
    looks: int  # looks made (1 .. T)


def decide_single(
    nA: int, n: int, *, sigma: float, level: float, radii: Sequence[float], n_max: int,
    stop_level: float | None = None, stop_ramp: int = 0, cap_level: float | None = None,
    all_correct: float = 0.0, margin: sound.Margin = sound.EXACT,
) -> tuple[bool, float]:
    """(stop, pA_lower) after a look with nA of n votes for c_hat (see the module docstring).

    level: this look's Clopper-Pearson alpha_t (0: none at this look); all_correct: the
    level of the all-correct sequence (0: none); stop_level: level of the predictive upper
    bound that decides when to stop (`predictive_upper`; default `level`), times
    min(1, n / stop_ramp) when stop_ramp > 0; cap_level: the Clopper-Pearson level of the
    look at the cap (default `level`); margin: moves the bound in its safe direction
    (sound noise).
    """
    lower = margin.lower(max(cp_lower(nA, n, level) if level > 0 else 0.0,
                             all_correct_lower(nA, n, all_correct)))
    if n >= n_max:
        return True, lower
    now = grid_level(margin.radius(sigma * _phi_inv(lower)), radii) if lower >= 0.5 else 0
    futility = level if stop_level is None else stop_level
    if stop_ramp > 0:
        futility *= min(1.0, n / stop_ramp)
    upper = predictive_upper(nA, n, n_max, futility)
    # At the cap: the Clopper-Pearson bound if the cap's vote fraction were `upper`, or the
    # all-correct one if every vote so far was c_hat and every later one is.
    reach_all_correct = all_correct_lower(n_max, n_max, all_correct) if nA == n else 0.0
    best = margin.lower(max(_best_lower(upper, n_max, level if cap_level is None else cap_level),
                            reach_all_correct))
    reachable = grid_level(margin.radius(sigma * _phi_inv(best)), radii) if best >= 0.5 else 0
    return now >= reachable, lower


def sequential_image(settings: Settings, logits_fn: LogitsFn, image: np.ndarray,
                     key: jax.Array, schedule: Schedule,
                     sampler: Sampler | None = None) -> SequentialResult:
    """Sequential CERTIFY of a checked image [H, W, C] with one key (see certify_sequential)."""
    sigma = settings.one_sigma("certify_sequential")
    n_max = settings.n
    sampler = sampler_for(settings) if sampler is None else sampler
    margin = margin_for(settings, sigma, image)
    looks, levels = aligned_schedule(schedule.n_first, n_max, schedule.growth, sigma=sigma,
                                     radii=schedule.radii, alpha=settings.alpha,
                                     power=schedule.power, all_correct=schedule.all_correct)
    k_sel, k_est = split_keys(key)
    counts_selection = np.asarray(sampler(logits_fn, image, k_sel, settings.n0, sigma),
                                  np.int64)
    c_hat = int(np.argmax(counts_selection))  # lowest class index on ties
    counts = np.zeros(settings.num_classes, np.int64)
    drawn = 0
    look_keys = fold_in_keys(k_est, len(looks))
    for t, n_t in enumerate(looks):
        counts += np.asarray(sampler(logits_fn, image, look_keys[t], n_t - drawn, sigma),
                             np.int64)
        drawn = n_t
        stop, lower = decide_single(int(counts[c_hat]), drawn, sigma=sigma, level=levels[t],
                                    radii=schedule.radii, n_max=n_max,
                                    stop_level=schedule.stop_level,
                                    stop_ramp=schedule.stop_ramp, cap_level=levels[-1],
                                    all_correct=settings.alpha * schedule.all_correct,
                                    margin=margin)
        if stop:
            break
    radius = margin.radius(float(sigma * _phi_inv(lower))) if lower >= 0.5 else -1.0
    if radius >= 0.0:
        prediction = c_hat
    else:
        prediction, radius = ABSTAIN, 0.0
    return SequentialResult(
        prediction=prediction, radius=radius, pA_lower=lower, c_hat=c_hat,
        counts_selection=counts_selection, counts_estimation=counts, n=drawn,
        n_drawn=settings.n0 + drawn, looks=t + 1)


def _check_sequential(settings: Settings, schedule: Schedule) -> None:
    if schedule.n_first > settings.n:
        raise ValueError(f"schedule.n_first must be <= the cap n={settings.n}, got "
                         f"{schedule.n_first}")


def certify_sequential(logits_fn: LogitsFn, x: Any, settings: Settings, *, rng: jax.Array,
                       schedule: Schedule = Schedule(),
                       sampler: Sampler | None = None) -> SequentialResult:
    """Sequential CERTIFY of one image x [H, W, C] in [0, 1]: (class, radius) with error <= alpha.

    settings.n caps the estimation samples. Selection on n0 samples drawn with
    jax.random.split(rng)[0]; look t draws its new estimation samples with
    fold_in(split(rng)[1], t). `sampler` (logits_fn, image, key, num, sigma) -> votes [K]
    replaces the engine's (tests). See the module docstring for the proof.
    """
    _check_sequential(settings, schedule)
    return sequential_image(settings, logits_fn, check_images("x", x, rank=3),
                            single_key(rng), schedule, sampler)


def make_certify_one(logits_fn: LogitsFn, settings: Settings, *, rng: jax.Array,
                     schedule: Schedule = Schedule()) -> Callable[[int, Any, Any], dict[str, Any]]:
    """certify_one(idx, image, label) -> log row (LOG_COLUMNS + SEQUENTIAL_COLUMNS) for the runner.

    The label is accepted for the runner's interface and never read. Image idx uses the key
    fold_in(rng, idx). Arguments are checked here once, not per image.
    """
    _check_sequential(settings, schedule)
    sigma = settings.one_sigma("certify_sequential")
    key = key_array(rng)

    def certify_one(idx: int, image: Any, label: Any) -> dict[str, Any]:
        del label  # label-free: the prediction and the stopping time never depend on it
        result = sequential_image(settings, logits_fn, check_images("image", image, rank=3),
                                  jax.random.fold_in(key, idx), schedule)
        return {
            "predict": result.prediction,
            "radius": result.radius,
            "sigma": float(sigma),
            "cAHat": result.c_hat,
            "nA": int(result.counts_estimation[result.c_hat]),
            "n": result.n,
            "pA_lower": result.pA_lower,
            "n_drawn": result.n_drawn,
            "abstained_early": 0,
            "counts_selection": format_sparse_counts(result.counts_selection),
            "counts_estimation": format_sparse_counts(result.counts_estimation),
            "looks": result.looks,
        }

    return certify_one


# ---------------------------------------------------------------------------------------------
# Cascade.
# ---------------------------------------------------------------------------------------------


def look_shares(looks: Sequence[int], power: float) -> np.ndarray:
    """[T] the share of a level each look spends: (n_t / n_T)^power, normalised to sum to 1."""
    weights = (np.asarray(looks, np.float64) / looks[-1]) ** power
    return weights / weights.sum()


def _offclass_radius(sigma: float, z0: float, bound: float) -> float:
    return sigma * (z0 - _phi_inv(bound))


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    """What one sequential stage of the cascade decided."""

    decision: str  # "predict", "continue", "ambiguous", "abstain"
    c_hat: int
    pA_lower: float
    uppers: np.ndarray | None  # [K] time-uniform upper bounds of every class (stages < K - 1)
    counts: np.ndarray  # [K] estimation votes
    n: int  # estimation samples drawn
    looks: int  # looks made


def _projected_upper(count: int, drawn: int, n_max: int, stop_level: float,
                     level: float) -> float:
    """The upper bound the cap would give if the probability were its stop-level lower bound."""
    return cp_upper(min(n_max, math.floor(cp_lower(count, drawn, stop_level) * n_max)), n_max,
                    level)


def run_stage(
    draw: Callable[[int, int], np.ndarray],
    c_hat: int,
    *,
    sigma: float,
    stage: int,
    num_stages: int,
    alpha: float,
    p0: float,
    r_neg: float,
    radii: Sequence[float],
    looks: Sequence[int],
    num_classes: int,
    stop_level: float = DEFAULT_CASCADE_STOP_LEVEL,
    power: float = 0.0,
    all_correct: float = 0.0,
    margin: sound.Margin = sound.EXACT,
) -> StageOutcome:
    """Sample one cascade stage look by look until its outcome is settled.

    draw(t, num) returns the votes [K] of num new estimation samples for look t. r_neg is
    the max over earlier (abstaining) stages of sigma_j (Phi^-1(pB_upper_j(c_hat)) -
    Phi^-1(p0)) (cascade.R_NEG_NONE if none): the radius a prediction here would get is
    min(sigma (Phi^-1(pA_lower) - Phi^-1(p0)), -r_neg). The rules (module docstring):
    predict once the radius's grid level is the best reachable; continue as soon as
    U(c_hat) < p0, unless more samples can still raise the grid level of a later
    prediction's off-class term; stop as ambiguous (abstain, last stage) once c_hat can
    neither be predicted nor fall below p0 by the cap. "Reachable" projects the stop-level
    bounds to the cap; the projections only decide when to stop.
    """
    z0 = _phi_inv(p0)
    n_max = looks[-1]
    stage_lower, stage_family = cascade_lib.sound_levels(stage, num_stages, alpha)
    # c_hat's lower bound: the all-correct sequence at a share of the stage's level, the
    # Clopper-Pearson one at the rest, spread over the looks.
    level_all_correct = stage_lower * all_correct
    stage_cp = stage_lower - level_all_correct
    shares = look_shares(looks, power)
    last = stage == num_stages - 1
    # At the cap: the level of c_hat's lower bound and of each class's upper bound (the last
    # stage bounds only c_hat).
    cap_lower = stage_cp * shares[-1]
    cap_upper = (stage_lower * shares[-1] if last
                 else stage_family * shares[-1] / num_classes)
    counts = np.zeros(num_classes, np.int64)
    drawn = 0
    cap = -r_neg if r_neg != cascade_lib.R_NEG_NONE else math.inf

    def predicted_level(lower: float) -> int:
        if lower < p0:
            return 0
        radius = margin.radius(min(sigma * (_phi_inv(lower) - z0), cap))
        return grid_level(radius, radii) if radius >= 0 else 0

    def offclass_levels(uppers: np.ndarray) -> np.ndarray:
        """[K] grid level of the off-class term a later prediction of class y would get."""
        first = int(np.argmax(uppers))
        second = float(np.delete(uppers, first).max())
        bound = np.where(np.arange(num_classes) == first, second, uppers[first])
        terms = [margin.radius(sigma * (z0 - _phi_inv(float(u)))) for u in bound]
        return np.asarray([grid_level(r, radii) if r >= 0 else 0 for r in terms])

    for t, n_t in enumerate(looks):
        counts += np.asarray(draw(t, n_t - drawn), np.int64)
        drawn = n_t
        nA = int(counts[c_hat])
        level_lower, level_family = stage_cp * shares[t], stage_family * shares[t]
        lower = margin.lower(max(cp_lower(nA, drawn, level_lower),
                                 all_correct_lower(nA, drawn, level_all_correct)))
        uppers = None if last else margin.uppers(
            cascade_lib.class_upper_bounds(counts, level_family))
        # The last stage's upper bound on c_hat only decides "abstain": any valid level.
        upper = (margin.upper(cp_upper(nA, drawn, stage_lower * shares[t])) if last
                 else float(uppers[c_hat]))
        at_cap = drawn >= n_max

        outcome = functools.partial(StageOutcome, c_hat=c_hat, pA_lower=lower, uppers=uppers,
                                    counts=counts.copy(), n=drawn, looks=t + 1)

        reach_all_correct = (all_correct_lower(n_max, n_max, level_all_correct)
                             if nA == drawn else 0.0)
        best_predict = predicted_level(margin.lower(max(
            _best_lower(cp_upper(nA, drawn, stop_level), n_max, cap_lower), reach_all_correct)))
        if lower >= p0:
            if at_cap or predicted_level(lower) >= best_predict:
                return outcome("predict")
            continue
        if upper < p0:  # c_hat is below p0: this stage does not predict
            if last:
                return outcome("abstain")
            optimistic = margin.uppers(np.asarray(
                [_projected_upper(int(c), drawn, n_max, stop_level, cap_upper)
                 for c in counts]))
            if at_cap or (offclass_levels(uppers) >= offclass_levels(optimistic)).all():
                return outcome("continue")
            continue
        # c_hat straddles p0: give up once it can neither be predicted nor fall below p0.
        can_fall = margin.upper(
            _projected_upper(nA, drawn, n_max, stop_level, cap_upper)) < p0
        if at_cap or (best_predict == 0 and not can_fall):
            return outcome("ambiguous")
    raise AssertionError("unreachable: the last look is at the cap")


def cascade_sequential_image(settings: Settings, logits_fns: Sequence[LogitsFn],
                             image: np.ndarray, key: jax.Array, *, p0: float,
                             schedule: Schedule,
                             sampler: Sampler | None = None) -> cascade_lib.CascadeResult:
    """The sequential cascade on a checked image with one key (see certify_cascade_sequential)."""
    sampler = sampler_for(settings) if sampler is None else sampler
    sigmas = settings.sigmas
    looks = look_schedule(schedule.n_first, settings.n, schedule.growth)
    order = cascade_lib.processing_order(sigmas)
    stage_keys = split_keys(key, len(order))
    z0 = _phi_inv(p0)
    abstained: list[tuple[float, np.ndarray]] = []  # (sigma_j, uppers_j)
    visited: list[np.ndarray] = []
    drawn = looks_made = 0
    for stage, i in enumerate(order):
        sigma = sigmas[i]
        margin = margin_for(settings, sigma, image)
        key_select, key_estimate = split_keys(stage_keys[stage])
        look_keys = fold_in_keys(key_estimate, len(looks))
        c_hat = int(np.argmax(cascade_lib.sample_stage(sampler, settings, logits_fns[i], image,
                                                       settings.n0, key_select, sigma)))
        r_neg = earlier_stages_term(abstained, c_hat, z0)

        def draw(t, num, i=i, look_keys=look_keys, sigma=sigma):
            return cascade_lib.sample_stage(sampler, settings, logits_fns[i], image, num,
                                            look_keys[t], sigma)

        outcome = run_stage(draw, c_hat, sigma=sigma, stage=stage, num_stages=len(order),
                            alpha=settings.alpha, p0=p0, r_neg=r_neg, radii=schedule.radii,
                            looks=looks, num_classes=settings.num_classes,
                            stop_level=schedule.stop_level, power=schedule.power,
                            all_correct=schedule.all_correct, margin=margin)
        visited.append(outcome.counts)
        drawn += settings.n0 + outcome.n
        looks_made += outcome.looks
        if outcome.decision == "predict":
            radius = sigma * (_phi_inv(outcome.pA_lower) - z0)
            if abstained:
                radius = min(radius, -r_neg)
            radius = margin.radius(radius)
            prediction = c_hat if radius >= 0.0 else ABSTAIN
            radius = max(radius, 0.0) if prediction >= 0 else 0.0
            return _cascade_result(prediction, radius, stage, sigma, r_neg, outcome, visited,
                                   drawn, looks_made)
        if outcome.decision in ("ambiguous", "abstain"):
            prediction = cascade_lib.AMBIGUOUS if outcome.decision == "ambiguous" else ABSTAIN
            return _cascade_result(prediction, 0.0, stage, sigma, cascade_lib.R_NEG_NONE,
                                   outcome, visited, drawn, looks_made)
        abstained.append((sigma, outcome.uppers))
    raise AssertionError("unreachable: the last stage never continues")


def earlier_stages_term(abstained: Sequence[tuple[float, np.ndarray]], y: int,
                        z0: float) -> float:
    """r_neg: max over the earlier stages j of sigma_j (Phi^-1(max_{c != y} U_j(c)) - z0).

    A prediction y at a later stage is certified up to -r_neg at most: within it every
    earlier stage keeps every class other than y below p0. cascade.R_NEG_NONE if none.
    """
    if not abstained:
        return cascade_lib.R_NEG_NONE
    return max(sigma_j * (_phi_inv(float(np.delete(uppers_j, y).max())) - z0)
               for sigma_j, uppers_j in abstained)


def _cascade_result(prediction, radius, stage, sigma, r_neg, outcome, visited, drawn, looks):
    return cascade_lib.CascadeResult(
        prediction=int(prediction), radius=float(radius), stage=stage, sigma=sigma,
        r_neg=float(r_neg), pred_uc=int(prediction), pA_lower=outcome.pA_lower,
        counts=tuple(visited), num_samples=drawn, looks=looks)


def _check_cascade_sequential(settings, logits_fns, p0, schedule) -> None:
    cascade_lib.check_cascade(settings, logits_fns, p0)
    _check_sequential(settings, schedule)


def certify_cascade_sequential(
    logits_fns: Sequence[LogitsFn], x: Any, settings: Settings, *, rng: jax.Array,
    p0: float = 0.5, schedule: Schedule = CASCADE_SCHEDULE, sampler: Sampler | None = None,
) -> cascade_lib.CascadeResult:
    """The sound multi-scale cascade with every stage sequential (module docstring: proof).

    Stages run from the largest sigma down; stage j draws with jax.random.split(rng, K)[j],
    split again into its selection key and the estimation key whose fold_in(., t) feeds
    look t. settings.n caps each stage's estimation samples.
    """
    _check_cascade_sequential(settings, logits_fns, p0, schedule)
    return cascade_sequential_image(settings, logits_fns, check_images("x", x, rank=3),
                                    single_key(rng), p0=p0, schedule=schedule, sampler=sampler)


def make_cascade_certify_one(
    logits_fns: Sequence[LogitsFn], settings: Settings, *, rng: jax.Array, p0: float = 0.5,
    schedule: Schedule = CASCADE_SCHEDULE, sampler: Sampler | None = None,
) -> Callable[[int, Any, Any], dict[str, Any]]:
    """certify_one(idx, image, label) -> cascade log row, label-free.

    The row holds cascade.CASCADE_COLUMNS and then CASCADE_EXTRA_COLUMNS (pA_lower: the
    deciding stage's bound at its stopping look, at that stage's per-look level; looks:
    the looks made over all stages, which marks the row as sequential).

    The certificate is computed without the label; the label is read afterwards only to
    score the row's corr_uc (int(pred_uc == label), as the runner scores `correct`). pred_uc
    is the prediction itself (no clean-classifier fallback).
    """
    _check_cascade_sequential(settings, logits_fns, p0, schedule)
    key = key_array(rng)

    def certify_one(idx: int, image: Any, label: Any) -> dict[str, Any]:
        result = cascade_sequential_image(
            settings, logits_fns, check_images("image", image, rank=3),
            jax.random.fold_in(key, idx), p0=p0, schedule=schedule, sampler=sampler)
        return {
            "predict": result.prediction,
            "radius": result.radius,
            "r_neg": result.r_neg,
            "pred_uc": result.pred_uc,
            "corr_uc": int(result.pred_uc == int(label)),
            "stage": result.stage,
            "sigma": result.sigma,
            "num_samples": result.num_samples,
            "pA_lower": result.pA_lower,
            "looks": result.looks,
        }

    return certify_one
