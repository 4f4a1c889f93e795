"""Random-access image data sets: TFDS ArrayRecord `data_source`s, read without TensorFlow.

Records are `{'image': uint8 [H, W, 3], 'label': int}`. `digits` prepares itself on first
use (no network needed); `cifar10` and `imagenet2012` must be prepared once beforehand in
ArrayRecord format, and a missing one raises `DatasetNotFoundError` with the command to run.

The facts about the data sets (names, classes, split sizes) need no TFDS: TFDS (and the
digits builder, which is a TFDS builder) is imported by `tfds()` here, the one place, when
data is read or prepared, so validation, compile-only mode and certification's engine never
load it.
"""

import functools
import os
from collections.abc import Sequence

import numpy as np

from dmae_jax.errors import ConfigError, UserError

DATASETS = ("digits", "cifar10", "imagenet2012")
NUM_CLASSES = {"digits": 10, "cifar10": 10, "imagenet2012": 1000}
NUM_EXAMPLES = {
    "digits": {"train": 1501, "test": 296},
    "cifar10": {"train": 50_000, "test": 10_000},
    "imagenet2012": {"train": 1_281_167, "validation": 50_000},
}
DEFAULT_DIGITS_SIZE = 32
# digits are 8x8 images upscaled to this range of sides (a 512 px split is about 1.4 GB
# decoded; beyond it preparing takes hours and the memory of the machine).
DIGITS_SIZES = (8, 512)
# Splits whose decoded images fit in this many bytes are decoded once and kept in memory:
# TFDS decodes a PNG per read (about 0.5 ms even for 32x32), slower than the augmentation.
IN_MEMORY_BYTES = 64 * 2**20


def tfds():
    """The `tensorflow_datasets` module, imported on first use (here only)."""
    import tensorflow_datasets

    return tensorflow_datasets


def check_digits_size(image_size: int, field: str) -> None:
    """A digits resolution in DIGITS_SIZES, else ConfigError naming `field`."""
    low, high = DIGITS_SIZES
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
            or not low <= image_size <= high:
        raise ConfigError(f"{field} must be an integer in [{low}, {high}] for digits (8x8 "
                          f"digits upscaled), got {image_size!r}")


class DatasetError(UserError, RuntimeError):
    """A data set cannot be read as asked (not prepared, wrong format)."""


class DatasetNotFoundError(DatasetError):
    """A data set is not prepared (in ArrayRecord format) in the data directory."""


