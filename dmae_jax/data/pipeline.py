"""Input pipeline: Grain `MapDataset`s over a random-access source, sharded per process.

Training order. Epoch e is a permutation of the N records (Grain's index shuffle with seed
`seed + e`); it is cut into N // global_batch_size global batches, dropping the remainder
(PyTorch's drop_last). Process p of P takes rows [p * b, (p + 1) * b) of every global batch,
b = global_batch_size // P. The global batches, and the augmentation of each record (seeded
by (seed, epoch, record index)), are therefore the same for any number of processes and of
workers; only who computes which rows changes. The iterator's position is the number of
global batches produced, which is all a checkpoint needs to resume exactly.

An in-memory source (`datasets.ArraySource`, e.g. digits) without augmentation is read
without Grain: each epoch's permutation is taken once from the same Grain shuffle and a
batch is one NumPy gather from the image array, in the training loop's own thread. The
batches are the ones the Grain pipeline makes, value for value; per-record Python (128
records per digits step, in a prefetch thread that competed with XLA's threads for two
cores) is gone.

Batches leave as NumPy: images float32 [b, H, W, 3] in [0, 1] (uint8 / 255, as torchvision's
ToTensor), labels int32 [b]. `parallel.global_batch` turns them into global `jax.Array`s.
"""

import sys
from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np
from absl import flags

from dmae_jax.data import AUGMENTATIONS, randaugment
from dmae_jax.data import augment as aug
from dmae_jax.errors import ConfigError

STATE_VERSION = 1
# Batches each Grain reader (main process or worker) prepares ahead of the training step.
_PREFETCH_BATCHES = 2
_EVAL_THREADS = 2


def _fit(image: np.ndarray, image_size: int, dataset: str | None = None) -> np.ndarray:
    """uint8 [H, W, 3] -> [image_size, image_size, 3]: ImageNet's evaluation transform
    (bicubic resize of the short side to image_size / 0.875, center crop) for ImageNet
    images of any size, and for other images whose size differs; else the image itself."""
    if dataset not in aug.RESIZE_CROP_DATASETS and image.shape[0] == image.shape[1] == image_size:
        return image
    return aug.center_crop_resize(image, image_size)


def _to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [b, H, W, 3] -> float32 in [0, 1], as torchvision's ToTensor."""
    # view(np.ndarray): Grain workers hand out shared-memory arrays; keep none of them.
    return images.view(np.ndarray).astype(np.float32) / np.float32(255.0)


