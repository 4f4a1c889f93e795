"""Randomized-smoothing PREDICT and CERTIFY (Cohen, Rosenfeld & Kolter, ICML 2019), in JAX.

The algorithms read like the paper's pseudocode (and locuslab/smoothing `core.py`):

    CERTIFY: counts_selection = SampleUnderNoise(f, x, n0, sigma)      # key k_sel
             cAHat = argmax counts_selection                            # lowest index on ties
             counts_estimation = SampleUnderNoise(f, x, n, sigma)       # fresh key k_est
             pA_lower = LowerConfBound(counts_estimation[cAHat], n, 1 - alpha)
             abstain if pA_lower < 0.5, else return cAHat, sigma * Phi^-1(pA_lower)
    PREDICT: counts = SampleUnderNoise(f, x, n, sigma); top two counts n_A, n_B;
             abstain if BinomPValue(n_A, n_A + n_B, 0.5) > alpha, else return the top class

Sampling runs on the devices: each jitted step draws `batch_size` noisy copies, classifies
them and returns per-class vote counts, so only count vectors reach the host. The copies'
batch axis is split over a 1-D mesh of the local devices. Sample j of an image with key k
always uses the noise `normal(fold_in(k, j))`, whatever the batch size, the number of
images per call or the number of devices, so counts are reproducible bit for bit. Noise is
added in float32 pixel space; `compute_dtype` (e.g. bfloat16) casts only the noisy input
the classifier sees. The statistics run on the host in float64 (SciPy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from dmae_jax.smoothing.logs import format_sparse_counts

ABSTAIN = -1

LogitsFn = Callable[[jax.Array], jax.Array]

# Images may come from resizing or float round-off; anything further out of [0, 1] means the
# pipeline normalised them already (the radius would then be in the wrong units).
_RANGE_TOLERANCE = 1e-5
# Counts are int32 on device and the flat (image, sample) index must fit in int32.
_MAX_SAMPLES_PER_CALL = 2**31 - 1
_MESH_AXIS = "samples"

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
    _check_positive_int("n", n)
    if not 0 <= nA <= n:
        raise ValueError(f"nA must be in [0, n={n}], got {nA}")
    _check_alpha(alpha)
    # beta.ppf(alpha, 0, n + 1) is NaN; the bound is 0 there (NaN < 0.5 is False, so a NaN
    # bound would certify).
    if nA == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, nA, n - nA + 1))


def radius_from_bound(pA_lower: float, sigma: float) -> float:
    """Certified L2 radius sigma * Phi^-1(pA_lower) (Cohen et al., Theorem 1 with pB = 1 - pA)."""
    return float(sigma * stats.norm.ppf(pA_lower))


# ---------------------------------------------------------------------------------------------
# Input checks: every error names the argument, its value and what is valid.
# ---------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_alpha(alpha: Any) -> None:
    if not isinstance(alpha, int | float | np.floating) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _check_sigma(sigma: Any) -> None:
    if (
        not isinstance(sigma, int | float | np.floating)
        or not math.isfinite(float(sigma))
        or float(sigma) <= 0.0
    ):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")


def _check_num_classes(num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def _check_images(name: str, images: Any, rank: int) -> np.ndarray:
    """Host copy of the images as float32 after checking rank, finiteness and [0, 1] range."""
    layout = "[H, W, C]" if rank == 3 else "[M, H, W, C]"
    shape = np.shape(images)
    if len(shape) != rank or 0 in shape:
        raise ValueError(f"{name} must be a non-empty {layout} image array, got shape {shape}")
    host = np.asarray(images, dtype=np.float32)
    if not np.isfinite(host).all():
        raise ValueError(f"{name} must be finite (NaN or inf found); images are in [0, 1]")
    low, high = float(host.min()), float(host.max())
    if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
        raise ValueError(
            f"{name} values must be in [0, 1] (normalisation happens inside the model), "
            f"got min {low:.6g}, max {high:.6g}"
        )
    return np.clip(host, 0.0, 1.0)


def _as_key_array(rng: Any, name: str = "rng") -> jax.Array:
    """A typed PRNG key array from a typed key or raw uint32 key data."""
    if isinstance(rng, jax.Array) and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    raw = np.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if raw.dtype == np.uint32 and raw.ndim >= 1 and raw.shape[-1] == 2:
        return jax.random.wrap_key_data(raw)
    raise ValueError(
        f"{name} must be a JAX PRNG key (jax.random.key(seed)), got {type(rng).__name__} "
        f"with shape {np.shape(rng)}"
    )


def _local_mesh(devices: Sequence[jax.Device] | None, batch_size: int) -> Mesh:
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one device, got an empty list")
    if batch_size % len(devices):
        raise ValueError(
            f"batch_size must be a multiple of the number of devices ({len(devices)}) so the "
            f"noise samples split evenly, got {batch_size}"
        )
    return Mesh(np.asarray(devices), (_MESH_AXIS,))


# ---------------------------------------------------------------------------------------------
# Sampling (device).
# ---------------------------------------------------------------------------------------------


class _StaticPart(NamedTuple):
    """The non-array part of `logits_fn`: its pytree structure and non-array leaves."""

    treedef: Any
    leaves: tuple[Hashable, ...]  # None where an array leaf goes


def _partition(logits_fn: LogitsFn) -> tuple[_StaticPart, list[Any]]:
    """Splits `logits_fn` into a hashable static part and its array leaves.

    Arrays inside a pytree `logits_fn` (an nnx.Module, a `jax.tree_util.Partial` over
    parameters) then enter the jitted step as arguments instead of being baked into the
    compiled program as constants.
    """
    leaves, treedef = jax.tree_util.tree_flatten(logits_fn)
    is_array = [isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves]
    static = tuple(None if a else leaf for leaf, a in zip(leaves, is_array, strict=True))
    arrays = [leaf for leaf, a in zip(leaves, is_array, strict=True) if a]
    return _StaticPart(treedef, static), arrays


def _rebuild(static: _StaticPart, arrays: list[Any]) -> LogitsFn:
    it = iter(arrays)
    leaves = [next(it) if leaf is None else leaf for leaf in static.leaves]
    return jax.tree_util.tree_unflatten(static.treedef, leaves)


def place_replicated(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Copies every array in `tree` (e.g. a pytree logits_fn) to all local devices once.

    Sampling replicates the arrays of a pytree `logits_fn` onto its device mesh on every
    call; placing them beforehand makes that a no-op (worth it for a ViT's parameters).
    """
    mesh = Mesh(np.asarray(list(jax.local_devices() if devices is None else devices)),
                (_MESH_AXIS,))
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda a: jax.device_put(a, replicated) if isinstance(a, jax.Array | np.ndarray) else a,
        tree,
    )


