"""The official protocols against golden fixtures made by the official tools.

tests/fixtures/make_fixtures.py wrote tests/fixtures/protocol/ once with torchvision 0.29.1,
timm 0.5.4 and Pillow (the official fine-tuning and certification transforms, RandAugment,
RandomResizedCrop, Mixup/CutMix, the bicubic upsampling); these tests compare our code with
those files and need none of those packages except Pillow.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from dmae_jax import architectures
from dmae_jax.data import augment, datasets, pipeline, randaugment, resize
from dmae_jax.models import linprobe
from dmae_jax.train import mixup

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "protocol")


def fixture_json(name: str) -> dict:
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def fixture_npz(name: str) -> dict:
    with np.load(os.path.join(FIXTURES, name)) as data:
        return dict(data)


# ------------------------------------------------------------------ certification input


def test_imagenet_certification_input_equals_torchvision_resize_256_center_crop_224():
    expected = fixture_npz("eval_input.npz")
    assert len(expected) == 6
    for name, want in expected.items():
        with PIL.Image.open(os.path.join(FIXTURES, "jpeg", name)) as img:
            image = np.asarray(img.convert("RGB"))  # ImageFolder's loader
        got = augment.eval_image(image, "imagenet2012", 224)
        np.testing.assert_array_equal(got, want, err_msg=name)
        x = augment.certification_input(image, "imagenet2012", 224)
        assert x.dtype == np.float32 and x.shape == (224, 224, 3)
        np.testing.assert_allclose(x, want / np.float32(255), atol=1e-7)


def test_cifar_and_digits_certification_input_is_the_stored_image():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(augment.certification_input(image, "cifar10", 32) * 255,
                                  image.astype(np.float32))
    with pytest.raises(ValueError, match="image_size"):
        augment.certification_input(image, "digits", 16)


def test_resize_rounding_and_crop_offsets_are_torchvision_s():
    assert augment.resized_shape(375, 500, 256) == (256, 341)   # int(341.33)
    assert augment.resized_shape(500, 333, 256) == (384, 256)   # int(384.38)
    assert augment.resized_shape(199, 211, 256) == (256, 271)   # int(271.44)
    assert augment.center_crop_box(256, 341, 224) == (16, 58)   # round(58.5) = 58 (even)
    assert augment.center_crop_box(256, 271, 224) == (16, 24)   # round(23.5) = 24


# ------------------------------------------------------------------ certified images


def test_imagefolder_order_from_labels_and_file_names():
    fixture = fixture_json("imagefolder.json")
    samples = fixture["samples"]
    assert fixture["classes"] == sorted(fixture["classes"])  # = TFDS's label numbering
    shuffled = np.random.default_rng(0).permutation(len(samples))
    labels = [samples[i]["label"] for i in shuffled]
    names = [samples[i]["file_name"] for i in shuffled]
    order = datasets.imagefolder_order(labels, names)
    got = [(labels[i], names[i]) for i in order]
    assert got == [(s["label"], s["file_name"]) for s in samples]
    np.testing.assert_array_equal(datasets.official_order("imagenet2012", labels, names), order)


def test_cifar10_order_is_the_original_batch_order_of_tfds_ids():
    ids = ["test_00002", "test_00000", "test_00010", "test_00001"]
    np.testing.assert_array_equal(datasets.official_order("cifar10", [0] * 4, ids), [1, 3, 0, 2])


def test_digits_subset_is_every_skip_th_record_in_stored_order():
    assert datasets.official_subset(10, "digits", "test", skip=3, stop=-1, data_dir=None) == [
        (0, "0"), (3, "3"), (6, "6"), (9, "9")]
    assert datasets.official_subset(10, "digits", "test", skip=3, stop=5, data_dir=None) == [
        (0, "0"), (3, "3")]


# ------------------------------------------------------------------ RandAugment


def test_randaugment_is_the_transform_main_finetune_builds():
    spec = fixture_json("randaugment.json")
    assert tuple(spec["ops"]) == randaugment.OPS
    assert spec["probs"] == [0.5] * len(randaugment.OPS)
    ra = randaugment.RAND_M9_MSTD05_INC1
    assert (spec["magnitude"], spec["magnitude_std"], spec["num_layers"]) == (
        ra.magnitude, ra.magnitude_std, ra.num_layers)
    assert spec["magnitude_max"] is None and spec["choice_weights"] is None  # uniform choice
    assert tuple(spec["fill"]) == randaugment.FILL
    assert spec["resample"] == PIL.Image.Resampling.BICUBIC
    assert tuple(spec["rrc"]["scale"]) == randaugment.FINETUNE_RRC_SCALE
    assert tuple(spec["rrc"]["ratio"]) == augment.RRC_RATIO
    assert spec["rrc"]["interpolation"].endswith("BICUBIC") and spec["flip_p"] == 0.5
    # RandomErasing is in timm's final part, which util/datasets.py discards.
    assert spec["final"] == ["ToTensor", "Normalize", "RandomErasing"]


def test_each_randaugment_op_equals_timm_at_fixed_magnitude_and_sign():
    spec = fixture_json("randaugment.json")
    outputs = fixture_npz("randaugment.npz")
    image = PIL.Image.fromarray(outputs["image"])
    assert len(spec["cases"]) == 15 * 4 * 2
    for case in spec["cases"]:
        arg = randaugment.op_argument(case["op"], case["magnitude"], case["negate"])
        assert ([] if arg is None else [pytest.approx(arg, abs=1e-12)]) == case["args"], case
        got = np.asarray(randaugment.apply_op(image, case["op"], arg))
        if case["error"]:  # posterize to 0 bits: new Pillow raises, the papers' gave black
            assert case["op"] == "PosterizeIncreasing" and arg == 0
            assert not got.any()
        else:
            np.testing.assert_array_equal(got, outputs[case["key"]], err_msg=case["key"])


def test_randaugment_draws_follow_timm_s_distributions():
    ra = randaugment.RandAugment()
    rng = np.random.default_rng(0)
    plans = [ra.draw(rng) for _ in range(4000)]
    applied = [op for plan in plans for op in plan]
    assert abs(len(applied) / (2 * len(plans)) - 0.5) < 0.02     # each op: probability 0.5
    counts = np.array([sum(name == op for name, _ in applied) for op in randaugment.OPS])
    assert counts.min() > 0.75 * counts.mean()                   # uniform choice of 15 ops
    rot = np.array([arg for name, arg in applied if name == "Rotate"])
    mags = np.abs(rot) / 3.0                                      # |angle| = 3 * magnitude
    assert abs(mags.mean() - 9.0) < 0.05 and abs(mags.std() - 0.5) < 0.06
    assert mags.max() <= 10.0 and abs((rot < 0).mean() - 0.5) < 0.06


def test_finetune_transform_is_deterministic_and_224():
    image = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    a = randaugment.finetune_train_transform(image, 224, np.random.default_rng([3, 0, 7]))
    b = randaugment.finetune_train_transform(image, 224, np.random.default_rng([3, 0, 7]))
    c = randaugment.finetune_train_transform(image, 224, np.random.default_rng([3, 1, 7]))
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pipeline_offers_the_finetune_augmentation():
    rng = np.random.default_rng(0)
    source = datasets.ArraySource(rng.integers(0, 256, (8, 20, 24, 3), dtype=np.uint8),
                                  np.arange(8), "synthetic", "train")
    it = pipeline.train_iterator(source, global_batch_size=4, seed=0, augment="rrc_flip_randaug",
                                 image_size=16, process_index=0, process_count=1)
    batch = next(it)
    assert batch["image"].shape == (4, 16, 16, 3)
    again = next(pipeline.train_iterator(
        source, global_batch_size=4, seed=0, augment="rrc_flip_randaug", image_size=16,
        process_index=0, process_count=1))
    np.testing.assert_array_equal(batch["image"], again["image"])


# ------------------------------------------------------------------ RandomResizedCrop


class ScriptedRng:
    """np.random.Generator stand-in returning scripted uniforms (as fractions) and integers."""

    def __init__(self, uniforms, ints):
        self.uniforms, self.ints = list(uniforms), list(ints)

    def uniform(self, low, high):
        return low + (high - low) * self.uniforms.pop(0)

    def integers(self, low, high):
        value = self.ints.pop(0)
        assert low <= value < high
        return value


def test_rrc_boxes_equal_timm_for_the_same_draws():
    spec = fixture_json("rrc.json")
    assert len(spec["cases"]) == 36
    for case in spec["cases"]:
        rng = ScriptedRng(case["uniforms"], case["ints"])
        box = augment.rrc_params(rng, case["height"], case["width"], tuple(spec["scale"]),
                                 tuple(spec["ratio"]))
        assert list(box) == case["box"], case
        assert not rng.uniforms and not rng.ints  # the same number of draws


def test_rrc_crop_and_bicubic_resize_equal_torchvision(monkeypatch):
    spec = fixture_json("rrc.json")["crop"]
    arrays = fixture_npz("rrc.npz")
    monkeypatch.setattr(augment, "rrc_params", lambda *a, **k: (
        spec["top"], spec["left"], spec["height"], spec["width"]))
    got = augment.random_resized_crop(arrays["image"], spec["size"], rng=None)
    np.testing.assert_array_equal(got, arrays["crop"])


def test_rrc_scale_distribution_at_0_08():
    rng = np.random.default_rng(0)
    fractions = np.array([np.prod(augment.rrc_params(rng, 300, 400, (0.08, 1.0))[2:]) / 120_000
                          for _ in range(3000)])
    assert fractions.min() >= 0.075 and fractions.max() <= 1.0
    assert np.mean(fractions < 0.2) > 0.1  # the pretraining scale (0.2, 1) never goes there


# ------------------------------------------------------------------ Mixup / CutMix


def test_mixup_cutmix_images_and_targets_equal_timm_for_the_same_params():
    data = fixture_npz("mixup.npz")
    apply_mix = jax.jit(mixup.apply_mix)
    kinds = set()
    for seed in range(8):
        x, y = data[f"x{seed}"], data[f"y{seed}"]
        lam, cut, cy, cx, *box = data[f"params{seed}"]
        n, height, width = x.shape[:3]
        if cut:
            got_box = mixup.bbox_from_center(jnp.int32(cy), jnp.int32(cx), jnp.float32(lam),
                                             height=height, width=width)
            assert [int(b) for b in got_box] == [int(b) for b in box]
            yl, yh, xl, xh = (int(b) for b in box)
            lam = 1.0 - (yh - yl) * (xh - xl) / (height * width)
        kinds.add(bool(cut))
        mixed = apply_mix(jnp.asarray(x), jnp.full((n,), jnp.float32(lam)),
                          jnp.full((n,), bool(cut)), tuple(jnp.full((n,), int(b)) for b in box))
        np.testing.assert_allclose(mixed, data[f"mixed{seed}"], atol=1e-6)
        targets = mixup.mixup_target(jnp.asarray(y), 10, jnp.float32(lam), 0.1)
        np.testing.assert_allclose(targets, data[f"target{seed}"], atol=1e-6)
    assert kinds == {True, False}  # both Mixup and CutMix batches are covered


def test_grouped_mixup_mixes_each_device_group_on_its_own():
    b, g, copies, classes = 8, 4, 2, 5
    images = jax.random.uniform(jax.random.key(0), (copies * b, 4, 4, 3))
    labels = jnp.tile(jnp.arange(b) % classes, copies)
    rng = jax.random.key(1)
    kwargs = dict(num_classes=classes, label_smoothing=0.1)
    mixed, targets = jax.jit(functools.partial(
        mixup.mixup_fn, group_size=g, copies=copies, **kwargs))(images, labels, rng)
    mix = jax.jit(functools.partial(mixup.mix, **kwargs))
    keys = jax.random.split(rng, b // g)
    for k in range(b // g):
        rows = np.concatenate([np.arange(c * b + k * g, c * b + (k + 1) * g)
                               for c in range(copies)])   # [copy 0 of group k; copy 1 ...]
        want_x, want_t, _, _ = mix(images[rows], labels[rows], keys[k])
        np.testing.assert_allclose(mixed[rows], want_x, atol=1e-6)
        np.testing.assert_allclose(targets[rows], want_t, atol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        mixup.mixup_fn(images, labels, rng, group_size=3, copies=copies, **kwargs)


# ------------------------------------------------------------------ 32 -> 224 bicubic


def test_upsampling_kernel_is_torch_antialias_false_and_torchvision_0_17_differs():
    maps = fixture_npz("resize.npz")
    old = resize.bicubic_matrix(32, 224, antialias=False)
    new = resize.bicubic_matrix(32, 224, antialias=True)
    np.testing.assert_allclose(old, maps["torch_antialias_false"], atol=2e-6)
    np.testing.assert_allclose(new, maps["torchvision_resize_new"], atol=5e-6)
    assert np.abs(maps["torch_antialias_false"] - maps["torchvision_resize_new"]).max() > 0.01
    np.testing.assert_allclose(resize.bicubic_matrix(37, 16, antialias=True),
                               maps["torch_antialias_down"], atol=5e-6)


@pytest.mark.parametrize("upsample,fixture", [("bicubic", "torch_antialias_false"),
                                              ("bicubic_antialias", "torchvision_resize_new")])
def test_model_upsample_switch_selects_the_fixture_kernel(upsample, fixture):
    """model.upsample picks the 32 -> 224 map inside the classifier and the DMAE."""
    from flax import nnx

    from dmae_jax import defaults
    from dmae_jax.models import classifier, dmae

    maps = fixture_npz("resize.npz")
    x = np.random.default_rng(3).random((2, 32, 32, 3), dtype=np.float32)
    want = np.einsum("oh,bhwc->bowc", maps[fixture], x)
    want = np.einsum("pw,bowc->bopc", maps[fixture], want)  # [2, 224, 224, 3]
    other = "torchvision_resize_new" if fixture == "torch_antialias_false" \
        else "torch_antialias_false"
    cfg = defaults.model("mu", img_size=224, patch_size=16, depth=1, decoder_width=32,
                         decoder_depth=1, decoder_heads=1, upsample=upsample)
    model = dmae.create_dmae(cfg, rngs=nnx.Rngs(0))
    got = np.asarray(model.preprocess(jnp.asarray(x)))
    np.testing.assert_allclose(got, np.asarray(model.preprocess(jnp.asarray(want))), atol=2e-5)
    assert np.abs(maps[other] - maps[fixture]).max() > 0.01  # the switch is observable

    clf = classifier.create_classifier(cfg, 10, rngs=nnx.Rngs(0))
    feats = np.asarray(clf.features(jnp.asarray(x)))
    np.testing.assert_allclose(feats, np.asarray(clf.features(jnp.asarray(want))), atol=1e-4)
    pre_other = np.einsum("pw,bowc->bopc", maps[other],
                          np.einsum("oh,bhwc->bowc", maps[other], x))
    assert np.abs(feats - np.asarray(clf.features(jnp.asarray(pre_other)))).max() > 1e-3


def test_model_upsample_default_is_the_papers_kernel_and_bad_values_are_named():
    from dmae_jax import defaults
    from dmae_jax.errors import ConfigError

    assert defaults.model("base").upsample == "bicubic"
    cfg = {"variant": "mu", "img_size": 32, "patch_size": 8}
    assert architectures.resolve_model_config(cfg)["upsample"] == "bicubic"
    with pytest.raises(ConfigError, match=r"model.upsample must be one of "
                                          r"\['bicubic', 'bicubic_antialias'\], got 'bilinear'"):
        architectures.resolve_model_config({**cfg, "upsample": "bilinear"})


# ------------------------------------------------------------------ linear probing


@functools.lru_cache(maxsize=1)
def _probe(rng_seed: int = 0):
    """A mu-size probe classifier initialised from a random mu DMAE, and the DMAE params
    (built once: the tests only read it, except for the BatchNorm statistics)."""
    import ml_collections
    from flax import nnx

    from dmae_jax import defaults
    from dmae_jax.models import create_classifier, create_dmae

    cfg = defaults.model("mu", img_size=16, patch_size=4, decoder_width=32, decoder_depth=1,
                         decoder_heads=2, global_pool=False)
    dmae = create_dmae(cfg, rngs=nnx.Rngs(rng_seed))
    dmae_params = nnx.state(dmae, nnx.Param).to_pure_dict()
    clf = create_classifier(ml_collections.ConfigDict(cfg), 7, rngs=nnx.Rngs(1))
    linprobe.make_probe(clf, dmae_params, jax.random.key(2))
    return clf, dmae_params, cfg


def test_probe_keeps_the_pretrained_norm_and_initialises_the_head_at_std_0_01():
    clf, dmae_params, _ = _probe()
    np.testing.assert_array_equal(clf.norm.scale.value, dmae_params["norm"]["scale"])
    np.testing.assert_array_equal(clf.norm.bias.value, dmae_params["norm"]["bias"])
    np.testing.assert_array_equal(clf.cls_token.value, dmae_params["cls_token"])
    kernel = np.asarray(clf.head.linear.kernel.value)
    assert 0.007 < kernel.std() < 0.013 and not np.asarray(clf.head.linear.bias.value).any()


def test_probe_batchnorm_trains_on_group_statistics_and_folds_for_export():
    from flax import nnx

    from dmae_jax import parallel
    from dmae_jax.models import ModelParts, create_classifier

    clf, _, cfg = _probe()
    images = jax.random.uniform(jax.random.key(3), (8, 16, 16, 3))
    feats = np.asarray(clf.features(images), np.float64)
    logits = np.asarray(clf.head.train_logits(jnp.asarray(feats, jnp.float32), group_size=4))
    kernel = np.asarray(clf.head.linear.kernel.value, np.float64)
    for g in range(2):  # BatchNorm1d(affine=False) in train mode, per group of 4
        f = feats[4 * g:4 * g + 4]
        z = (f - f.mean(0)) / np.sqrt(f.var(0) + linprobe.BN_EPS)
        np.testing.assert_allclose(logits[4 * g:4 * g + 4], z @ kernel, atol=2e-4)
    # The statistics training computes (sigma 0: the clean features), over two batches.
    mean, var = linprobe.estimate_statistics(
        ModelParts.split(clf), [{"image": np.asarray(images[:4])},
                                {"image": np.asarray(images[4:])}],
        num_batches=2, sigma=0.0, rng=jax.random.key(0), mesh=parallel.make_mesh(1))
    np.testing.assert_allclose(mean, feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, feats.var(0, ddof=1), rtol=1e-4, atol=1e-6)
    linprobe.set_statistics(clf, mean, var)
    probe_logits = np.asarray(clf(images))
    folded = linprobe.fold(nnx.state(clf, nnx.Param).to_pure_dict(), mean, var)
    plain = create_classifier(cfg, 7, rngs=nnx.Rngs(0))
    state = nnx.state(plain, nnx.Param)
    nnx.replace_by_pure_dict(state, folded)
    nnx.update(plain, state)
    np.testing.assert_allclose(np.asarray(plain(images)), probe_logits, atol=1e-4)


def test_linear_probe_crop_is_one_draw_clipped_to_the_image():
    # Area fraction ~1 at ratio 4/3 on a 100x80 image: w = round(sqrt(8000 * 4/3)) = 103
    # is clipped to 80, h = round(sqrt(8000 * 3/4)) = 77; then top in [0, 23], left = 0.
    rng = ScriptedRng([1.0, 1.0], [5, 0])
    assert augment.rrc_params_single_draw(rng, 100, 80) == (5, 0, 77, 80)
    for height, width in ((100, 80), (375, 500), (30, 200)):
        r = np.random.default_rng(0)
        for _ in range(200):
            top, left, h, w = augment.rrc_params_single_draw(r, height, width)
            assert 0 < h <= height and 0 < w <= width
            assert 0 <= top <= height - h and 0 <= left <= width - w
    image = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = augment.rrc_single_draw_flip(image, 16, np.random.default_rng(2))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


# ------------------------------------------------------------------ selection and subsets


def test_imagenet_subset_is_every_skip_th_image_in_imagefolder_order(monkeypatch):
    labels = np.array([2, 0, 1, 0, 2, 1, 0, 1, 2])
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (9, 5, 1, 2, 3, 7, 8, 4, 6)]
    monkeypatch.setattr(datasets, "labels_and_names", lambda *a, **k: (labels, names))
    subset = datasets.official_subset(9, "imagenet2012", "validation", skip=3, stop=-1,
                                      data_dir=None)
    # ImageFolder order: class 0 (files 2, 5, 8), class 1 (1, 4, 7), class 2 (3, 6, 9).
    assert subset == [(3, names[3]), (2, names[2]), (4, names[4])]
    assert [n[-9:-5] for _, n in subset] == ["0002", "0001", "0003"]


def test_eval_batches_follow_given_indices():
    source = datasets.ArraySource(np.zeros((10, 4, 4, 3), np.uint8), np.arange(10), "s", "test")
    batches = list(pipeline.eval_batches(source, batch_size=4, image_size=4, process_index=0,
                                         process_count=1, indices=[7, 2, 5]))
    assert batches[0]["index"].tolist() == [7, 2, 5, -1]
    assert batches[0]["label"].tolist() == [7, 2, 5, -1]
    with pytest.raises(ValueError, match="indices"):
        next(pipeline.eval_batches(source, batch_size=4, image_size=4, process_index=0,
                                   process_count=1, indices=[10]))


def test_best_export_keeps_the_best_value_across_restarts(tmp_path):
    import json as json_lib

    from dmae_jax.train import selection

    meta = {"kind": "classifier"}
    best = selection.BestExport(str(tmp_path), meta)
    params = {"w": jnp.ones((2,))}
    assert best.update(10, 0.5, params)
    assert not best.update(20, 0.4, {"w": jnp.zeros((2,))})
    assert not best.update(30, 0.5, {"w": jnp.zeros((2,))})  # ties keep the earlier one
    saved = json_lib.loads((tmp_path / "best" / "export" / "meta.json").read_text())
    assert saved["selection"] == {"metric": "eval_vote_acc", "value": 0.5, "step": 10}
    again = selection.BestExport(str(tmp_path), meta)
    assert again.best == 0.5 and again.update(40, 0.6, params)


def test_certification_runs_the_classifier_in_the_configured_dtype(tmp_path):
    from flax import nnx

    from dmae_jax import defaults, exports
    from dmae_jax.models import create_classifier
    from dmae_jax.tasks import certification as tasks

    cfg = defaults.model("mu", img_size=8, patch_size=4)
    clf = create_classifier(cfg, 3, rngs=nnx.Rngs(0))
    exports.save(tmp_path / "export", nnx.state(clf, nnx.Param).to_pure_dict(),
                 {"kind": "classifier", "model": cfg.to_dict(), "num_classes": 3})
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    f32, _ = tasks.load_classifier(str(tmp_path / "export"), dtype="float32")
    b16, _ = tasks.load_classifier(str(tmp_path / "export"), dtype="bfloat16")
    assert f32.args[0].keys() == b16.args[0].keys()  # the same weights, float32 both
    a, b = np.asarray(f32(x)), np.asarray(b16(x))
    assert a.dtype == b.dtype == np.float32
    assert 0 < np.abs(a - b).max() < 0.05 * max(np.abs(a).max(), 1e-3) + 1e-3
    np.testing.assert_array_equal(a, np.asarray(clf(x)))


def test_linear_probe_with_best_vote_selection_exports_plain_classifiers(tmp_path):
    """A few linear-probing steps on digits: BatchNorm statistics, group-wise training,
    evaluation on every 4th test image, the best and the last export both load as plain
    cls-token classifiers."""
    from flax import nnx

    from dmae_jax import defaults, exports, tasks
    from dmae_jax.models import classifier, create_dmae
    from dmae_jax.tasks import finetune

    cfg = defaults.digits_finetune(sigma=0.25)
    dmae = create_dmae(defaults.digits_pretrain().model, rngs=nnx.Rngs(0))
    exports.save(tmp_path / "dmae", nnx.state(dmae, nnx.Param).to_pure_dict(),
                 {"kind": "dmae", "model": defaults.digits_pretrain().model.to_dict()})
    cfg.data.data_dir = str(tmp_path / "tfds")
    cfg.model.global_pool = False
    cfg.data.augment = "rrc_single_flip"
    cfg.update(init_from=str(tmp_path / "dmae"), linear_probe=True, con_reg=False,
               num_noise_samples=1, batch_size=32, probe_bn_group_size=16,
               probe_stat_batches=2, total_steps=4, eval_every_steps=2, eval_skip=4,
               eval_noise_draws=2, select="best_vote", log_every_steps=2, ckpt_every_steps=4)
    cfg.optim.update(base_lr=0.5, weight_decay=0.0, warmup_epochs=0)
    _, cfg = tasks.prepare(cfg)
    finetune.run(cfg, str(tmp_path / "run"))
    for export in ("export", "best/export"):
        parts, meta = classifier.from_export(str(tmp_path / "run" / export), field="x")
        assert meta["model"]["global_pool"] is False
        assert set(parts.params["head"]) == {"kernel", "bias"}
    best_meta = exports.load(str(tmp_path / "run" / "best" / "export"))[1]
    assert best_meta["selection"]["metric"] == "eval_vote_acc"
    assert best_meta["selection"]["step"] in (2, 4)
