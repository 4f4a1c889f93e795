r"""What the sound noise costs: sample_counts with noise="float" against noise="sound".

  python -m benchmarks.sound_noise [--workdir=runs/digits] [--repeats=5]

Side by side, float and sound alternating repetition by repetition after a warm-up, each
row the median over the repetitions of the process CPU time (user + system, all threads)
of drawing and classifying `--num` noisy copies of one image: a near-free classifier (the
mean of the pixels: what the noise itself costs) at digits, CIFAR-10 and ImageNet sizes,
and, with --workdir, the digits pipeline's fine-tuned classifier (a real model). The load
average before and after each row is printed, so a row taken while others ran says so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dmae_jax.smoothing import place_replicated, sample_counts


def mean_logits(images):
    """A near-free classifier [B, H, W, C] -> [B, 2]: what is left is the sampler's cost."""
    m = images.mean(axis=(1, 2, 3))
    return jnp.stack([m, 1 - m], axis=-1)


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def side_by_side(name, logits_fn, shape, num_classes, num, batch, repeats):
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.float32) / 255.0
    runs = {}
    for noise in ("float", "sound"):
        runs[noise] = lambda noise=noise: sample_counts(
            logits_fn, x, num=num, rng=jax.random.key(0), sigma=0.5, batch_size=batch,
            num_classes=num_classes, noise=noise)
        runs[noise]()  # compile
    times = {"float": [], "sound": []}
    load = os.getloadavg()[0]
    for _ in range(repeats):
        for noise in ("float", "sound"):
            times[noise].append(cpu_seconds(runs[noise]))
    after = os.getloadavg()[0]
    f, s = statistics.median(times["float"]), statistics.median(times["sound"])
    print(f"| {name} | {num:,} x {'x'.join(map(str, shape))} | {1e3 * f:,.0f} ms | "
          f"{1e3 * s:,.0f} ms | {s / f:.2f} | {load:.1f}-{after:.1f} |", flush=True)


def main(argv=None) -> int:
    """Command line: prints the markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sound_noise",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="the digits pipeline's workdir")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"Date {datetime.date.today()}; command: python -m benchmarks.sound_noise "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}; CPU seconds per row, "
          f"median of {args.repeats}, sigma 0.5, one device\n")
    print("| classifier | samples x image | float | sound | sound / float | load before-after |")
    print("|---|---|---|---|---|---|")
    for name, shape, num, batch in [("near-free, digits size", (16, 16, 3), 20_000, 2000),
                                    ("near-free, CIFAR-10 size", (32, 32, 3), 10_000, 1000),
                                    ("near-free, ImageNet size", (224, 224, 3), 200, 100)]:
        side_by_side(name, mean_logits, shape, 2, num, batch, args.repeats)
    if args.workdir:
        from dmae_jax.tasks.certification import load_classifier

        fn, meta = load_classifier(os.path.join(args.workdir, "finetune_0.5", "export"))
        side_by_side("digits ViT (finetune_0.5)", place_replicated(fn), (16, 16, 3),
                     int(meta["num_classes"]), 20_000, 2000, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