def _count_step(
    counts: jax.Array,
    nan_counts: jax.Array,
    fn_arrays: list[Any],
    images: jax.Array,
    image_keys: jax.Array,
    start: jax.Array,
    num: jax.Array,
    sigma: jax.Array,
    *,
    static_fn: _StaticPart,
    num_classes: int,
    batch_size: int,
    compute_dtype: Any,
    mesh: Mesh,
) -> tuple[jax.Array, jax.Array]:
    """Adds the votes of noisy samples [start, start + batch_size) to counts [M, K].

    Samples are numbered t = m * num + j over images m (images [M, H, W, C]) and samples
    j < num; numbers past M * num are padding and vote for nothing.
    """
    num_images = images.shape[0]
    samples = NamedSharding(mesh, P(_MESH_AXIS))

    def split_samples(value: jax.Array) -> jax.Array:
        # One device: nothing to split, and the constraint can cost a copy of the batch.
        if mesh.devices.size == 1:
            return value
        return jax.lax.with_sharding_constraint(value, samples)

    t = split_samples(start + jnp.arange(batch_size, dtype=jnp.int32))
    valid = t < num_images * num
    t = jnp.minimum(t, num_images * num - 1)
    m, j = t // num, t % num
    sample_keys = jax.vmap(jax.random.fold_in)(image_keys[m], j)
    noise = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:], jnp.float32))(sample_keys)
    noisy = split_samples(images[m] + sigma * noise)
    if compute_dtype is not None:
        noisy = noisy.astype(compute_dtype)
    logits = _rebuild(static_fn, fn_arrays)(noisy)
    if logits.shape != (batch_size, num_classes):
        raise ValueError(
            f"logits_fn must map [B, H, W, C] to logits [B, num_classes] = "
            f"[{batch_size}, {num_classes}], got shape {logits.shape}"
        )
    votes = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes, dtype=jnp.int32)
    votes = votes * valid[:, None].astype(jnp.int32)
    has_nan = (jnp.isnan(logits).any(axis=-1) & valid).astype(jnp.int32)
    counts = counts + jax.ops.segment_sum(votes, m, num_segments=num_images)
    nan_counts = nan_counts + jax.ops.segment_sum(has_nan, m, num_segments=num_images)
    return counts, nan_counts


