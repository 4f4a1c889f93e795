"""The smoothing engine's sampler: noisy copies classified on the devices, votes to the host.

Every algorithm draws its votes here, with the `Settings` it was given. Each jitted step
draws `batch_size` noisy copies, classifies them and returns per-class vote counts, so only
count vectors reach the host. The copies' batch axis is split over a 1-D mesh of the
settings' devices. Sample j of an image with key k always uses the noise drawn from
`fold_in(k, j)`, whatever the batch size, the number of images per call or the number of
devices, so counts are reproducible bit for bit. Float noise is added in float32 pixel
space (x + sigma * normal(fold_in(k, j))); sound noise is added to the quantised image in
integer arithmetic (module `sound`). `compute_dtype` (e.g. bfloat16) casts only the noisy
input the classifier sees.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dmae_jax.smoothing import sound
from dmae_jax.smoothing.settings import Settings, check_positive_int

LogitsFn = Callable[[jax.Array], jax.Array]
# sampler(logits_fn, image [H, W, C], key, num, sigma) -> votes [K]: what the algorithms draw
# with (`sampler_for(settings)` by default; tests inject samplers of known probabilities).
Sampler = Callable[[Any, np.ndarray, jax.Array, int, float], np.ndarray]

# Images may come from resizing or float round-off; anything further out of [0, 1] means the
# pipeline normalised them already (the radius would then be in the wrong units).
RANGE_TOLERANCE = 1e-5
# Counts are int32 on device and the flat (image, sample) index must fit in int32.
MAX_SAMPLES_PER_CALL = 2**31 - 1
MESH_AXIS = "samples"


# ---------------------------------------------------------------------------------------------
# Argument checks: every error names the argument, its value and what is valid.
# ---------------------------------------------------------------------------------------------


def check_images(name: str, images: Any, rank: int) -> np.ndarray:
    """Host copy of the images as float32 after checking rank, finiteness and [0, 1] range."""
    layout = "[H, W, C]" if rank == 3 else "[M, H, W, C]"
    shape = np.shape(images)
    if len(shape) != rank or 0 in shape:
        raise ValueError(f"{name} must be a non-empty {layout} image array, got shape {shape}")
    host = np.asarray(images, dtype=np.float32)
    if not np.isfinite(host).all():
        raise ValueError(f"{name} must be finite (NaN or inf found); images are in [0, 1]")
    low, high = float(host.min()), float(host.max())
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} values must be in [0, 1] (normalisation happens inside the model), "
            f"got min {low:.6g}, max {high:.6g}"
        )
    return np.clip(host, 0.0, 1.0)


def key_array(rng: Any, name: str = "rng") -> jax.Array:
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


def single_key(rng: Any, name: str = "rng") -> jax.Array:
    """One typed PRNG key (a key array of shape () )."""
    key = key_array(rng, name)
    if key.shape != ():
        raise ValueError(f"{name} must be a single PRNG key, got a key array of shape {key.shape}")
    return key


@functools.partial(jax.jit, static_argnums=1)
def _split(key: jax.Array, num: int) -> jax.Array:
    return jax.random.split(key, num)


@functools.partial(jax.jit, static_argnums=1)
def _fold_in_range(key: jax.Array, count: int) -> jax.Array:
    return jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.arange(count, dtype=jnp.uint32))


class Keys(Sequence):
    """Keys made in one compiled call, each wrapped only when used.

    Indexing a key array, like every eager key operation, costs a dispatch (milliseconds on
    a busy CPU); this holds the key data on the host and wraps a key (~50 us) on access.
    """

    def __init__(self, keys: jax.Array):
        self._impl = jax.random.key_impl(keys)
        self._data = np.asarray(jax.random.key_data(keys))

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        return jax.random.wrap_key_data(self._data[index], impl=self._impl)


def split_keys(key: jax.Array, num: int = 2) -> Keys:
    """jax.random.split(key, num), in one compiled call."""
    return Keys(_split(key, num))


def fold_in_keys(key: jax.Array, count: int) -> Keys:
    """[jax.random.fold_in(key, t) for t < count], in one compiled call."""
    return Keys(_fold_in_range(key, count))


# ---------------------------------------------------------------------------------------------
# Mesh and the logits function's arrays.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def mesh_for(devices: tuple[jax.Device, ...]) -> Mesh:
    """The 1-D mesh the noise batch is split over."""
    return Mesh(np.asarray(devices), (MESH_AXIS,))


def place_replicated(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Copies every array in `tree` (e.g. a pytree logits_fn) to all local devices once.

    Sampling replicates the arrays of a pytree `logits_fn` onto its device mesh on every
    call; placing them beforehand makes that a no-op (worth it for a ViT's parameters).
    """
    devices = tuple(jax.local_devices() if devices is None else devices)
    replicated = NamedSharding(mesh_for(devices), P())
    return jax.tree.map(
        lambda a: jax.device_put(a, replicated) if isinstance(a, jax.Array | np.ndarray) else a,
        tree,
    )


