"""Sound randomized smoothing in floating point (Voráček & Hein, ICLR 2023), noise="sound".

Why the default is not sound. Float32 noise takes finitely many values (jax.random.normal
maps 23 random mantissa bits through erf_inv) and x + sigma * n is rounded differently for
different x. A base classifier can recognise the values the generator produces at x and
vote differently everywhere else: the samples drawn at x then estimate a probability that
the smoothed classifier g(x') = P(f(x' + sigma n) = c) does not have at a point x' close to
x, and Cohen et al.'s certificate, a statement about the real-valued Gaussian, is wrong
(tests/test_smoothing.py builds such a classifier: certified with radius 3.2 at x = 0, the
other class at distance 2^-10).

The sound mode, as Voráček & Hein do it:
  * the classifier that is smoothed is h = f o Q, where Q rounds every pixel to the grid
    k / L (L = `levels`, 255 for 8-bit images): g(x') = P(h(x' + eps) = c), eps ~ N(0, s^2 I)
    with s = sigma (real numbers, no floating point in the definition);
  * at a grid point x = k / L, Q(x + eps) = (k + round(L eps)) / L exactly, and round(L eps)
    has independent coordinates with the law of the ROUNDED Gaussian,
        P(z) = Phi((z + 1/2) / (sigma L)) - Phi((z - 1/2) / (sigma L)),  z integer;
    so h(x + eps) is sampled exactly by drawing z from that law and adding it to k in
    integer arithmetic (int32, exact); the classifier sees (k + z) / L, a deterministic
    function of the integer vector k + z;
  * z is drawn from 64 random bits U per coordinate: z = z_min + #{j : T_j <= U} with
    integer thresholds T_j = nint(2^64 Phi(b_j / (sigma L))) at the cell boundaries
    b_j = z_min + j + 1/2, computed once with mpmath at 30 significant digits.

The radius is derived, not assumed. g is the Gaussian smoothing of the fixed function h, so
Cohen et al.'s Theorem 1 holds for g at every real x': if P(h(x + eps) = c) >= pA_lower >=
1/2, then g(x') = c for |x' - x| < sigma Phi^-1(pA_lower). The discrete law above is only
how g(x) is evaluated at a grid point; the certificate is the continuous one because the
smoothed function is (this is why the rounded Gaussian is used, not the discrete Gaussian
N_Z(0, s^2) of differential privacy, whose likelihood ratio under a shift depends on the
shift's direction and has no closed-form radius).

What remains approximate, and how each bound absorbs it:
  * The thresholds define a distribution P' that differs from the rounded Gaussian P
    (rounding to 2^-64, the tails beyond the first and last threshold). `RoundedGaussian.tv`
    is the exact total variation distance between the two laws of one coordinate (computed
    in mpmath from the integer thresholds, rounded up); for an image of D coordinates
    |P'(event) - P(event)| <= D * tv for every event (TV of a product <= sum of TVs). Every
    lower bound on a probability is lowered by D * tv, every upper bound raised by it.
  * SciPy's Clopper-Pearson quantiles and Phi^-1 are float64 (relative error ~1e-15):
    every probability bound moves a further 2^-40 (~9e-13) in its safe direction and
    every radius is lowered by 2^-40 of its size (at least 2^-40).
  * An input x off the grid is certified through its grid point Q(x): the radius is
    lowered by |x - Q(x)| (the triangle inequality), so an 8-bit image loses ~1e-8 per pixel
    of float32 round-off and nothing else.
Assumption, as Voráček & Hein's: f is a fixed function of its input (the same logits for
the same input whatever the batch it is in); the statistics need nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np

# Significant digits of the threshold and total-variation computations (errors ~1e-30).
_DIGITS = 30
# The float64 error margin of every bound (module docstring).
SAFETY = 2.0**-40


@dataclasses.dataclass(frozen=True)
class RoundedGaussian:
    """The sampler of round(L eps), eps ~ N(0, sigma^2), from 64 random bits per coordinate."""

    z_min: int  # the smallest value drawn
    high: np.ndarray  # [M] uint32: upper 32 bits of the thresholds T_j (non-decreasing)
    low: np.ndarray  # [M] uint32: lower 32 bits
    tv: float  # total variation from the exact rounded Gaussian, per coordinate (rounded up)


@functools.lru_cache(maxsize=16)
def rounded_gaussian(sigma: float, levels: int) -> RoundedGaussian:
    """Thresholds and total-variation bound for noise std sigma on the grid k / levels."""
    with mpmath.workdps(_DIGITS):
        s = mpmath.mpf(float(sigma)) * levels
        half = mpmath.mpf(1) / 2
        scale = mpmath.mpf(2) ** 64

        def cdf(b):  # Phi(b / s), b a boundary in grid units
            return mpmath.ncdf(b / s)

        # The kept boundaries are those whose threshold lies strictly between 0 and 2^64;
        # beyond them every threshold rounds to 0 or 2^64 (Phi is monotone).
        reach = math.ceil(float(s) * 10) + 1
        thresholds, boundaries = [], []
        for z in range(-reach, reach):
            value = int(mpmath.nint(cdf(z + half) * scale))
            if 0 < value < 2**64:
                thresholds.append(value)
                boundaries.append(z)
        if not thresholds:
            raise ValueError(f"sigma * levels = {float(s)} is too small for the sound noise")
        z_min = boundaries[0]
        if boundaries != list(range(z_min, z_min + len(boundaries))):
            raise AssertionError("the kept thresholds are not contiguous")
        # Exact TV between P' (cells from the integer thresholds) and P (the rounded Gaussian).
        edges = [0, *thresholds, 2**64]
        tv = cdf(z_min - half)  # P below the first cell P' can draw
        tv += 1 - cdf(z_min + len(thresholds) + half)  # P above the last one
        for i in range(len(thresholds) + 1):
            z = z_min + i
            p_exact = cdf(z + half) - cdf(z - half)
            tv += abs(mpmath.mpf(edges[i + 1] - edges[i]) / scale - p_exact)
        tv = tv / 2 + len(edges) * mpmath.mpf(10) ** (2 - _DIGITS)  # + the mpmath error
        tv_float = float(tv) * (1 + 1e-12)
    values = np.asarray(thresholds, dtype=object)
    return RoundedGaussian(
        z_min=z_min,
        high=np.asarray([int(v) >> 32 for v in values], np.uint32),
        low=np.asarray([int(v) & 0xFFFFFFFF for v in values], np.uint32),
        tv=tv_float,
    )


def noise(key: jax.Array, shape: tuple[int, ...], high: jax.Array, low: jax.Array,
          z_min: jax.Array) -> jax.Array:
    """int32 noise [shape] drawn from the thresholds (high, low) (jit-friendly).

    z = z_min + #{j : T_j <= U} for U the 64-bit integer of two random uint32 words, by a
    binary search of fixed depth over the sorted thresholds.
    """
    bits = jax.random.bits(key, (*shape, 2), jnp.uint32)
    u_high, u_low = bits[..., 0], bits[..., 1]
    size = high.shape[0]
    below = jnp.zeros(shape, jnp.int32)  # thresholds known to be <= U: [0, below)
    above = jnp.full(shape, size, jnp.int32)  # thresholds known to be > U: [above, size)

    def halve(_, bounds):
        below, above = bounds
        mid = (below + above) // 2
        t_high, t_low = high[jnp.minimum(mid, size - 1)], low[jnp.minimum(mid, size - 1)]
        at_most = (t_high < u_high) | ((t_high == u_high) & (t_low <= u_low))
        open_ = below < above
        return (jnp.where(open_ & at_most, mid + 1, below),
                jnp.where(open_ & ~at_most, mid, above))

    below, _ = jax.lax.fori_loop(0, size.bit_length(), halve, (below, above))
    return below + z_min


def quantise(image: np.ndarray, levels: int) -> tuple[np.ndarray, float]:
    """(grid indices k int32 [H, W, C], |x - k / levels|_2 rounded up) of an image in [0, 1]."""
    k = np.rint(np.asarray(image, np.float64) * levels)
    shift = float(np.sqrt(np.sum((np.asarray(image, np.float64) - k / levels) ** 2)))
    return k.astype(np.int32), (shift * (1 + SAFETY) + 1e-300 if shift else 0.0)


@dataclasses.dataclass(frozen=True)
class Margin:
    """How far every bound of one image and sigma moves in its safe direction.

    `exact` (the float noise) leaves every bound and radius exactly as computed, so the
    default mode's results are the plain formulas bit for bit.
    """

    exact: bool = True
    tv: float = 0.0  # |P'(event) - P(event)| for one noisy sample of the image
    shift: float = 0.0  # |x - Q(x)|_2

    def lower(self, p: float) -> float:
        """A lower bound on a probability, lowered by the sampler's error and the float margin."""
        return p if self.exact else max(0.0, p - self.tv - SAFETY)

    def upper(self, p: float) -> float:
        """An upper bound on a probability, raised likewise."""
        return p if self.exact else min(1.0, p + self.tv + SAFETY)

    def uppers(self, p: np.ndarray) -> np.ndarray:
        """`upper` of every entry of [K] bounds."""
        return p if self.exact else np.minimum(1.0, p + self.tv + SAFETY)

    def radius(self, r: float) -> float:
        """A radius around Q(x) made a radius around x and lowered by the float margin."""
        return r if self.exact else r - SAFETY * max(1.0, abs(r)) - self.shift


EXACT = Margin()


def margin(sigma: float, levels: int, image: np.ndarray) -> Margin:
    """The sound margin of one image [H, W, C] in [0, 1] at one sigma."""
    _, shift = quantise(image, levels)
    return Margin(exact=False, tv=image.size * rounded_gaussian(sigma, levels).tv,
                  shift=shift)
