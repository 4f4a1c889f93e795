"""What a fresh install promises: a core without TensorFlow, TensorBoard files, data preparation.

The core (models, training step, certification, benchmarks) runs in a subprocess in which
TensorFlow, TFDS, Grain, CLU, PyTorch, TensorBoard, scikit-learn, matplotlib and PIL cannot
be imported. TensorBoard's own reader (EventAccumulator) reads what `dmae_jax.metrics`
writes, from a unit test and from a short training run. `python -m dmae_jax.prepare` builds
digits without TensorFlow and imagenet2012 from a fake manual directory of a few JPEGs.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import textwrap
import types

import numpy as np
import pytest

from dmae_jax import metrics, report
from tests import helpers

HIDDEN = ("tensorflow", "tensorflow_datasets", "grain", "clu", "torch", "tensorboard",
          "tensorboardX", "sklearn", "matplotlib", "statsmodels", "PIL", "cv2", "array_record")



def hide_imports(hidden: tuple[str, ...] = HIDDEN) -> str:
    """Python source after which the packages `hidden` behave exactly as if not installed.

    The file-system finder is wrapped to find nothing of them: `import x` raises
    ModuleNotFoundError and `importlib.util.find_spec("x")` returns None.
    """
    return textwrap.dedent(f"""
        import sys
        from importlib.machinery import PathFinder

        class _Without(PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name.split(".")[0] in {tuple(hidden)!r}:
                    return None
                return PathFinder.find_spec(name, path, target)

        sys.meta_path[:] = [_Without if f is PathFinder else f for f in sys.meta_path]
    """)


def _python(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, env=helpers.env(),
                          capture_output=True, text=True, timeout=timeout)


def _accumulator(logdir: str):
    # Read as a TensorFlow-free install does: this module's presence makes TensorBoard use
    # its own file-system stub instead of importing TensorFlow (into the test process).
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(logdir, size_guidance={ea.SCALARS: 0, ea.IMAGES: 0,
                                                     ea.TENSORS: 0})
    acc.Reload()
    return acc


# ------------------------------------------------------------------ Core without TF & co.


def test_core_imports_and_runs_without_tensorflow_tfds_grain_clu_torch(tmp_path):
    code = hide_imports() + textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        import benchmarks.run as bench
        from dmae_jax import aot, defaults, models, parallel, tasks
        from dmae_jax.smoothing import cascade, certify
        from dmae_jax.tasks import finetune, pretrain
        from dmae_jax.train import common

        # Validation (the run path's first steps) and compile-only mode's step assembly.
        for config in (defaults.digits_pretrain(), defaults.digits_finetune(0.5)):
            task, resolved = tasks.prepare(config)
            pieces = aot.train_pieces(resolved)
            assert pieces.loss_fn is not None

        # The real jitted, donated training steps (make_train_step + AdamW, several steps
        # per call as the digits configs run them) on a tiny DMAE.
        from dmae_jax import config as config_lib, defaults
        config = defaults.digits_pretrain()
        config.data.update(dataset="cifar10", image_size=8)  # step counts without reading data
        config.model.update(img_size=8, decoder_width=16, decoder_depth=1, decoder_heads=2)
        config.update(batch_size=4, steps_per_call=2)
        bench.jax_train_steps(config_lib.resolve(config), 3)()

        # CERTIFY with a tiny ViT classifier.
        cfg = models.resolve_model_config(dict(variant="mu", img_size=8, patch_size=4))
        graphdef, state = nnx.split(models.create_classifier(cfg, 3, rngs=nnx.Rngs(0)))
        logits_fn = lambda x: nnx.merge(graphdef, state)(x)
        x = np.full((8, 8, 3), 0.5, np.float32)
        prediction, radius = certify(logits_fn, x, sigma=0.25, n0=8, n=32, alpha=0.001,
                                     batch_size=16, rng=jax.random.key(0), num_classes=3)
        assert -1 <= prediction < 3 and radius >= 0.0, (prediction, radius)
        loaded = [m for m in sys.modules if m.split(".")[0] in HIDDEN]
        assert not loaded, loaded
        print("CORE OK", prediction, radius)
    """).replace("HIDDEN", repr(HIDDEN))
    result = _python(code)
    assert result.returncode == 0 and "CORE OK" in result.stdout, result.stderr[-3000:]


def test_validation_compile_only_mode_and_the_certification_task_import_no_tfds():
    # What imports TFDS is `datasets.tfds()`: a data set being read or prepared. Checking
    # a config, compiling for a TPU and certification's engine and task module never do.
    code = hide_imports(("tensorflow", "tensorflow_datasets")) + textwrap.dedent("""
        from dmae_jax import aot, checks, defaults, tasks
        from dmae_jax.data import datasets
        from dmae_jax.tasks import certification, end_to_end, execute
        for config in (defaults.digits_pretrain(), defaults.certify("digits"),
                       defaults.end_to_end()):
            try:
                tasks.prepare(config)
            except checks.ConfigError as e:
                assert "config.checkpoint" in str(e), e
        aot.train_pieces(defaults.digits_pretrain())
        assert datasets.num_classes("imagenet2012") == 1000
        try:
            datasets.tfds()
        except ModuleNotFoundError:
            print("NO TFDS OK")
    """)
    result = _python(code)
    assert result.returncode == 0 and "NO TFDS OK" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------ TensorBoard events.