class ImageLabelSource:
    """Random-access source of `{'image': uint8 [H, W, 3], 'label': int}` records."""

    def __init__(self, source: Sequence[dict], name: str, split: str):
        self._source = source
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return _image_label(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [_image_label(r) for r in self._source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"ImageLabelSource({self.name!r}, split={self.split!r}, len={len(self)})"


class ArraySource:
    """In-memory random-access source over uint8 images [N, H, W, 3] and int labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str, split: str):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.asarray(images, np.uint8)
        self.labels = np.asarray(labels, np.int32)
        self.name = name
        self.split = split

    @classmethod
    def from_source(cls, source: ImageLabelSource) -> "ArraySource":
        """Decode every record of `source` (all images must have the same shape)."""
        records = source.__getitems__(range(len(source)))
        images = np.stack([r["image"] for r in records])
        labels = np.array([r["label"] for r in records], np.int32)
        return cls(images, labels, source.name, source.split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index])}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"ArraySource({self.name!r}, split={self.split!r}, len={len(self)})"


def _image_label(record: dict) -> dict:
    """Keep only image (as 3-channel uint8) and label of a TFDS record."""
    image = np.asarray(record["image"], np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return {"image": image, "label": int(record["label"])}


def _check_name(name: str) -> None:
    """Raise a ValueError naming `config.data.dataset` if `name` is unknown."""
    if name not in DATASETS:
        raise ConfigError(f"config.data.dataset must be one of {list(DATASETS)}, got {name!r}")


def _root(data_dir: str | None) -> str:
    """The TFDS data directory that `data_dir=None` means."""
    return os.fspath(data_dir) if data_dir is not None else tfds().core.constants.DATA_DIR


def preparation_command(name: str, data_dir: str | None) -> str:
    """Shell instructions that prepare `name` in ArrayRecord format in `data_dir`."""
    root = _root(data_dir)
    build = f"python -m dmae_jax.prepare --dataset={name} --data_dir={root}"
    if name == "imagenet2012":
        manual = os.path.join(root, "downloads", "manual")
        return (
            "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
            f"https://image-net.org/ into {manual}/ (TFDS cannot download ImageNet), then run "
            f"`{build} --manual_dir={manual}` (needs TensorFlow: pip install tensorflow-cpu, "
            "or dmae_jax's [prepare] extra; takes hours)"
        )
    return (f"`{build}` (needs TensorFlow: pip install tensorflow-cpu, or dmae_jax's [prepare] "
            "extra; and network access)")


def load_source(
    name: str, split: str, *, data_dir: str | None, image_size: int | None = None
) -> ImageLabelSource | ArraySource:
    """Random-access records of `name`/`split` (TFDS split syntax, e.g. "train[:90%]").

    `image_size` selects the digits resolution (default 32); other data sets keep their
    native sizes (cifar10 32x32, imagenet2012 variable) and ignore it. Digits splits up to
    IN_MEMORY_BYTES decoded (sizes up to about 110 px) come back as an in-memory ArraySource.
    """
    _check_name(name)
    tf_datasets = tfds()
    if name == "digits":
        from dmae_jax.data import digits  # a TFDS builder: imported with TFDS

        builder = digits.prepare(image_size or DEFAULT_DIGITS_SIZE, data_dir)
    else:
        builder = tf_datasets.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise DatasetNotFoundError(
                f"data set {name!r} is not prepared in data_dir {_root(data_dir)!r} "
                f"(looked for {os.fspath(builder.data_dir)}). Prepare it once: "
                f"{preparation_command(name, data_dir)}."
            )
    valid = sorted(builder.info.splits.keys())
    try:
        tf_datasets.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
    except (ValueError, KeyError, AssertionError) as e:
        raise ConfigError(
            f"split for data set {name!r} must be one of {valid} or a TFDS slice of one "
            f"(e.g. 'train[:90%]'), got {split!r}: {e}"
        ) from None
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError:
        raise DatasetNotFoundError(
            f"data set {name!r} in data_dir {_root(data_dir)!r} is prepared in a format "
            f"without random access ({builder.info.file_format}); dmae_jax reads ArrayRecord. "
            f"Prepare it again: {preparation_command(name, data_dir)}."
        ) from None
    records = ImageLabelSource(source, name, split)
    size = image_size or DEFAULT_DIGITS_SIZE
    if name == "digits" and len(records) * size * size * 3 <= IN_MEMORY_BYTES:
        return ArraySource.from_source(records)
    return records


# The TFDS feature that names each record as the official (torchvision) data sets do.
NAME_FEATURES = {"imagenet2012": "file_name", "cifar10": "id"}


def imagefolder_order(labels: Sequence[int], file_names: Sequence[str]) -> np.ndarray:
    """Record indices sorted as torchvision's `ImageFolder` lists the same files.

    ImageFolder sorts the class directories by name and, inside each, the file names; TFDS
    numbers the ImageNet classes by their sorted wnid directory names, so (label, file name)
    is that order.
    """
    if len(labels) != len(file_names):
        raise ValueError(f"{len(labels)} labels but {len(file_names)} file names")
    return np.array(sorted(range(len(labels)), key=lambda i: (int(labels[i]), file_names[i])),
                    np.int64)


def official_order(name: str, labels: Sequence[int], names: Sequence[str]) -> np.ndarray:
    """Record indices in the order the official code reads `name`: ImageFolder order for
    imagenet2012; for cifar10 the order of the original batch files (TFDS ids `test_00000`,
    ..., which TFDS stores shuffled), i.e. torchvision's `CIFAR10` order."""
    if name == "imagenet2012":
        return imagefolder_order(labels, names)
    if name == "cifar10":
        return np.array(sorted(range(len(names)), key=lambda i: names[i]), np.int64)
    raise ValueError(f"data set must be one of {sorted(NAME_FEATURES)}, got {name!r}")


@functools.lru_cache(maxsize=4)  # a resumed certification reads them to check and to run
def labels_and_names(
    name: str, split: str, *, data_dir: str | None, chunk: int = 1000
) -> tuple[np.ndarray, list[str]]:
    """(labels [N], record names) of a TFDS split, without decoding images.

    Names are the `NAME_FEATURES` feature (ImageNet file name, CIFAR-10 id). Reads the whole
    split once (ImageNet validation: about 6.4 GB from the data dir, a minute or so).
    """
    if name not in NAME_FEATURES:
        raise ValueError(f"data set must be one of {sorted(NAME_FEATURES)}, got {name!r}")
    tf_datasets = tfds()
    builder = tf_datasets.builder(name, data_dir=data_dir)
    source = builder.as_data_source(
        split=split, decoders={"image": tf_datasets.decode.SkipDecoding()})
    labels, names = [], []
    for start in range(0, len(source), chunk):
        for record in source.__getitems__(range(start, min(start + chunk, len(source)))):
            value = record[NAME_FEATURES[name]]
            names.append(value.decode() if isinstance(value, bytes) else str(value))
            labels.append(int(record["label"]))
    return np.array(labels, np.int64), names


def official_subset(
    num_records: int, name: str, split: str, *, skip: int, stop: int, data_dir: str | None
) -> list[tuple[int, str]]:
    """[(record index, record name)] of every `skip`-th record, positions 0 to `stop` (-1:
    all), in the official code's order (`official_order`), as `certify.py`'s
    `sample_interval`: on ImageNet validation skip 50 gives the first file of each class.
    digits has no official order: its stored order, named by record index.
    """
    stop = num_records if stop < 0 else min(stop, num_records)
    if name not in NAME_FEATURES:
        return [(i, str(i)) for i in range(0, stop, skip)]
    labels, names = labels_and_names(name, split, data_dir=data_dir)
    if len(labels) != num_records:
        raise DatasetError(f"{name}/{split}: {len(labels)} names for {num_records} records")
    order = official_order(name, labels, names)
    return [(int(i), names[i]) for i in order[0:stop:skip]]


def num_classes(name: str) -> int:
    """Number of classes of data set `name`."""
    _check_name(name)
    return NUM_CLASSES[name]


def num_examples(name: str, split: str) -> int:
    """Number of records in `name`/`split` (TFDS split syntax), without reading the data."""
    _check_name(name)
    tf_datasets = tfds()
    infos = {
        s: tf_datasets.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0)
        for s, n in NUM_EXAMPLES[name].items()
    }
    try:
        instructions = tf_datasets.core.ReadInstruction.from_spec(split).to_absolute(infos)
    except (ValueError, KeyError, AssertionError) as e:
        raise ConfigError(
            f"split for data set {name!r} must be one of {sorted(infos)} or a TFDS slice of "
            f"one (e.g. 'train[:90%]'), got {split!r}: {e}"
        ) from None
    total = 0
    for ins in instructions:
        total += (ins.to if ins.to is not None else NUM_EXAMPLES[name][ins.splitname]) - (
            ins.from_ or 0
        )
    return total
