r"""Noisy forward passes per image: fixed-N CERTIFY against the sequential engine.

  python -m benchmarks.certify_compute --workdir=runs/digits [--real-sigmas=0.25]

After the digits pipeline (`configs/digits.py`, whose fine-tuned classifiers are in
`<workdir>/finetune_<sigma>/export`), certifies the same test images (every second one, as
the pipeline) at each sigma in {0.25, 0.5, 1.0} with

  * the fixed protocol of Cohen et al. at the paper's budget: N0 = 100, N = 100,000,
    alpha = 0.001, i.e. 100,100 forward passes per image;
  * the sequential engine (`dmae_jax.smoothing.sequential`), same N0 and alpha, radii of
    interest = the report's grid (0, 0.25, ..., 3), capped at --n-max estimation samples;

and prints per sigma: mean forward passes per image of both and their ratio, certified
accuracy at every grid radius of both and the largest difference, ACR of both, and the
oracle floor.

How each side is computed. Each image's top class c_hat comes from N0 = 100 real noisy
samples of the real model, and its pA = P(f(x + noise) = c_hat) is estimated from
--n-estimate further real samples (`sample_counts_many`, all images at once). At
N = 100,000 the fixed side is too slow for 2 CPU cores (~15 million forward passes per
sigma), so its vote count is SIMULATED as Binomial(100,000, pA) and certified with the real
Clopper-Pearson code, in expectation (exactly: the sum over images of the Binomial
probability of each outcome). The sequential side is simulated the same way (a Binomial stream
through the real decision code, `sequential.certify_sequential` with an injected sampler),
so both sides see the same pA; at the sigmas of --real-sigmas it is ALSO run for real: the
real JAX sampler on the real model, whose rows are printed as "sequential (real)".
Simulations use 10 seeds per image; the tables average them. One image is 0.68 points.

Oracle floor: for each image, the fewest estimation samples n with which the lower bound
at alpha of the expected count ceil(pA n) certifies the grid radius the fixed protocol
certifies with the expected count pA N (0 for images it does not certify, n0 excluded):
what an engine that knew pA and the answer in advance would need.

Runtime on 2 loaded cores: ~2 minutes per sigma for the pA estimates at --n-estimate=1000
(cached in <workdir>/certify_compute_pA.npz), seconds for the simulations, and ~5 to 15
minutes per sigma in --real-sigmas.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import jax
import numpy as np
from scipy import stats

from dmae_jax.report import DEFAULT_RADII
from dmae_jax.smoothing import sequential
from dmae_jax.smoothing.certify import (
    lower_confidence_bound,
    place_replicated,
    sample_counts_many,
)

N0, N, ALPHA = 100, 100_000, 0.001
SEEDS = 10


def load_images(data_dir: str | None, skip: int):
    """The digits test images the pipeline certifies: every `skip`-th, [M,16,16,3] in [0,1]."""
    from dmae_jax.data import datasets

    source = datasets.load_source("digits", "test", data_dir=data_dir, image_size=16)
    indices = list(range(0, len(source), skip))
    images = np.stack([np.asarray(source[i]["image"], np.float32) / 255.0 for i in indices])
    labels = np.asarray([int(source.labels[i]) for i in indices])
    return images, labels


def load_classifier(path: str):
    """The export's jit-friendly logits function."""
    from dmae_jax.smoothing.tasks import load_classifier as load

    fn, meta = load(path)
    return place_replicated(fn), int(meta["num_classes"])


def estimate(fn, images, sigma, num_classes, n_estimate, batch_size, seed):
    """(c_hat [M], pA [M]): real selection on N0 samples, pA from n_estimate more."""
    key_sel, key_est = jax.random.split(jax.random.key(seed))
    common = dict(sigma=sigma, batch_size=batch_size, num_classes=num_classes)
    selection = sample_counts_many(fn, images, num=N0, rng=key_sel, **common)
    c_hat = selection.argmax(axis=1)
    counts = sample_counts_many(fn, images, num=n_estimate, rng=key_est, **common)
    return c_hat, counts[np.arange(len(images)), c_hat] / n_estimate