def test_crc32c_matches_the_standard_check_value():
    assert metrics.crc32c(b"123456789") == 0xE3069283
    assert metrics.crc32c(b"") == 0


def test_tensorboard_reads_scalars_images_and_text_and_a_resume_appends_one_stream(tmp_path):
    logdir = str(tmp_path)
    writer = metrics.SummaryWriter(logdir)
    for step in range(1, 6):
        writer.write_scalars(step, {"loss": 1.0 / step})
    grid = np.random.default_rng(0).random((20, 30, 3))
    writer.write_images(3, {"grid": grid})
    writer.write_texts(3, {"notes": "**bold** text"})
    writer.close()
    # A kill in the middle of a record, then the run resumes from its step-3 checkpoint.
    with open(os.path.join(logdir, metrics.EVENTS_FILE), "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00")
    writer = metrics.create_writer(logdir)
    for step in range(4, 8):
        writer.write_scalars(step, {"loss": 10.0 + step})
    writer.close()

    assert os.listdir(logdir) == [metrics.EVENTS_FILE]
    acc = _accumulator(logdir)
    scalars = [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")]
    assert scalars == [(1, 1.0), (2, 0.5), (3, 0.333333), (4, 14.0), (5, 15.0), (6, 16.0),
                       (7, 17.0)]
    (image,) = acc.Images("grid")
    assert (image.step, image.width, image.height) == (3, 30, 20)
    from PIL import Image

    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, (grid * 255).round().astype(np.uint8))
    (text,) = acc.Tensors("notes")
    assert text.tensor_proto.string_val == [b"**bold** text"]


def test_an_object_store_workdir_gets_the_same_stream_rewritten_whole(tmp_path):
    logdir = str(tmp_path)
    writer = metrics.SummaryWriter(logdir, object_store=True)
    writer.write_scalars(1, {"loss": 1.0})
    path = os.path.join(logdir, metrics.EVENTS_FILE)
    assert not os.path.exists(path)  # rewritten at most once a minute, and on flush/close
    writer.write_scalars(2, {"loss": 2.0})
    writer.close()
    with open(path, "ab") as f:
        f.write(b"\x01\x02")  # a cut-off record
    writer = metrics.SummaryWriter(logdir, object_store=True)
    writer.write_scalars(2, {"loss": 3.0})
    writer.flush()
    assert [(e.step, e.value) for e in _accumulator(logdir).Scalars("loss")] == [(1, 1.0),
                                                                                  (2, 3.0)]
    writer.close()


def test_certification_results_become_a_tensorboard_run(tmp_path):
    radii = [0.0, 0.3, 0.7, 1.2, 0.5, 0.0]
    rows = [{"idx": i, "label": 1, "predict": -1 if i == 5 else (1 if i != 4 else 2),
             "radius": r, "correct": int(i not in (4, 5))} for i, r in enumerate(radii)]
    report.write_tensorboard(str(tmp_path), "certify_sigma_0.5.tsv", rows, table="| t |")
    acc = _accumulator(str(tmp_path / "certify_sigma_0.5"))
    (acr,) = acc.Scalars("certify/acr")
    assert acr.value == pytest.approx(report.acr(rows))
    (abstain,) = acc.Scalars("certify/abstain")
    assert abstain.value == pytest.approx(1 / 6)
    curve = {e.step: e.value for e in acc.Scalars("certify/certified_accuracy")}
    assert sorted(curve) == list(range(0, 122))
    for step in (0, 30, 31, 70, 71, 120, 121):
        expected = report.certified_accuracy(rows, [step / 100])[0]
        assert curve[step] == pytest.approx(expected), step
    assert acc.Images("certify/certified_accuracy_plot")[0].width > 100
    # A rerun replaces the results instead of adding a second copy.
    report.write_tensorboard(str(tmp_path), "certify_sigma_0.5.tsv", rows[:3])
    acc = _accumulator(str(tmp_path / "certify_sigma_0.5"))
    assert [e.value for e in acc.Scalars("certify/acr")] == [pytest.approx(report.acr(rows[:3]))]


