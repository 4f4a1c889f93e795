"""Denoiser training and calibration: losses, EMA, the two tasks end to end, loading, config errors.

The tasks run in-process on a tiny UNet registered as a preset for the test (8x8 digits), so
the whole file takes well under a minute.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from dmae_jax import architectures, checkpoints, checks, defaults, exports
from dmae_jax.config import ConfigError
from dmae_jax.diffusion import calibration, loading, losses
from dmae_jax.models import ModelParts, count_params
from dmae_jax.models import unet as unet_lib
from dmae_jax.tasks import calibrate_denoiser, train_denoiser
from dmae_jax.train import common
from tests.test_train import load_config

# One level, no attention: the smallest UNet that compiles fast.
TINY = architectures.UNetConfig(
    image_size=8, in_channels=3, model_channels=32, num_res_blocks=1, channel_mult=(1,),
    attention_ds=(), dropout=0.1, noise_schedule="cosine", diffusion_steps=100,
)


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    monkeypatch.setitem(architectures.UNET_PRESETS, "test_tiny", TINY)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dmae_jax.data import datasets

    path = str(tmp_path_factory.mktemp("tfds"))
    datasets.load_source("digits", "train", data_dir=path, image_size=8)
    return path


def _train_config(data_dir: str) -> ml_collections.ConfigDict:
    config = load_config("configs/train_denoiser_digits.py", "runlocal")
    config.model.preset = "test_tiny"
    config.data.update(image_size=8, data_dir=data_dir)
    return config


@pytest.fixture(scope="module")
def ddpm_export(tmp_path_factory, data_dir):
    """workdir of a 4-step train_denoiser run of the tiny UNet (its export is in export/)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(architectures.UNET_PRESETS, "test_tiny", TINY)
        workdir = str(tmp_path_factory.mktemp("ddpm"))
        config = _train_config(data_dir)
        checks.train_denoiser(config)
        train_denoiser.run(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def classifier_export(tmp_path_factory):
    """A randomly initialised 8x8 digits classifier export (only its being frozen matters)."""
    from dmae_jax.models import create_classifier

    model_cfg = defaults.model("mu", img_size=8, patch_size=4)
    model = create_classifier(model_cfg, 10, rngs=nnx.Rngs(3))
    path = str(tmp_path_factory.mktemp("clf") / "export")
    exports.save(path, nnx.state(model, nnx.Param).to_pure_dict(),
                 {"kind": "classifier", "model": model_cfg.to_dict(), "num_classes": 10})
    return path


def _calibration_config(data_dir, ddpm_export, classifier_export) -> ml_collections.ConfigDict:
    config = load_config("configs/calibrate_denoiser_digits.py", "runlocal")
    config.data.update(image_size=8, data_dir=data_dir)
    config.denoiser = os.path.join(ddpm_export, "export")
    config.classifier = classifier_export
    return config


# ---------------------------------------------------------------------------------------
# Calibration losses.
# ---------------------------------------------------------------------------------------


def test_brier_score_is_the_mean_squared_distance_to_the_one_hot_label():
    probs = jnp.array([[[0.7, 0.2, 0.1]], [[0.5, 0.3, 0.2]]])      # M = 2 draws, B = 1
    expected = ((0.3**2 + 0.2**2 + 0.1**2) + (0.5**2 + 0.3**2 + 0.2**2)) / 2
    np.testing.assert_allclose(calibration.brier_score(probs, jnp.array([0])), [expected],
                               rtol=1e-6)


def test_majority_vote_counts_argmaxes_and_breaks_ties_towards_the_lower_class():
    probs = jnp.array([
        [[0.1, 0.8, 0.1], [0.6, 0.3, 0.1]],
        [[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]],
        [[0.5, 0.4, 0.1], [0.2, 0.7, 0.1]],
    ])                                                                # [M=3, B=2, K=3]
    # Image 0 votes 1, 1, 0 -> 1; image 1 votes 0, 2, 1 -> a three-way tie -> 0.
    np.testing.assert_array_equal(calibration.majority_vote(probs), [1, 0])


def test_brier_applies_to_recoverable_images_and_anti_consistency_to_the_others():
    probs = jnp.array([
        [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]],
        [[0.6, 0.3, 0.1], [0.3, 0.6, 0.1]],
    ])                                                                # [M=2, B=2, K=3]
    labels = jnp.array([0, 2])              # image 0 voted 0 (right), image 1 voted 1 (wrong)
    loss, aux = calibration.calibration_loss(probs, labels, lambda_brier=2.0, lambda_ac=3.0)
    np.testing.assert_array_equal(aux["recoverable"], [True, False])
    brier0 = calibration.brier_score(probs[:, :1], labels[:1])[0]
    ac1 = ((0.7 + 0.6) / 2) ** 2            # the wrong majority class 1's mean probability
    np.testing.assert_allclose(aux["brier"], brier0 / 2, rtol=1e-6)   # / B: batch means
    np.testing.assert_allclose(aux["ac"], ac1 / 2, rtol=1e-6)
    np.testing.assert_allclose(loss, 2.0 * brier0 / 2 + 3.0 * ac1 / 2, rtol=1e-6)