def fixed_expected(c_hat, pA, labels, sigma, radii):
    """The fixed protocol's EXPECTED certified accuracy at radii and ACR, nA ~ Binomial(N, pA).

    Exact: the lower bound grows with nA, so image i certifies r iff nA >= the smallest count
    whose bound reaches Phi(r / sigma) (1/2 at r = 0); sum over images of P(nA >= that).
    """
    counts = np.arange(N + 1)
    lower = stats.beta.ppf(ALPHA, np.maximum(counts, 1), N - counts + 1)
    lower[0] = 0.0
    radius = np.where(lower >= 0.5, sigma * stats.norm.ppf(np.maximum(lower, 0.5)), 0.0)
    curve, acr_value = np.zeros(len(radii)), 0.0
    for c, p, label in zip(c_hat, pA, labels, strict=True):
        if c != label:
            continue
        pmf = stats.binom.pmf(counts, N, p)
        certified = lower >= 0.5
        curve += [pmf[certified & (radius >= r)].sum() for r in radii]
        acr_value += float((pmf * np.where(certified, radius, 0.0)).sum())
    return curve / len(pA), acr_value / len(pA)


def sequential_rows(c_hat, pA, labels, sigma, n_max, rng, num_classes, **options):
    """Simulated sequential engine through its real decision code: (correct, radius, passes)."""
    correct, radius, passes = [], [], []
    for c, p, label in zip(c_hat, pA, labels, strict=True):
        probs = np.full(num_classes, (1.0 - p) / (num_classes - 1))
        probs[c] = p

        state = {"selection": True}

        def sampler(fn, images, key, num, probs=probs, state=state, c=int(c)):
            if state["selection"]:  # the selection draw: return the real c_hat
                state["selection"] = False
                votes = np.zeros(num_classes, np.int64)
                votes[c] = num
                return votes
            return rng.multinomial(num, probs)

        result = sequential.certify_sequential(
            None, np.zeros((1, 1, 1), np.float32), sigma=sigma, n0=N0, alpha=ALPHA,
            n_max=n_max, batch_size=1, rng=jax.random.key(0), num_classes=num_classes,
            sampler=sampler, check_args=False, **options)
        correct.append(result.prediction == label)
        radius.append(result.radius)
        passes.append(result.n_drawn)
    return np.asarray(correct), np.asarray(radius), np.asarray(passes)


def real_sequential_rows(fn, images, labels, sigma, n_max, num_classes, batch_size, seed,
                         **options):
    """The real engine on the real model: (correct, radius, passes)."""
    certify_one = sequential.make_certify_one(
        fn, sigma=sigma, n0=N0, alpha=ALPHA, n_max=n_max, batch_size=batch_size,
        rng=jax.random.key(seed), num_classes=num_classes, **options)
    correct, radius, passes = [], [], []
    for idx, (image, label) in enumerate(zip(images, labels, strict=True)):
        row = certify_one(idx, image, None)
        correct.append(row["predict"] == label)
        radius.append(row["radius"])
        passes.append(row["n_drawn"])
    return np.asarray(correct), np.asarray(radius), np.asarray(passes)


def oracle_floor(pA, c_hat, labels, sigma, radii):
    """Fewest estimation samples that certify the fixed protocol's expected grid radius."""
    floors = []
    for p, c, label in zip(pA, c_hat, labels, strict=True):
        lower = lower_confidence_bound(min(N, math.ceil(p * N)), N, ALPHA)
        level = sequential.grid_level(sigma * stats.norm.ppf(lower), radii) if lower >= .5 else 0
        if level == 0 or c != label:
            floors.append(0)
            continue
        target = 0.5 if radii[level - 1] == 0 else stats.norm.cdf(radii[level - 1] / sigma)
        lo, hi = 1, N
        while lo < hi:  # the bound at the expected count grows with n (up to rounding)
            mid = (lo + hi) // 2
            if lower_confidence_bound(min(mid, math.ceil(p * mid)), mid, ALPHA) >= target:
                hi = mid
            else:
                lo = mid + 1
        floors.append(lo)
    return np.asarray(floors)


def accuracy_curve(correct, radius, radii):
    """Certified accuracy at each radius (correct and radius >= r over all images)."""
    return np.asarray([np.mean(correct & (radius >= r)) for r in radii])