class StaticPart(NamedTuple):
    """The non-array part of `logits_fn`: its pytree structure and non-array leaves."""

    treedef: Any
    leaves: tuple[Hashable, ...]  # None where an array leaf goes


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | jax.ShapeDtypeStruct)


def partition(logits_fn: LogitsFn) -> tuple[StaticPart, list[Any]]:
    """Splits `logits_fn` into a hashable static part and its array leaves.

    Arrays inside a pytree `logits_fn` (an nnx.Module, a `jax.tree_util.Partial` over
    parameters) then enter the jitted step as arguments instead of being baked into the
    compiled program as constants. Abstract leaves (jax.ShapeDtypeStruct) count as arrays,
    so the compile-only mode lowers the same step.
    """
    leaves, treedef = jax.tree_util.tree_flatten(logits_fn)
    static = tuple(None if _is_array(leaf) else leaf for leaf in leaves)
    return StaticPart(treedef, static), [leaf for leaf in leaves if _is_array(leaf)]


def _rebuild(static: StaticPart, arrays: list[Any]) -> LogitsFn:
    it = iter(arrays)
    leaves = [next(it) if leaf is None else leaf for leaf in static.leaves]
    return jax.tree_util.tree_unflatten(static.treedef, leaves)


# ---------------------------------------------------------------------------------------------
# The device step.
# ---------------------------------------------------------------------------------------------


def _count_step(
    counts: jax.Array,
    nan_counts: jax.Array,
    fn_arrays: list[Any],
    images: jax.Array,
    image_keys: jax.Array,
    start: jax.Array,
    num: jax.Array,
    noise: Any,
    *,
    static_fn: StaticPart,
    num_classes: int,
    batch_size: int,
    compute_dtype: Any,
    mesh: Mesh,
    levels: int | None,
) -> tuple[jax.Array, jax.Array]:
    """Adds the votes of noisy samples [start, start + batch_size) to counts [M, K].

    Samples are numbered t = m * num + j over images m (images [M, H, W, C]) and samples
    j < num; numbers past M * num are padding and vote for nothing. Float noise (levels
    None): images are float32 in [0, 1] and `noise` is sigma. Sound noise: images are the
    int32 grid indices k and `noise` the thresholds (high, low, z_min) of `sound.noise`.
    """
    num_images = images.shape[0]
    samples = NamedSharding(mesh, P(MESH_AXIS))

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
    if levels is None:
        gauss = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:], jnp.float32))(
            sample_keys)
        noisy = split_samples(images[m] + noise * gauss)
    else:
        z = jax.vmap(lambda k: sound.noise(k, images.shape[1:], *noise))(sample_keys)
        noisy = split_samples((images[m] + z).astype(jnp.float32) / levels)
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
    _count_step,
    static_argnames=("static_fn", "num_classes", "batch_size", "compute_dtype", "mesh", "levels"),
)


def _noise_arguments(settings: Settings, sigma: float, mesh: Mesh) -> Any:
    """The step's `noise` argument for this sigma, placed on every device."""
    replicated = NamedSharding(mesh, P())
    if settings.noise == "float":
        return jax.device_put(jnp.float32(sigma), replicated)
    table = sound.rounded_gaussian(sigma, settings.levels)
    return jax.device_put((table.high, table.low, np.int32(table.z_min)), replicated)


def lower_count_step(settings: Settings, logits_fn: LogitsFn, image_shape: Sequence[int]):
    """The jitted sampling step of one image, lowered for `settings` (the compile-only mode).

    `logits_fn` may hold jax.ShapeDtypeStruct leaves (parameters that are never allocated);
    the step draws settings.batch_size samples at the settings' (first) sigma.
    """
    mesh = mesh_for(settings.devices)
    replicated = NamedSharding(mesh, P())

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    static_fn, arrays = partition(logits_fn)
    arrays = [spec(a.shape, a.dtype) for a in arrays]
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 1))
    sigma = settings.sigmas[0]
    if settings.noise == "float":
        image_dtype, noise = jnp.float32, spec((), jnp.float32)
    else:
        table = sound.rounded_gaussian(sigma, settings.levels)
        image_dtype = jnp.int32
        noise = (spec(table.high.shape, jnp.uint32), spec(table.low.shape, jnp.uint32),
                 spec((), jnp.int32))
    return _count_step_jit.lower(
        spec((1, settings.num_classes), jnp.int32), spec((1,), jnp.int32), arrays,
        spec((1, *image_shape), image_dtype), spec(keys.shape, keys.dtype),
        spec((), jnp.int32), spec((), jnp.int32), noise,
        static_fn=static_fn, num_classes=settings.num_classes, batch_size=settings.batch_size,
        compute_dtype=settings.compute_dtype, mesh=mesh,
        levels=None if settings.noise == "float" else settings.levels)