def test_a_gradient_step_lowers_the_wrong_class_and_raises_the_label_where_recoverable():
    logits = jnp.array([
        [[2.0, 0.5, 0.0], [0.0, 2.0, 0.5]],
        [[1.0, 0.8, 0.0], [0.1, 1.5, 0.4]],
    ])
    labels = jnp.array([0, 2])

    def loss(z):
        return calibration.calibration_loss(jax.nn.softmax(z), labels, lambda_brier=1.0,
                                         lambda_ac=1.0)[0]

    before = jax.nn.softmax(logits).mean(0)
    after = jax.nn.softmax(logits - 1.0 * jax.grad(loss)(logits)).mean(0)
    assert after[1, 1] < before[1, 1], "the wrong majority class of image 1 must lose mass"
    assert after[0, 0] > before[0, 0], "the label of the recoverable image 0 must gain mass"


# ---------------------------------------------------------------------------------------
# DDPM training.
# ---------------------------------------------------------------------------------------


def test_ddpm_steps_lower_the_loss_on_a_fixed_batch_and_the_ema_follows():
    from dmae_jax import parallel

    model = unet_lib.UNet(TINY, rngs=nnx.Rngs(0))
    parts = ModelParts.split(model)
    schedule = TINY.schedule()
    x0 = jax.random.uniform(jax.random.key(1), (8, 8, 8, 3)) * 2 - 1
    key = jax.random.key(2)  # the same t, eps (and dropout) at every step

    def loss_fn(params, batch, rng):
        del rng
        return losses.ddpm_loss(lambda x, t, rng: parts.bind(params)(x, t, rng=rng),
                                schedule, batch["x0"], key, rescale_timesteps=False), {}

    tx = optax.adam(2e-3)
    mesh = parallel.make_mesh()

    def make_state(params):
        return common.init_state(params, tx, jax.random.key(0), ema=True)

    shardings = common.state_shardings(make_state, parts.params, mesh)
    step = common.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=shardings,
                                  ema_decay=0.5)
    state = jax.jit(make_state, out_shardings=shardings)(parts.params)
    batch = parallel.global_batch({"x0": np.asarray(x0)}, mesh)
    losses_seen = []
    for _ in range(12):
        prev = jax.tree.map(np.asarray, state["params"])  # the step donates its input
        state, measurements = step(state, batch)
        losses_seen.append(float(measurements["loss"]))
    assert float(loss_fn(state["params"], {"x0": x0}, None)[0]) < 0.8 * losses_seen[0]
    # ema = 0.5 * old ema + 0.5 * new params: strictly between when they differ.
    leaf = lambda t: np.asarray(t["out_conv"]["bias"])  # noqa: E731
    assert not np.allclose(leaf(state["ema"]), leaf(state["params"]))
    assert not np.allclose(leaf(state["ema"]), leaf(prev))


