"""Specification of the input pipeline: digits builder, sources, Grain iterators, augmentation."""

import json
import math
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dmae_jax.data import augment, datasets, digits, pipeline

DIGITS_SIZE = 16  # Small, so preparing the data set takes about a second.


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    """A data dir with digits prepared at DIGITS_SIZE, with every network connection refused."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    mp = pytest.MonkeyPatch()

    def no_network(*args, **kwargs):
        raise OSError("network access during digits preparation")

    mp.setattr(socket.socket, "connect", no_network)
    try:
        digits.prepare(DIGITS_SIZE, data_dir)
    finally:
        mp.undo()
    return data_dir


def synthetic_source(n: int = 40, size: int = 12) -> datasets.ArraySource:
    """n random images whose label is their index, so batches show which records they hold."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return datasets.ArraySource(images, np.arange(n), "synthetic", "train")


def take(iterator, k: int) -> list[dict]:
    """The next k batches of `iterator`."""
    return [next(iterator) for _ in range(k)]


def train(source, **kwargs) -> pipeline.TrainIterator:
    """A train iterator with test defaults (8 per global batch, RRC+flip to 8 px, 1 process)."""
    args = dict(
        global_batch_size=8,
        seed=3,
        augment="rrc_flip",
        image_size=8,
        process_index=0,
        process_count=1,
    )
    return pipeline.train_iterator(source, **{**args, **kwargs})


# ----------------------------------------------------------------------------- digits


def test_digits_prepares_offline_with_fixed_stratified_split(digits_dir):
    from sklearn.datasets import load_digits

    sk = load_digits()
    builder = digits.prepare(DIGITS_SIZE, digits_dir)
    assert builder.is_prepared()
    assert os.fspath(builder.data_dir).startswith(digits_dir)
    test_counts = np.bincount(sk.target[digits.split_indices()["test"]], minlength=10)
    assert test_counts.min() >= 29 and test_counts.max() <= 30
    for split, n in digits.NUM_EXAMPLES.items():
        raw = builder.as_data_source(split)
        assert len(raw) == n == datasets.num_examples("digits", split)
        record = raw[0]
        expected = digits.upscale(sk.images[record["index"]], DIGITS_SIZE)
        np.testing.assert_array_equal(record["image"], expected)
        assert record["label"] == sk.target[record["index"]]
    train_ids = {int(r["index"]) for r in builder.as_data_source("train")}
    test_ids = {int(r["index"]) for r in builder.as_data_source("test")}
    assert not train_ids & test_ids and len(train_ids | test_ids) == 1797


def test_digits_images_are_gray_rgb_uint8_with_real_labels(digits_dir):
    source = datasets.load_source("digits", "test", data_dir=digits_dir, image_size=DIGITS_SIZE)
    assert len(source) == 296
    record = source[5]
    image = record["image"]
    assert image.shape == (DIGITS_SIZE, DIGITS_SIZE, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert image.max() > 200  # ink is bright
    labels = [source[i]["label"] for i in range(len(source))]
    assert set(labels) == set(range(10))


def test_digits_preparation_is_deterministic(digits_dir, tmp_path):
    again = datasets.load_source("digits", "train", data_dir=str(tmp_path), image_size=DIGITS_SIZE)
    first = datasets.load_source("digits", "train", data_dir=digits_dir, image_size=DIGITS_SIZE)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)


