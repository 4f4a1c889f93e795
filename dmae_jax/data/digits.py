"""TFDS builder `digits`: scikit-learn's 1797 handwritten 8x8 digits as upscaled RGB images.

The data ship inside scikit-learn, so preparing this data set needs no network. Each 8x8
image (values 0..16, ink bright on a dark background) is scaled to 0..255, upscaled with
PIL bicubic to `image_size` x `image_size` and repeated over 3 channels.

Split (fixed, deterministic, stratified, no RNG involved): within each class, in
scikit-learn's order, every 6th example (positions 5, 11, 17, ... of that class) goes to
`test`, the rest to `train`. That gives 1501 train and 296 test examples, 29-30 test
examples per class.

Images are yielded as PIL images, which TFDS encodes to PNG without TensorFlow.
"""

from collections.abc import Iterator

import numpy as np
import PIL.Image

from dmae_jax import storage
from dmae_jax.data import datasets

tfds = datasets.tfds()  # the builder is a TFDS builder: importing it loads TFDS

NUM_CLASSES = datasets.NUM_CLASSES["digits"]
TEST_EVERY = 6  # 1 in TEST_EVERY examples of each class is a test example.
NUM_EXAMPLES = datasets.NUM_EXAMPLES["digits"]


class DigitsConfig(tfds.core.BuilderConfig):
    """Builder config: the side length of the upscaled square images."""

    def __init__(self, *, image_size: int, **kwargs):
        datasets.check_digits_size(image_size, "digits image_size")
        super().__init__(name=config_name(image_size), **kwargs)
        self.image_size = image_size


def config_name(image_size: int) -> str:
    """Name of the builder config for `image_size`, e.g. 32 -> "32px"."""
    return f"{image_size}px"


def split_indices() -> dict[str, np.ndarray]:
    """Indices into scikit-learn's digits of the `train` and `test` splits (sorted)."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        is_test[members[TEST_EVERY - 1 :: TEST_EVERY]] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def upscale(image_8x8: np.ndarray, image_size: int) -> np.ndarray:
    """One 8x8 digit (values 0..16) -> uint8 [image_size, image_size, 3], PIL bicubic."""
    gray = np.round(np.asarray(image_8x8, np.float64) * (255.0 / 16.0)).astype(np.uint8)
    big = PIL.Image.fromarray(gray).resize((image_size, image_size), PIL.Image.Resampling.BICUBIC)
    return np.repeat(np.asarray(big)[:, :, None], 3, axis=2)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits, upscaled to RGB `image_size` squares."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [DigitsConfig(image_size=s) for s in (8, 16, 32, 64, 224)]
    DEFAULT_CONFIG_NAME = config_name(32)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "index": np.int32,
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ship with scikit-learn.
        return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

    def _generate_examples(self, indices: np.ndarray) -> Iterator[tuple[int, dict]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        size = self.builder_config.image_size
        for i in indices:
            rgb = upscale(digits.images[i], size)
            yield (
                int(i),
                {
                    "image": PIL.Image.fromarray(rgb),
                    "label": int(digits.target[i]),
                    "index": int(i),
                },
            )


def builder(image_size: int = 32, data_dir: str | None = None) -> Digits:
    """A `Digits` builder for any `image_size` (not only the registered configs)."""
    registered = {c.name for c in Digits.BUILDER_CONFIGS}
    name = config_name(image_size)
    config = name if name in registered else DigitsConfig(image_size=image_size)
    return Digits(config=config, data_dir=data_dir)


def prepare(image_size: int = 32, data_dir: str | None = None) -> Digits:
    """Builder for `image_size`, prepared as ArrayRecord in `data_dir` if not already there.

    A gs:// `data_dir` is prepared in a local directory and uploaded (ArrayRecord reads
    gs:// but cannot write it; `storage.staged_upload`).
    """
    b = builder(image_size, data_dir)
    if not b.is_prepared() and storage.is_gcs(data_dir):
        with storage.staged_upload(data_dir, last=storage.TFDS_COMMIT_FILES) as local:
            prepare(image_size, local)
        b = builder(image_size, data_dir)
    if not b.is_prepared():
        tfds.disable_progress_bar()  # a few seconds of work: the bars would be escape codes
        try:
            b.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
        except FileExistsError:
            # Another process (e.g. of a multi-process run) finished preparing it first.
            b = builder(image_size, data_dir)
            if not b.is_prepared():
                raise
    return b