def main(argv=None) -> int:
    """Command line; prints the markdown tables."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.certify_compute",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the digits pipeline's workdir")
    parser.add_argument("--sigmas", default="0.25,0.5,1.0")
    parser.add_argument("--real-sigmas", default="0.25",
                        help="sigmas at which the sequential side also runs for real ('' none)")
    parser.add_argument("--n-estimate", type=int, default=1000)
    parser.add_argument("--n-max", type=int, default=sequential.DEFAULT_N_MAX)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=600)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sigmas = [float(s) for s in args.sigmas.split(",") if s]
    real = {float(s) for s in args.real_sigmas.split(",") if s}
    radii = DEFAULT_RADII
    images, labels = load_images(args.data_dir, args.skip)
    cache = os.path.join(args.workdir, "certify_compute_pA.npz")
    cached = dict(np.load(cache)) if os.path.exists(cache) else {}
    print(f"Date {datetime.date.today()}; command: python -m benchmarks.certify_compute "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{len(images)} digits test images; fixed: N0={N0}, N={N:,}, alpha={ALPHA}; "
          f"sequential: N0={N0}, alpha={ALPHA}, n_max={args.n_max:,}, looks x"
          f"{sequential.DEFAULT_GROWTH:g}, alpha_t ~ n_t^{sequential.DEFAULT_POWER:g}, radii of "
          f"interest {radii[0]:g}..{radii[-1]:g} step 0.25; pA from {args.n_estimate} real "
          f"samples; simulated rows averaged over {SEEDS} seeds.\n")
    summary = []
    for sigma in sigmas:
        fn, num_classes = load_classifier(
            os.path.join(args.workdir, f"finetune_{sigma}", "export"))
        name = f"{sigma}_{args.n_estimate}_{args.seed}"
        if f"c_hat_{name}" not in cached:
            start = time.time()
            c_hat, pA = estimate(fn, images, sigma, num_classes, args.n_estimate,
                                 args.batch_size, args.seed)
            cached[f"c_hat_{name}"], cached[f"pA_{name}"] = c_hat, pA
            np.savez(cache, **cached)
            print(f"sigma {sigma}: pA estimated in {time.time() - start:.0f} s")
        c_hat, pA = cached[f"c_hat_{name}"], cached[f"pA_{name}"]
        rows = {}
        rng = np.random.default_rng(args.seed)
        curve, acr_value = fixed_expected(c_hat, pA, labels, sigma, radii)
        rows["fixed (expected)"] = (curve, acr_value, float(N0 + N))
        sims = {"sequential (simulated)": []}
        for _ in range(SEEDS):
            sims["sequential (simulated)"].append(sequential_rows(
                c_hat, pA, labels, sigma, args.n_max, rng, num_classes))
        for label, runs in sims.items():
            rows[label] = (np.mean([accuracy_curve(c, r, radii) for c, r, _ in runs], axis=0),
                           np.mean([np.mean(np.where(c, r, 0.0)) for c, r, _ in runs]),
                           np.mean([p.mean() for _, _, p in runs]))
        if sigma in real:
            start = time.time()
            c, r, p = real_sequential_rows(fn, images, labels, sigma, args.n_max, num_classes,
                                           args.batch_size, args.seed)
            rows["sequential (real)"] = (accuracy_curve(c, r, radii),
                                         float(np.mean(np.where(c, r, 0.0))), float(p.mean()))
            print(f"sigma {sigma}: real sequential run in {time.time() - start:.0f} s")
        floor = oracle_floor(pA, c_hat, labels, sigma, radii).mean()
        fixed_curve, fixed_acr, fixed_passes = rows["fixed (expected)"]
        top = max(i for i, r in enumerate(radii) if r <= 4 * sigma) + 1
        header = ["sigma", "side", "passes/image", "fixed / side", "ACR",
                  *(f"r={r:g}" for r in radii[:top]), "max abs diff (points)"]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for label, (curve, acr_value, passes) in rows.items():
            diff = "" if label.startswith("fixed") else \
                f"{100 * np.max(np.abs(curve - fixed_curve)):.2f}"
            cells = [f"{sigma:g}", label, f"{passes:,.0f}", f"{fixed_passes / passes:.1f}x",
                     f"{acr_value:.3f}", *(f"{a:.3f}" for a in curve[:top]), diff]
            print("| " + " | ".join(cells) + " |")
        print(f"| {sigma:g} | oracle floor | {floor:,.0f} | {fixed_passes / max(floor, 1):.1f}x"
              f" |" + " |" * (top + 2) + "\n")
        seq_passes = rows["sequential (simulated)"][2]
        summary.append(f"sigma {sigma:g}: {fixed_passes / seq_passes:.1f}x fewer passes "
                       f"(simulated), {seq_passes / max(floor, 1):.2f}x the oracle floor")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