def test_train_task_exports_a_unet_that_certification_can_load(ddpm_export):
    path = os.path.join(ddpm_export, "export")
    _, meta = exports.load(path)
    assert meta["kind"] == "unet" and meta["preset"] == "test_tiny"
    assert architectures.UNetConfig.from_dict(meta["config"]) == TINY
    assert os.path.getsize(os.path.join(ddpm_export, "denoising", "step_000004.png")) > 100

    denoise_fn = loading.load_denoise_fn(path, "diffusion", 0.5, image_size=8)
    noisy = jax.random.uniform(jax.random.key(0), (5, 8, 8, 3)) + 0.5 * jax.random.normal(
        jax.random.key(1), (5, 8, 8, 3))
    out = jax.jit(lambda f, x: f(x))(denoise_fn, noisy)
    assert out.shape == (5, 8, 8, 3)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert sum(a.size for a in jax.tree.leaves(denoise_fn)) == count_params(
        unet_lib.UNet(TINY, rngs=nnx.Rngs(0)), nnx.Param), "the weights are pytree leaves"


def test_the_cascade_denoisers_share_one_copy_of_the_weights(ddpm_export):
    fns = loading.load_denoise_fns(os.path.join(ddpm_export, "export"), "diffusion",
                                   (1.0, 0.5, 0.25))
    for leaves in zip(*(jax.tree.leaves(f) for f in fns), strict=True):
        assert leaves[0] is leaves[1] is leaves[2]
    # ... and on the devices too: certification places each shared array once.
    from dmae_jax.tasks import certification as tasks

    for leaves in zip(*(jax.tree.leaves(f) for f in tasks.place_once(fns)), strict=True):
        assert leaves[0] is leaves[1] is leaves[2]
    x = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3))
    assert not np.allclose(fns[0](x), fns[2](x)), "each sigma has its own t*"


def test_smaller_images_are_padded_to_the_unet_and_impossible_sizes_fail_at_load(ddpm_export):
    path = os.path.join(ddpm_export, "export")
    denoise_fn = loading.load_denoise_fn(path, "diffusion", 0.25, image_size=4)
    assert denoise_fn(jnp.full((2, 4, 4, 3), 0.5)).shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="pad_to"):
        loading.load_denoise_fn(path, "diffusion", 0.25, image_size=5)
    with pytest.raises(ValueError, match="denoiser kind must be one of"):
        loading.load_denoise_fn(path, "gan", 0.25)


def test_a_dmae_export_denoises_with_nothing_masked(tmp_path):
    from dmae_jax.models import create_dmae

    model_cfg = defaults.model("mu", img_size=8, patch_size=4, decoder_width=32,
                               decoder_depth=1, decoder_heads=2)
    model = create_dmae(model_cfg, rngs=nnx.Rngs(0))
    path = str(tmp_path / "dmae")
    exports.save(path, nnx.state(model, nnx.Param).to_pure_dict(),
                 {"kind": "dmae", "model": model_cfg.to_dict()})
    denoise_fn = loading.load_denoise_fn(path, "dmae", 0.5)
    noisy = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3))
    np.testing.assert_allclose(jax.jit(lambda f, x: f(x))(denoise_fn, noisy),
                               jax.jit(model.reconstruct)(noisy), atol=1e-5)
    assert jax.eval_shape(denoise_fn, jax.ShapeDtypeStruct((3, 16, 16, 3), jnp.float32)).shape \
        == (3, 16, 16, 3), "output comes back at the input's size"


# ---------------------------------------------------------------------------------------
# Calibration.
# ---------------------------------------------------------------------------------------


def test_calibration_trains_the_unet_and_keeps_the_classifier_out_of_the_state(
        tmp_path, data_dir, ddpm_export, classifier_export):
    import orbax.checkpoint as ocp

    config = _calibration_config(data_dir, ddpm_export, classifier_export)
    config.ema_decay = 0.5  # exports the average, which also moves
    checks.calibrate_denoiser(config)
    workdir = str(tmp_path / "calib")
    calibrate_denoiser.run(config, workdir)

    before, _ = exports.load(config.denoiser)
    after, meta = exports.load(os.path.join(workdir, "export"))
    assert meta["kind"] == "unet" and meta["calibrated_from"] == config.denoiser
    changed = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(after), strict=True)]
    assert any(changed), "the UNet must be trained"
    loading.load_denoise_fn(os.path.join(workdir, "export"), "diffusion", 1.0, image_size=8)

    # The classifier is an argument of the step, never trained state: the checkpoint holds
    # the UNet's params, their average and the optimizer state of the UNet only.
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "extra")) as manager:
        saved = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]
    assert set(saved) == {"params", "ema", "opt_state", "step", "rng"}
    unet_size = sum(np.size(x) for x in jax.tree.leaves(before))
    assert sum(np.size(x) for x in jax.tree.leaves(saved["params"])) == unet_size