# ---------------------------------------------------------------------------------------------
# Sampling (host loop over device steps).
# ---------------------------------------------------------------------------------------------


def draw_many(settings: Settings, logits_fn: LogitsFn, images: np.ndarray, keys: jax.Array,
              num: int, sigma: float) -> np.ndarray:
    """Votes [M, K] int64 of `num` noisy samples of each checked image [M, H, W, C]."""
    num_images = images.shape[0]
    total = num_images * num
    if total > MAX_SAMPLES_PER_CALL:
        raise ValueError(
            f"images x num must be < 2**31 per call, got {num_images} x {num}; pass fewer images"
        )
    mesh = mesh_for(settings.devices)
    num_devices = mesh.devices.size
    # A call with fewer samples than batch_size (e.g. the n0 = 100 selection draws, or the
    # early rounds of sequential certification) runs a smaller step, padded up to a power of
    # two per device so that few shapes are ever compiled; noise depends only on
    # (image key, j) and padding votes for nothing, so the counts do not change.
    per_device = -(-total // num_devices)
    step_size = min(settings.batch_size, (1 << (per_device - 1).bit_length()) * num_devices)
    replicated = NamedSharding(mesh, P())
    static_fn, fn_arrays = partition(logits_fn)
    fn_arrays = jax.device_put(fn_arrays, replicated)
    levels = None
    if settings.noise == "sound":
        levels = settings.levels
        images = np.stack([sound.quantise(image, levels)[0] for image in images])
    images_dev = jax.device_put(images, replicated)
    keys_dev = jax.device_put(keys, replicated)
    noise = _noise_arguments(settings, sigma, mesh)
    counts = jax.device_put(jnp.zeros((num_images, settings.num_classes), jnp.int32), replicated)
    nan_counts = jax.device_put(jnp.zeros((num_images,), jnp.int32), replicated)
    num_dev = jnp.int32(num)
    # Each sample's noise comes from its own key, so the partitionable form of threefry
    # (JAX's default, for one large random array split over devices) buys nothing here; the
    # classic form is 3-10x faster on CPU, which keeps noise a few percent of a step.
    with jax.threefry_partitionable(False):
        for start in range(0, total, step_size):
            counts, nan_counts = _count_step_jit(
                counts, nan_counts, fn_arrays, images_dev, keys_dev, jnp.int32(start), num_dev,
                noise, static_fn=static_fn, num_classes=settings.num_classes,
                batch_size=step_size, compute_dtype=settings.compute_dtype, mesh=mesh,
                levels=levels,
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


def draw(settings: Settings, logits_fn: LogitsFn, image: np.ndarray, key: jax.Array,
         num: int, sigma: float) -> np.ndarray:
    """Votes [K] int64 of `num` noisy samples of one checked image [H, W, C] with one key."""
    return draw_many(settings, logits_fn, image[None], key[None], num, sigma)[0]


def sampler_for(settings: Settings) -> Sampler:
    """The algorithms' default sampler: `draw` with these settings."""
    return functools.partial(draw, settings)


def sample_counts(logits_fn: LogitsFn, x: Any, *, num: int, rng: jax.Array,
                  **settings: Any) -> np.ndarray:
    """Class votes [K] int64 of base classifier `logits_fn` on `num` noisy copies of x.

    x is one image [H, W, C] in [0, 1]; sample j uses the noise drawn from fold_in(rng, j).
    `settings` are `Settings` fields (sigma, batch_size, num_classes, compute_dtype,
    devices, noise, levels).
    """
    checked = Settings(**settings)
    check_positive_int("num", num)
    image = check_images("x", x, rank=3)
    return draw(checked, logits_fn, image, single_key(rng), num,
                checked.one_sigma("sample_counts"))


def sample_counts_many(logits_fn: LogitsFn, xs: Any, *, num: int, rng: jax.Array,
                       **settings: Any) -> np.ndarray:
    """Class votes [M, K] int64 of `num` noisy copies of each image xs [M, H, W, C].

    rng is one key (image m then uses the key fold_in(rng, m)) or an array of M keys (one per
    image). Row m equals `sample_counts(xs[m], rng=<image m's key>)` for any M, batch size or
    device count, so images can be grouped freely (a batch may span several images).
    """
    checked = Settings(**settings)
    check_positive_int("num", num)
    images = check_images("xs", xs, rank=4)
    keys = key_array(rng)
    if keys.shape == ():
        keys = jax.vmap(lambda m: jax.random.fold_in(keys, m))(jnp.arange(images.shape[0]))
    elif keys.shape != (images.shape[0],):
        raise ValueError(
            f"rng must be one PRNG key or {images.shape[0]} keys (one per image), "
            f"got a key array of shape {keys.shape}"
        )
    return draw_many(checked, logits_fn, images, keys, num,
                     checked.one_sigma("sample_counts_many"))