def test_a_short_training_run_writes_tensorboard_events_and_no_startup_noise(tmp_path):
    data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
    result = helpers.run(helpers.main_command(
        "configs/pretrain_digits.py", workdir, f"--config.data.data_dir={data_dir}",
        "--config.total_steps=2", "--config.log_every_steps=1", "--config.eval_every_steps=2",
        "--config.batch_size=16"))
    acc = _accumulator(workdir)
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    losses = helpers.losses(result.stdout)
    assert [round(e.value, 4) for e in acc.Scalars("loss")] == [losses[1], losses[2]]
    assert [e.step for e in acc.Scalars("eval_loss")] == [2]
    (grid,) = acc.Images("reconstructions")
    assert grid.step == 2 and grid.width > grid.height > 0
    output = result.stdout + result.stderr
    for noise in ("\x1b[", "oneDNN", "absl::InitializeLog", "OpenCV", "dataset_info.json",
                  "Generating splits"):
        assert noise not in output, (noise, output[-3000:])


# ------------------------------------------------------------------ Data preparation.


def test_prepare_builds_digits_without_tensorflow(tmp_path):
    code = hide_imports(("tensorflow", "grain", "clu", "torch"))
    code += textwrap.dedent(f"""
        import runpy
        sys.argv = ["prepare", "--dataset=digits", "--image_size=8",
                    "--data_dir={tmp_path}"]
        runpy.run_module("dmae_jax.prepare", run_name="__main__")
        assert "tensorflow" not in sys.modules
    """)
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "digits prepared in" in result.stdout and "train 1501" in result.stdout
    from dmae_jax.data import datasets

    source = datasets.load_source("digits", "test", data_dir=str(tmp_path), image_size=8)
    assert len(source) == 296 and source[0]["image"].shape == (8, 8, 3)


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_fake_imagenet(manual_dir: str, synsets=("n01440764", "n01443537"),
                       per_class: int = 2, num_val: int = 3) -> None:
    """ILSVRC2012_img_train.tar (one inner tar of JPEGs per synset) and _val.tar, tiny."""
    os.makedirs(manual_dir, exist_ok=True)
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
        for k, synset in enumerate(synsets):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i in range(per_class):
                    _add(t, f"{synset}_{i}.JPEG", _jpeg(10 * k + i))
            _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
        for i in range(num_val):
            _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(100 + i))


def test_prepare_builds_imagenet2012_from_a_manual_dir_of_jpegs(tmp_path):
    if importlib.util.find_spec("tensorflow") is None:  # not imported here: seconds, noise
        pytest.skip("TFDS's imagenet2012 builder needs TensorFlow (the [prepare] extra)")
    manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
    make_fake_imagenet(manual)
    result = subprocess.run(
        [sys.executable, "-m", "dmae_jax.prepare", "--dataset=imagenet2012",
         f"--manual_dir={manual}", f"--data_dir={data_dir}"],
        cwd=helpers.REPO, env=helpers.env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(train 4, validation 3)" in result.stdout
    assert "oneDNN" not in result.stderr and "\x1b[" not in result.stderr
    from dmae_jax.data import datasets

    train = datasets.load_source("imagenet2012", "train", data_dir=data_dir)
    assert sorted(train[i]["label"] for i in range(4)) == [0, 0, 1, 1]
    val = datasets.load_source("imagenet2012", "validation", data_dir=data_dir)
    assert len(val) == 3 and val[0]["image"].shape == (30, 40, 3)
    # The labels TFDS's validation_labels.txt gives images 1-3 (records come in any order).
    import tensorflow_datasets as tfds

    names = tfds.builder("imagenet2012", data_dir=data_dir).info.features["label"].names
    by_file = {name: i for i, name in enumerate(names)}
    assert sorted(val[i]["label"] for i in range(3)) == sorted(
        by_file[s] for s in ("n01751748", "n09193705", "n02105855"))


def test_prepare_names_what_is_missing(tmp_path):
    from dmae_jax import prepare

    with pytest.raises(prepare.PrepareError, match="ILSVRC2012_img_train.tar.*image-net.org"):
        prepare.prepare("imagenet2012", data_dir=str(tmp_path), manual_dir=str(tmp_path))
    with pytest.raises(prepare.PrepareError, match="must be one of"):
        prepare.prepare("mnist", data_dir=str(tmp_path))


def test_quiet_drops_the_third_party_noise_and_nothing_else():
    import logging

    from absl import logging as absl_logging

    from dmae_jax import quiet

    quiet.install()
    quiet.install()  # idempotent: one filter
    handler = absl_logging.get_absl_handler()
    assert sum(isinstance(f, quiet._DropNoise) for f in handler.filters) == 1

    def passes(msg, *args):
        record = logging.LogRecord("tfds", logging.WARNING, __file__, 1, msg, args, None)
        return handler.filter(record)

    assert not passes("Variant folder %s has no %s", "/d/digits/1.0.0", "dataset_info.json")
    assert not passes("OpenCV is not installed. We recommend using OpenCV ...")
    assert passes("preemption notice (SIGTERM): saved step %d, exiting", 7)
    assert passes("Variant folder %s has no %s", "/d", "features.json")