# ---------------------------------------------------------------------------------------
# Config errors.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("model.preset", "huge", "config.model.preset must be one of"),
    ("data.image_size", 16, "config.data.image_size must be the UNet preset's resolution (8"),
    ("ema_decay", 1.0, "config.ema_decay must be in [0.0, 1.0), got 1.0"),
    ("optim.lr", 0.0, "config.optim.lr must be > 0, got 0.0"),
    ("eval_sigmas", (0.5, 1e9), "config.eval_sigmas: sigma = 1000000000.0 exceeds the"),
])
def test_bad_training_config_names_the_field(data_dir, field, value, message):
    config = _train_config(data_dir)
    _set(config, field, value)
    with pytest.raises(ValueError) as e:
        checks.train_denoiser(config)
    assert message in str(e.value)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 10, "config.batch_size must be a multiple of len(config.sigmas) = 3 times"),
    ("sigmas", (), "config.sigmas must be a non-empty list of sigmas > 0"),
    ("num_noise_samples", 0, "config.num_noise_samples must be an integer >= 1, got 0"),
    ("lambda_ac", -1.0, "config.lambda_ac must be >= 0, got -1.0"),
    ("denoiser", "/no/such/export", "config.denoiser = '/no/such/export' does not exist"),
    ("data.image_size", 5, "config.data.image_size must be an integer in [8, 512] for digits"),
])
def test_bad_calibration_config_names_the_field(data_dir, ddpm_export, classifier_export,
                                                field, value, message):
    config = _calibration_config(data_dir, ddpm_export, classifier_export)
    _set(config, field, value)
    with pytest.raises(ValueError) as e:
        checks.calibrate_denoiser(config)
    assert message in str(e.value)


def test_the_unet_takes_images_its_size_or_larger_or_reflection_paddable_to_it():
    big = architectures.UNET_PRESETS["256x256_diffusion_uncond"]
    assert big.pad_to(224) == 256 and big.pad_to(256) is None and big.pad_to(300) is None
    big.check_image_size(224)  # ImageNet crops, padded by 16 on each side
    for size in (225, 60):  # an odd difference; padding wider than the image
        with pytest.raises(ValueError, match="cannot be reflection-padded to the UNet's 256"):
            big.check_image_size(size)


def test_calibration_refuses_a_denoiser_as_classifier_and_zero_calibration_weights(
        data_dir, ddpm_export, classifier_export):
    config = _calibration_config(data_dir, ddpm_export, classifier_export)
    config.classifier = config.denoiser
    with pytest.raises(checkpoints.CheckpointError, match="holds a 'unet' export, expected "
                                                          "'classifier'"):
        checks.calibrate_denoiser(config)
    config = _calibration_config(data_dir, ddpm_export, classifier_export)
    config.lambda_brier = config.lambda_ac = 0.0
    with pytest.raises(ConfigError, match="both 0"):
        checks.calibrate_denoiser(config)


def _set(config, field: str, value) -> None:
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def test_the_cascade_certifies_through_one_denoiser_export(tmp_path, ddpm_export,
                                                           classifier_export, data_dir):
    from dmae_jax.tasks import execute

    config = defaults.cascade("digits", sigmas=(0.5, 0.25), n=16)
    config.update(checkpoint=classifier_export, denoiser=os.path.join(ddpm_export, "export"),
                  n0=4, batch_size=8, max=4)
    config.data.update(image_size=8, data_dir=data_dir)
    execute.run(config, str(tmp_path))
    logs = [f for f in os.listdir(tmp_path) if f.endswith(".tsv")]
    assert len(logs) == 1
    with open(tmp_path / logs[0]) as f:
        rows = [line for line in f.read().splitlines()[1:] if line]
    assert len(rows) == 2, rows   # images 0 and 2 (skip 2) below max 4