_count_step_jit = jax.jit(
    _count_step, static_argnames=("static_fn", "num_classes", "batch_size", "compute_dtype", "mesh")
)


def _sample(
    logits_fn: LogitsFn,
    images: np.ndarray,
    image_keys: jax.Array,
    *,
    sigma: float,
    num: int,
    batch_size: int,
    num_classes: int,
    compute_dtype: Any,
    devices: Sequence[jax.Device] | None,
) -> np.ndarray:
    """Votes [M, K] int64 of `num` noisy samples of each image [M, H, W, C]."""
    num_images = images.shape[0]
    total = num_images * num
    if total > _MAX_SAMPLES_PER_CALL:
        raise ValueError(
            f"images x num must be < 2**31 per call, got {num_images} x {num}; pass fewer images"
        )
    mesh = _local_mesh(devices, batch_size)
    num_devices = mesh.devices.size
    # A call with fewer samples than batch_size (e.g. the n0 = 100 selection draws, or the
    # early rounds of sequential certification) runs a smaller step, padded up to a power of
    # two per device so that few shapes are ever compiled; noise depends only on
    # (image key, j) and padding votes for nothing, so the counts do not change.
    per_device = -(-total // num_devices)
    step_size = min(batch_size, (1 << (per_device - 1).bit_length()) * num_devices)
    replicated = NamedSharding(mesh, P())
    static_fn, fn_arrays = _partition(logits_fn)
    fn_arrays = jax.device_put(fn_arrays, replicated)
    images_dev = jax.device_put(images, replicated)
    keys_dev = jax.device_put(image_keys, replicated)
    counts = jax.device_put(jnp.zeros((num_images, num_classes), jnp.int32), replicated)
    nan_counts = jax.device_put(jnp.zeros((num_images,), jnp.int32), replicated)
    num_dev = jnp.int32(num)
    sigma_dev = jnp.float32(sigma)
    # Each sample's noise comes from its own key, so the partitionable form of threefry
    # (JAX's default, for one large random array split over devices) buys nothing here; the
    # classic form is 3-10x faster on CPU, which keeps noise a few percent of a step.
    with jax.threefry_partitionable(False):
        for start in range(0, total, step_size):
            counts, nan_counts = _count_step_jit(
                counts, nan_counts, fn_arrays, images_dev, keys_dev, jnp.int32(start), num_dev,
                sigma_dev, static_fn=static_fn, num_classes=num_classes, batch_size=step_size,
                compute_dtype=compute_dtype, mesh=mesh,
            )
    counts_host = np.asarray(counts).astype(np.int64)
    nan_host = np.asarray(nan_counts)
    if nan_host.any():
        bad = np.flatnonzero(nan_host).tolist()
        raise ValueError(
            f"logits_fn returned NaN logits for {int(nan_host.sum())} of {total} noisy samples "
            f"(image positions {bad[:10]}); logits must be finite"
        )
    if not (counts_host.sum(axis=1) == num).all():
        raise RuntimeError(f"vote counts {counts_host.sum(axis=1)} do not add up to num={num}")
    return counts_host


def _check_sampling_args(sigma: float, num: int, batch_size: int, num_classes: int) -> None:
    _check_sigma(sigma)
    _check_positive_int("num", num)
    _check_positive_int("batch_size", batch_size)
    _check_num_classes(num_classes)


def sample_counts(
    logits_fn: LogitsFn,
    x: Any,
    *,
    sigma: float,
    num: int,
    batch_size: int,
    rng: jax.Array,
    num_classes: int,
    compute_dtype: Any = None,
    devices: Sequence[jax.Device] | None = None,
) -> np.ndarray:
    """Class votes [K] int64 of base classifier `logits_fn` on `num` copies of x + N(0, sigma^2 I).

    x is one image [H, W, C] in [0, 1]; sample j uses the noise normal(fold_in(rng, j)).
    """
    _check_sampling_args(sigma, num, batch_size, num_classes)
    image = _check_images("x", x, rank=3)
    key = _as_key_array(rng)
    if key.shape != ():
        raise ValueError(f"rng must be a single PRNG key, got a key array of shape {key.shape}")
    return _sample(
        logits_fn, image[None], key[None], sigma=sigma, num=num, batch_size=batch_size,
        num_classes=num_classes, compute_dtype=compute_dtype, devices=devices,
    )[0]


def sample_counts_many(
    logits_fn: LogitsFn,
    xs: Any,
    *,
    sigma: float,
    num: int,
    batch_size: int,
    rng: jax.Array,
    num_classes: int,
    compute_dtype: Any = None,
    devices: Sequence[jax.Device] | None = None,
) -> np.ndarray:
    """Class votes [M, K] int64 of `num` noisy copies of each image xs [M, H, W, C].

    rng is one key (image m then uses the key fold_in(rng, m)) or an array of M keys (one per
    image). Row m equals `sample_counts(xs[m], rng=<image m's key>)` for any M, batch size or
    device count, so images can be grouped freely (a batch may span several images).
    """
    _check_sampling_args(sigma, num, batch_size, num_classes)
    images = _check_images("xs", xs, rank=4)
    keys = _as_key_array(rng)
    if keys.shape == ():
        keys = jax.vmap(lambda m: jax.random.fold_in(keys, m))(jnp.arange(images.shape[0]))
    elif keys.shape != (images.shape[0],):
        raise ValueError(
            f"rng must be one PRNG key or {images.shape[0]} keys (one per image), "
            f"got a key array of shape {keys.shape}"
        )
    return _sample(
        logits_fn, images, keys, sigma=sigma, num=num, batch_size=batch_size,
        num_classes=num_classes, compute_dtype=compute_dtype, devices=devices,
    )


# ---------------------------------------------------------------------------------------------
# PREDICT and CERTIFY.
# ---------------------------------------------------------------------------------------------


def certify_detailed(
    logits_fn: LogitsFn,
    x: Any,
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    rng: jax.Array,
    num_classes: int,
    early_abstain_label: int | None = None,
    compute_dtype: Any = None,
    devices: Sequence[jax.Device] | None = None,
) -> CertifyResult:
    """Cohen et al.'s CERTIFY on one image x [H, W, C] in [0, 1], with its counts and bound.

    With `early_abstain_label` set (DMAE's util/smooth.py shortcut; off by default), the
    estimation samples are skipped and the result is an abstention whenever cAHat differs
    from that label: certified accuracy is unchanged, but the prediction is then no longer
    the smoothed classifier's output.
    """
    _check_certify_args(sigma, n0, n, alpha, batch_size, num_classes)
    if early_abstain_label is not None and not (
        isinstance(early_abstain_label, int | np.integer)
        and 0 <= early_abstain_label < num_classes
    ):
        raise ValueError(
            f"early_abstain_label must be None or a class in [0, {num_classes}), "
            f"got {early_abstain_label!r}"
        )
    key = _as_key_array(rng)
    if key.shape != ():
        raise ValueError(f"rng must be a single PRNG key, got a key array of shape {key.shape}")
    return _certify_checked(
        logits_fn, _check_images("x", x, rank=3), sigma=sigma, n0=n0, n=n, alpha=alpha,
        batch_size=batch_size, key=key, num_classes=num_classes,
        early_abstain_label=early_abstain_label, compute_dtype=compute_dtype, devices=devices)


def _check_certify_args(sigma, n0, n, alpha, batch_size, num_classes) -> None:
    _check_sigma(sigma)
    _check_positive_int("n0", n0)
    _check_positive_int("n", n)
    _check_alpha(alpha)
    _check_positive_int("batch_size", batch_size)
    _check_num_classes(num_classes)


def _certify_checked(
    logits_fn: LogitsFn, image: np.ndarray, *, sigma: float, n0: int, n: int, alpha: float,
    batch_size: int, key: jax.Array, num_classes: int, early_abstain_label: int | None,
    compute_dtype: Any, devices: Sequence[jax.Device] | None,
) -> CertifyResult:
    """CERTIFY on a checked image [H, W, C] with checked arguments (no validation here)."""
    # Selecting cAHat on the estimation samples would bias pA_lower upwards: fresh keys.
    k_sel, k_est = jax.random.split(key)
    common = dict(
        sigma=sigma, batch_size=batch_size, num_classes=num_classes,
        compute_dtype=compute_dtype, devices=devices,
    )
    counts_selection = _sample(logits_fn, image[None], k_sel[None], num=n0, **common)[0]
    cAHat = int(np.argmax(counts_selection))  # lowest class index on ties
    if early_abstain_label is not None and cAHat != int(early_abstain_label):
        return CertifyResult(
            prediction=ABSTAIN, radius=0.0, pA_lower=float("nan"),
            counts_selection=counts_selection,
            counts_estimation=np.zeros(num_classes, np.int64), n_drawn=n0, abstained_early=True,
        )
    counts_estimation = _sample(logits_fn, image[None], k_est[None], num=n, **common)[0]
    pA_lower = lower_confidence_bound(int(counts_estimation[cAHat]), n, alpha)
    # Cohen's code abstains only below 0.5, so pA_lower == 0.5 certifies radius 0.
    if pA_lower < 0.5:
        prediction, radius = ABSTAIN, 0.0
    else:
        prediction, radius = cAHat, radius_from_bound(pA_lower, sigma)
    return CertifyResult(
        prediction=prediction, radius=radius, pA_lower=pA_lower,
        counts_selection=counts_selection, counts_estimation=counts_estimation,
        n_drawn=n0 + n, abstained_early=False,
    )


def certify(
    logits_fn: LogitsFn,
    x: Any,
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    rng: jax.Array,
    num_classes: int,
    early_abstain_label: int | None = None,
    compute_dtype: Any = None,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY: (class, L2 radius) of the smoothed classifier at x, or (-1, 0.0)."""
    result = certify_detailed(
        logits_fn, x, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size, rng=rng,
        num_classes=num_classes, early_abstain_label=early_abstain_label,
        compute_dtype=compute_dtype, devices=devices,
    )
    return result.prediction, result.radius


def predict(
    logits_fn: LogitsFn,
    x: Any,
    *,
    sigma: float,
    n: int,
    alpha: float,
    batch_size: int,
    rng: jax.Array,
    num_classes: int,
    compute_dtype: Any = None,
    devices: Sequence[jax.Device] | None = None,
) -> int:
    """Cohen et al.'s PREDICT: the smoothed classifier's class at x [H, W, C], or -1 (abstain).

    Returns a wrong class with probability <= alpha (two-sided exact binomial test on the
    top two counts; Hung & Fithian 2019). With n samples the smallest p-value is 2^(1-n),
    so alpha = 0.001 needs n >= 11 to ever answer.
    """
    _check_positive_int("n", n)
    _check_alpha(alpha)
    counts = sample_counts(
        logits_fn, x, sigma=sigma, num=n, batch_size=batch_size, rng=rng,
        num_classes=num_classes, compute_dtype=compute_dtype, devices=devices,
    )
    # A stable sort keeps the lowest class index first among equal counts.
    top2 = np.argsort(-counts, kind="stable")[:2]
    count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
    if stats.binomtest(count1, count1 + count2, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2[0])


def make_certify_one(
    logits_fn: LogitsFn,
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    rng: jax.Array,
    num_classes: int,
    early_abstain: bool = False,
    compute_dtype: Any = None,
    devices: Sequence[jax.Device] | None = None,
) -> Callable[[int, Any, int], dict[str, Any]]:
    """certify_one(idx, image, label) -> log row (predict, radius, LOG_COLUMNS) for the runner.

    Image idx uses the key fold_in(rng, idx), so a resumed or multi-process run certifies
    each image exactly as one uninterrupted run does. early_abstain=True passes the label as
    `early_abstain_label` (DMAE's shortcut), which the `abstained_early` column records.
    """
    _check_certify_args(sigma, n0, n, alpha, batch_size, num_classes)
    key = _as_key_array(rng)

    def certify_one(idx: int, image: Any, label: int) -> dict[str, Any]:
        # The arguments were checked once above; only the image is new for every call.
        result = _certify_checked(
            logits_fn, _check_images("image", image, rank=3), sigma=sigma, n0=n0, n=n,
            alpha=alpha, batch_size=batch_size, key=jax.random.fold_in(key, idx),
            num_classes=num_classes, early_abstain_label=int(label) if early_abstain else None,
            compute_dtype=compute_dtype, devices=devices,
        )
        cAHat = int(np.argmax(result.counts_selection))
        return {
            "predict": result.prediction,
            "radius": result.radius,
            "sigma": float(sigma),
            "cAHat": cAHat,
            "nA": int(result.counts_estimation[cAHat]),
            "n": 0 if result.abstained_early else n,
            "pA_lower": result.pA_lower,
            "n_drawn": result.n_drawn,
            "abstained_early": int(result.abstained_early),
            "counts_selection": format_sparse_counts(result.counts_selection),
            "counts_estimation": format_sparse_counts(result.counts_estimation),
        }

    return certify_one