def test_reading_digits_through_the_pipeline_never_imports_tensorflow(digits_dir):
    code = (
        "import sys\n"
        "from dmae_jax.data import datasets, pipeline\n"
        f"s = datasets.load_source('digits', 'train', data_dir={digits_dir!r}, "
        f"image_size={DIGITS_SIZE})\n"
        "b = next(pipeline.train_iterator(s, global_batch_size=4, seed=0, augment='rrc_flip', "
        f"image_size={DIGITS_SIZE}, process_index=0, process_count=1))\n"
        "assert b['image'].shape == (4, 16, 16, 3), b['image'].shape\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------- datasets


def test_unknown_dataset_error_names_the_config_field_and_valid_names(tmp_path):
    with pytest.raises(ValueError, match=r"config\.data\.dataset.*'mnist'") as e:
        datasets.load_source("mnist", "train", data_dir=str(tmp_path))
    assert all(name in str(e.value) for name in datasets.DATASETS)


def test_missing_cifar10_says_how_to_prepare_it(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError) as e:
        datasets.load_source("cifar10", "train", data_dir=str(tmp_path))
    message = str(e.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert f"python -m dmae_jax.prepare --dataset=cifar10 --data_dir={tmp_path}" in message
    assert isinstance(e.value, datasets.DatasetError)


def test_missing_imagenet_names_the_manual_download_step(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError) as e:
        datasets.load_source("imagenet2012", "validation", data_dir=str(tmp_path))
    message = str(e.value)
    assert os.path.join(str(tmp_path), "downloads", "manual") in message
    assert "ILSVRC2012_img_val.tar" in message
    assert (f"python -m dmae_jax.prepare --dataset=imagenet2012 --data_dir={tmp_path} "
            f"--manual_dir={os.path.join(str(tmp_path), 'downloads', 'manual')}") in message


def test_split_strings_follow_tfds_slicing(digits_dir):
    assert datasets.num_examples("cifar10", "train[:90%]") == 45_000
    assert datasets.num_examples("cifar10", "train[90%:]") == 5_000
    assert datasets.num_examples("imagenet2012", "validation") == 50_000
    assert datasets.num_examples("cifar10", "train+test") == 60_000
    source = datasets.load_source(
        "digits", "train[:100]", data_dir=digits_dir, image_size=DIGITS_SIZE
    )
    assert len(source) == 100
    with pytest.raises(ValueError, match=r"one of \['test', 'train'\].*got 'validation'"):
        datasets.load_source("digits", "validation", data_dir=digits_dir, image_size=DIGITS_SIZE)
    with pytest.raises(ValueError, match="'validation'"):
        datasets.num_examples("cifar10", "validation")
    assert datasets.num_classes("imagenet2012") == 1000 and datasets.num_classes("digits") == 10


# ----------------------------------------------------------------------------- training order


def test_batches_are_float_images_in_unit_range_and_int32_labels():
    batch = next(train(synthetic_source()))
    assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32


def test_same_seed_gives_same_batches_and_another_seed_differs():
    source = synthetic_source()
    a, b = take(train(source), 6), take(train(source), 6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    c = take(train(source, seed=4), 6)
    assert any(not np.array_equal(x["label"], y["label"]) for x, y in zip(a, c, strict=True))


def test_each_epoch_is_a_fresh_permutation_without_its_remainder():
    source = synthetic_source(n=43)  # 5 global batches of 8 per epoch, 3 records dropped
    iterator = train(source)
    assert iterator.steps_per_epoch == 5
    epochs = [np.concatenate([b["label"] for b in take(iterator, 5)]) for _ in range(3)]
    for labels in epochs:
        assert len(set(labels.tolist())) == 40  # no record twice within an epoch
    assert not np.array_equal(epochs[0], epochs[1])
    assert iterator.epoch == 3.0


def test_augmentation_differs_between_epochs_for_the_same_record():
    source = synthetic_source(n=8)  # one batch per epoch: every record in every batch
    first, second = take(train(source, global_batch_size=8), 2)
    order0, order1 = np.argsort(first["label"]), np.argsort(second["label"])
    assert not np.array_equal(first["image"][order0], second["image"][order1])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_get_disjoint_slices_that_assemble_the_global_batch(process_count):
    source = synthetic_source()
    reference = take(train(source), 7)  # one process: the whole global batch
    locals_ = [
        take(train(source, process_index=p, process_count=process_count), 7)
        for p in range(process_count)
    ]
    for step, global_batch in enumerate(reference):
        parts = [locals_[p][step] for p in range(process_count)]
        labels = [part["label"] for part in parts]
        assert all(len(x) == 8 // process_count for x in labels)
        assert len(set(np.concatenate(labels).tolist())) == 8  # disjoint
        np.testing.assert_array_equal(np.concatenate(labels), global_batch["label"])
        np.testing.assert_array_equal(
            np.concatenate([part["image"] for part in parts]), global_batch["image"]
        )


def test_state_resumes_the_exact_next_batch_after_a_json_round_trip():
    source = synthetic_source()
    iterator = train(source)
    take(iterator, 7)  # into the second epoch
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 3)
    resumed = train(source, start_state=state)
    for x, y in zip(expected, take(resumed, 3), strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    iterator.set_state(state)  # rewinding an iterator in place works too
    np.testing.assert_array_equal(next(iterator)["label"], expected[0]["label"])


def test_state_saved_by_one_process_resumes_on_two():
    source = synthetic_source()
    single = train(source)
    take(single, 3)
    state = single.get_state()
    expected = next(single)["label"]
    halves = [
        next(train(source, process_index=p, process_count=2, start_state=state))["label"]
        for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(halves), expected)


def test_state_of_another_pipeline_is_rejected():
    source = synthetic_source()
    state = train(source).get_state()
    with pytest.raises(ValueError, match="seed must be 4"):
        train(source, seed=4, start_state=state)
    with pytest.raises(ValueError, match="global_batch_size must be 16"):
        train(source, global_batch_size=16, start_state=state)


def test_worker_processes_produce_the_same_batches():
    source = synthetic_source()
    expected = take(train(source), 5)
    with_workers = train(source, worker_count=2)
    try:
        got = take(with_workers, 5)
    finally:
        with_workers.close()
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


class RecordsOnly:
    """`source` seen as a plain random-access sequence of records (no `images` array)."""

    def __init__(self, source):
        self.source, self.name = source, source.name

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return self.source[index]


@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 2)])
def test_in_memory_source_without_augmentation_gives_the_grain_pipelines_batches(
        process_index, process_count):
    source = synthetic_source(n=21, size=8)
    args = dict(augment="none", process_index=process_index, process_count=process_count)
    fast, grain_made = train(source, **args), train(RecordsOnly(source), **args)
    assert fast._arrays is not None and grain_made._arrays is None, "paths not as tested"
    # 2 batches per epoch: 5 epochs, each a fresh permutation.
    for a, b in zip(take(fast, 4) + [fast.next_batches(6)], take(grain_made, 4)
                    + [grain_made.next_batches(6)], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
    state = fast.get_state()
    expected = fast.next_batches(3)
    resumed = train(source, **args, start_state=state).next_batches(3)
    assert expected["image"].shape == (3, 8 // process_count, 8, 8, 3)
    np.testing.assert_array_equal(resumed["image"], expected["image"])
    np.testing.assert_array_equal(resumed["label"], expected["label"])


def test_invalid_arguments_are_named():
    source = synthetic_source()
    with pytest.raises(ValueError, match="multiple of process_count=3, got 8"):
        train(source, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="augment must be one of.*'randaug'"):
        train(source, augment="randaug")
    with pytest.raises(ValueError, match=r"number of records \(40\), got 64"):
        train(source, global_batch_size=64)


def test_flip_only_keeps_pixels_or_mirrors_them():
    source = synthetic_source(size=8)
    batch = next(train(source, augment="flip", global_batch_size=40))
    flipped = 0
    for image, label in zip(batch["image"], batch["label"], strict=True):
        original = source[int(label)]["image"].astype(np.float32) / 255.0
        if np.array_equal(image, original[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(image, original)
    assert 5 <= flipped <= 35


# ----------------------------------------------------------------------------- augmentation


def test_rrc_crops_cover_20_to_100_percent_with_ratio_3_4_to_4_3():
    rng = np.random.default_rng(0)
    size = 1000  # large, so integer rounding of the box barely moves area and ratio
    boxes = np.array([augment.rrc_params(rng, size, size) for _ in range(4000)])
    top, left, h, w = boxes.T
    area = h * w / size**2
    assert area.min() >= 0.2 - 0.005 and area.max() <= 1.0
    assert area.min() < 0.21 and area.max() > 0.97
    # Sampled ~ U(0.2, 1) (mean 0.6), but large boxes of extreme ratio do not fit and are
    # drawn again, which pulls the mean down a little.
    assert 0.5 < area.mean() < 0.6
    ratio = w / h
    assert ratio.min() >= 0.75 - 0.01 and ratio.max() <= 4 / 3 + 0.01
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= size).all() and (left + w <= size).all()


def test_rrc_falls_back_to_a_center_crop_clamped_to_the_ratio_range():
    rng = np.random.default_rng(0)
    # A 10 x 1000 strip: no sampled box fits, so torchvision's fallback applies.
    assert augment.rrc_params(rng, 10, 1000) == (0, (1000 - 13) // 2, 10, 13)
    assert augment.rrc_params(rng, 1000, 10) == ((1000 - 13) // 2, 0, 13, 10)


def test_rrc_flip_is_deterministic_given_the_generator():
    image = synthetic_source(size=40)[0]["image"]
    a = augment.rrc_flip(image, 24, np.random.default_rng(7))
    b = augment.rrc_flip(image, 24, np.random.default_rng(7))
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_center_crop_resize_is_resize_shorter_side_to_256_then_crop_224():
    import PIL.Image

    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    out = augment.center_crop_resize(image, 224)
    # Resize(256): short side 375 -> 256, long side int(256 * 500 / 375) = 341.
    resized = np.asarray(
        PIL.Image.fromarray(image).resize((341, 256), PIL.Image.Resampling.BICUBIC)
    )
    top, left = round((256 - 224) / 2), round((341 - 224) / 2)
    np.testing.assert_array_equal(out, resized[top : top + 224, left : left + 224])
    assert augment.center_crop_resize(image.transpose(1, 0, 2), 224).shape == (224, 224, 3)


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_record_once_and_pad_with_mask_zero(process_count):
    source = synthetic_source(n=23, size=8)
    per_process = [
        list(
            pipeline.eval_batches(
                source, batch_size=8, image_size=8, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    assert all(len(batches) == 3 for batches in per_process)  # ceil(23 / 8), same everywhere
    local = 8 // process_count
    rows = {"index": [], "label": [], "mask": []}
    for batches in per_process:
        for batch in batches:
            assert batch["image"].shape == (local, 8, 8, 3)
            for key in rows:
                rows[key].append(batch[key])
            padding = batch["mask"] == 0
            assert (batch["index"][padding] == -1).all() and (batch["label"][padding] == -1).all()
            assert (batch["image"][padding] == 0).all()
    index, label, mask = (np.concatenate(rows[k]) for k in ("index", "label", "mask"))
    assert mask.sum() == 23
    assert sorted(index[mask == 1].tolist()) == list(range(23))
    np.testing.assert_array_equal(index[mask == 1], label[mask == 1])


def test_eval_subset_every_kth_record_in_fixed_order():
    source = synthetic_source(n=23, size=8)
    batches = list(
        pipeline.eval_batches(
            source, batch_size=4, image_size=8, process_index=0, process_count=1, start=1, step=5
        )
    )
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(index[mask == 1], [1, 6, 11, 16, 21])
    image = batches[0]["image"][1]
    np.testing.assert_array_equal(image, source[6]["image"] / np.float32(255.0))


def test_eval_resizes_records_of_another_size_with_the_center_crop():
    source = synthetic_source(n=3, size=12)
    batch = next(
        pipeline.eval_batches(source, batch_size=4, image_size=8, process_index=0, process_count=1)
    )
    expected = augment.center_crop_resize(source[0]["image"], 8) / np.float32(255.0)
    np.testing.assert_array_equal(batch["image"][0], expected)


def test_global_batch_shards_every_leaf_over_the_batch_axes():
    from dmae_jax import parallel

    mesh = parallel.make_mesh()
    batch = next(train(synthetic_source(), global_batch_size=jax.device_count() * 2))
    global_batch = parallel.global_batch(batch, mesh)
    assert global_batch["image"].shape == batch["image"].shape
    assert global_batch["label"].sharding.spec == P(parallel.BATCH_AXES)
    assert len(global_batch["image"].sharding.device_set) == jax.device_count()
    np.testing.assert_array_equal(np.asarray(global_batch["label"]), batch["label"])
    assert math.isclose(
        float(global_batch["image"].sum()), float(batch["image"].sum()), rel_tol=1e-5
    )