def _process_layout(
    batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """(process_index, process_count, local batch size), validated; None means JAX's values."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if n < 1 or not 0 <= p < n:
        raise ValueError(f"process_index must be in [0, process_count={n}), got {p}")
    if batch_size < n or batch_size % n:
        raise ConfigError(
            f"global batch size must be a positive multiple of process_count={n}, got {batch_size}"
        )
    return p, n, batch_size // n


class _TrainOrder(grain.MapDataset):
    """Element m of this process's stream -> (epoch, record index), see the module doc."""

    def __init__(
        self,
        num_records: int,
        global_batch_size: int,
        local_batch_size: int,
        process_index: int,
        seed: int,
    ):
        # Element epoch * N + i of `permutations` is record number i of epoch's permutation.
        permutations = grain.MapDataset.range(num_records).shuffle(seed=seed).repeat()
        super().__init__(permutations)
        self._n = num_records
        self._global = global_batch_size
        self._local = local_batch_size
        self._offset = process_index * local_batch_size
        self._steps_per_epoch = num_records // global_batch_size

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(index, self._local)
        epoch, step_in_epoch = divmod(step, self._steps_per_epoch)
        position = step_in_epoch * self._global + self._offset + row
        return epoch, int(self._parent[epoch * self._n + position])

    def permutation(self, epoch: int) -> np.ndarray:
        """Record index at every position of `epoch`'s order, int64 [N]."""
        start = epoch * self._n
        return np.fromiter((self._parent[start + i] for i in range(self._n)), np.int64,
                           count=self._n)

    def batch_records(self, step: int, permutation: np.ndarray) -> np.ndarray:
        """Record indices of this process's rows of global batch `step` (`permutation`: its
        epoch's), in the order `__getitem__` gives them."""
        start = (step % self._steps_per_epoch) * self._global + self._offset
        return permutation[start:start + self._local]


class _Augment:
    """(epoch, record index) -> {'image': uint8 [S, S, 3], 'label': int32}, augmented."""

    def __init__(self, source: Sequence[dict], augment: str, image_size: int, seed: int):
        self._source = source
        self._augment = augment
        self._size = image_size
        self._seed = seed

    def __call__(self, epoch_and_index: tuple[int, int]) -> dict:
        epoch, index = epoch_and_index
        record = self._source[index]
        image = record["image"]
        rng = np.random.default_rng([self._seed, epoch, index])
        if self._augment == "rrc_flip":
            image = aug.rrc_flip(image, self._size, rng)
        elif self._augment == "rrc_flip_randaug":
            image = randaugment.finetune_train_transform(image, self._size, rng)
        elif self._augment == "rrc_single_flip":
            image = aug.rrc_single_draw_flip(image, self._size, rng)
        else:
            image = _fit(image, self._size, getattr(self._source, "name", None))
            if self._augment == "flip":
                image = aug.random_flip(image, rng)
        return {"image": np.ascontiguousarray(image), "label": np.int32(record["label"])}


class TrainIterator:
    """Infinite iterator of local training batches with a checkpointable position."""

    def __init__(
        self,
        source: Sequence[dict],
        *,
        global_batch_size: int,
        seed: int,
        augment: str,
        image_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
        worker_count: int = 0,
        start_state: dict | None = None,
    ):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {list(AUGMENTATIONS)}, got {augment!r}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {worker_count}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.process_index, self.process_count, self.local_batch_size = _process_layout(
            global_batch_size, process_index, process_count
        )
        self.num_records = len(source)
        if self.num_records < global_batch_size:
            raise ConfigError(
                f"global_batch_size must be <= the number of records ({self.num_records}), "
                f"got {global_batch_size}"
            )
        self.global_batch_size = global_batch_size
        self.steps_per_epoch = self.num_records // global_batch_size
        self.seed = seed
        self.augment = augment
        self.image_size = image_size
        self.worker_count = worker_count
        self._order = _TrainOrder(
            self.num_records, global_batch_size, self.local_batch_size, self.process_index, seed
        )
        self._batches = self._order.map(_Augment(source, augment, image_size, seed)).batch(
            self.local_batch_size, drop_remainder=True
        )
        # The Grain-free path (module docstring): records that are the batch as stored.
        self._arrays = source if (
            augment == "none" and isinstance(getattr(source, "images", None), np.ndarray)
            and source.images.shape[1:] == (image_size, image_size, 3)
            and getattr(source, "name", None) not in aug.RESIZE_CROP_DATASETS) else None
        self._permutation: tuple[int, np.ndarray] | None = None  # (epoch, its order)
        self._next_batch = 0
        self._iterator = None
        if start_state is not None:
            self.set_state(start_state)

    @property
    def epoch(self) -> float:
        """Fractional epoch of the next batch: batches produced / steps_per_epoch."""
        return self._next_batch / self.steps_per_epoch

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._arrays is not None:
            batch = self._gather(self._next_batch)
        else:
            if self._iterator is None:
                self._iterator = iter(self._grain_dataset(self._next_batch))
            batch = next(self._iterator)
        self._next_batch += 1
        return {"image": _to_float(batch["image"]), "label": np.array(batch["label"])}

    def next_batches(self, count: int) -> dict[str, np.ndarray]:
        """The next `count` batches, stacked: 'image' f32 [count, b, S, S, 3], 'label' i32
        [count, b] (what `count` calls of `next` return)."""
        batches = [next(self) for _ in range(count)]
        return {key: np.stack([b[key] for b in batches]) for key in batches[0]}

    def _gather(self, step: int) -> dict[str, np.ndarray]:
        """Global batch `step` of an in-memory source: {'image': uint8, 'label': int32}."""
        epoch = step // self.steps_per_epoch
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, self._order.permutation(epoch))
        records = self._order.batch_records(step, self._permutation[1])
        return {"image": self._arrays.images[records], "label": self._arrays.labels[records]}

    def _grain_dataset(self, start: int) -> grain.IterDataset:
        """Grain pipeline from global batch `start` on, prefetching in threads or workers."""
        threads = 1 if self.worker_count == 0 else 0
        ds = self._batches[start:].to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=_PREFETCH_BATCHES)
        )
        if self.worker_count > 0:
            # Grain's worker start reads an absl flag; outside an absl app (tests, notebooks)
            # flags are unparsed and that read raises, so take the defaults.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.worker_count, per_worker_buffer_size=_PREFETCH_BATCHES
                )
            )
        return ds

    def get_state(self) -> dict:
        """JSON-serialisable position: resuming from it yields the batch `next` would."""
        return {
            "version": STATE_VERSION,
            "next_batch": self._next_batch,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_records": self.num_records,
            "augment": self.augment,
            "image_size": self.image_size,
        }

    def set_state(self, state: dict) -> None:
        """Continue from a `get_state()` position (of any process count or worker count)."""
        expected = self.get_state()
        for key in ("version", "seed", "global_batch_size", "num_records", "augment", "image_size"):
            if state.get(key) != expected[key]:
                raise ValueError(
                    f"iterator state {key} must be {expected[key]!r} to resume this pipeline, "
                    f"got {state.get(key)!r} (state {state})"
                )
        next_batch = state.get("next_batch")
        if not isinstance(next_batch, int) or next_batch < 0:
            raise ValueError(f"iterator state next_batch must be an int >= 0, got {next_batch!r}")
        self.close()
        self._next_batch = next_batch

    def close(self) -> None:
        """Stop prefetch threads and worker processes (restarted lazily by `next`)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


def train_iterator(
    source: Sequence[dict],
    *,
    global_batch_size: int,
    seed: int,
    augment: str,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    start_state: dict | None = None,
) -> TrainIterator:
    """Infinite local batches {'image': f32 [b, S, S, 3], 'label': i32 [b]}, b = global/P."""
    return TrainIterator(
        source,
        global_batch_size=global_batch_size,
        seed=seed,
        augment=augment,
        image_size=image_size,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
        start_state=start_state,
    )


class _EvalRow:
    """Local row m -> a record at its fixed position, or a padding row (mask 0)."""

    def __init__(
        self,
        source: Sequence[dict],
        indices: range,
        global_batch: int,
        local_batch: int,
        process_index: int,
        image_size: int,
    ):
        self._source = source
        self._indices = indices
        self._global = global_batch
        self._local = local_batch
        self._offset = process_index * local_batch
        self._size = image_size

    def __call__(self, m: int) -> dict:
        step, row = divmod(m, self._local)
        position = step * self._global + self._offset + row
        if position >= len(self._indices):
            return {
                "image": np.zeros((self._size, self._size, 3), np.uint8),
                "label": np.int32(-1),
                "index": np.int32(-1),
                "mask": np.float32(0.0),
            }
        index = self._indices[position]
        record = self._source[index]
        return {
            "image": np.ascontiguousarray(
                _fit(record["image"], self._size, getattr(self._source, "name", None))),
            "label": np.int32(record["label"]),
            "index": np.int32(index),
            "mask": np.float32(1.0),
        }


def eval_batches(
    source: Sequence[dict],
    *,
    batch_size: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    start: int = 0,
    stop: int | None = None,
    step: int = 1,
    indices: Sequence[int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-order local batches of records source[start:stop:step] (or of the records
    `indices`, in that order, when given), padded to full batches.

    `batch_size` is global; each process gets its b = batch_size / P rows of every global
    batch, and every process yields the same number of batches. Keys: 'image' f32
    [b, S, S, 3] (records of another size get the ImageNet center-crop transform), 'label'
    i32 [b], 'index' i32 [b] (position in `source`), 'mask' f32 [b]: 0 on padding rows,
    which have label and index -1 and a zero image.
    """
    p, _, local = _process_layout(batch_size, process_index, process_count)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if indices is None:
        indices = range(len(source))[start:stop:step]
    elif any(not 0 <= i < len(source) for i in indices):
        raise ValueError(f"indices must lie in [0, {len(source)}), got {list(indices)[:10]}...")
    num_batches = -(-len(indices) // batch_size)
    rows = grain.MapDataset.range(num_batches * local).map(
        _EvalRow(source, indices, batch_size, local, p, image_size)
    )
    batches = rows.batch(local).to_iter_dataset(
        grain.ReadOptions(num_threads=_EVAL_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    )
    for batch in batches:
        yield {**batch, "image": _to_float(batch["image"])}
