"""Data-parallel steps move no image between devices: the collectives of each compiled step.

Each step is compiled (not run) over the tests' 4 CPU devices and its optimised HLO is read
for collectives by kind (`aot.count_collectives`): the gradient all-reduce, FSDP's parameter
all-gathers, and no all-to-all or collective-permute, which would mean images or activations
moved between devices (the batch concatenations these tests were written against did).
XLA:CPU computes bfloat16 dots in float32, so the float32 gradient reduction of a bfloat16
model is checked on the TPU-compiled step (tests/test_aot.py).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dmae_jax import aot, defaults, parallel
from dmae_jax import config as config_lib
from dmae_jax.train import common
from tests import helpers

MOVES = ("all-to-all", "collective-permute")


def _compile(cfg, loss_fn, tx, params, labels: bool) -> aot.Collectives:
    """Collectives of `common.make_train_step(loss_fn, tx)` on 4 devices for cfg's batch."""
    mesh = parallel.make_mesh(cfg.mesh.fsdp, devices=jax.devices()[:4])
    shapes = jax.eval_shape(lambda p: common.init_state(p, tx, jax.random.key(0)), params)
    shardings = parallel.state_shardings(shapes, mesh)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         shapes, shardings)
    size = cfg.data.image_size
    bsh = parallel.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((cfg.batch_size, size, size, 3), jnp.float32,
                                           sharding=bsh)}
    if labels:
        batch["label"] = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32, sharding=bsh)
    step = common.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=shardings,
                                  accum_steps=cfg.accum_steps)
    return aot.count_collectives(step.lower(state, batch).compile().as_text(), 4)


def _trainer_step(cfg) -> aot.Collectives:
    cfg.total_steps = 10
    pieces = aot.train_pieces(cfg, batch_shards=4)
    return _compile(config_lib.resolve(cfg), pieces.loss_fn, pieces.tx, pieces.parts.params,
                    pieces.labels)


def _pretrain(fsdp: int):
    cfg = defaults.digits_pretrain()
    cfg.model.update(depth=1, decoder_depth=1)
    cfg.batch_size, cfg.mesh.fsdp = 16, fsdp
    return cfg


def _finetune(fsdp: int, group: int, accum: int = 1):
    cfg = defaults.digits_finetune(0.25)
    cfg.model.update(depth=1, drop_path_rate=0.1)
    cfg.mixup, cfg.cutmix, cfg.mixup_group_size = 0.8, 1.0, group
    cfg.batch_size, cfg.mesh.fsdp, cfg.accum_steps = 16, fsdp, accum
    return cfg


def _assert_moves_nothing(col: aot.Collectives):
    assert all(col.count[k] == 0 for k in MOVES), col.line()


def test_pretraining_step_only_all_reduces_its_float32_gradients():
    col = _trainer_step(_pretrain(fsdp=1))
    _assert_moves_nothing(col)
    assert col.count["all-gather"] == 0 and col.count["all-reduce"] >= 1, col.line()
    assert col.dtypes["all-reduce"] == {"f32"}, col.line()


def test_pretraining_step_with_fsdp_gathers_parameters_and_moves_no_image():
    col = _trainer_step(_pretrain(fsdp=2))
    _assert_moves_nothing(col)
    assert col.count["all-gather"] > 0, col.line()


@pytest.mark.parametrize("fsdp, accum", [(1, 1), (2, 2)])
def test_finetuning_step_keeps_each_image_and_its_noisy_copies_on_its_device(fsdp, accum):
    # Mixup/CutMix groups of 2 images inside each device's 4 (2 per micro-batch with accum).
    col = _trainer_step(_finetune(fsdp, group=2, accum=accum))
    _assert_moves_nothing(col)


def test_whole_batch_mixup_pairs_images_across_devices():
    # Control: mixup_group_size 0 mixes image i with image B-1-i, which lives on another
    # device; the count sees the permutation.
    col = _trainer_step(_finetune(1, group=0))
    assert col.count["collective-permute"] + col.count["all-to-all"] > 0, col.line()


def test_denoiser_step_moves_no_image():
    from flax import nnx

    from dmae_jax.architectures import UNET_PRESETS
    from dmae_jax.diffusion import losses
    from dmae_jax.models import ModelParts
    from dmae_jax.models.unet import UNet
    from dmae_jax.train import optim

    cfg = defaults.digits_train_denoiser()
    cfg.batch_size = 16
    unet_config = UNET_PRESETS[cfg.model.preset]
    schedule = unet_config.schedule()
    parts = ModelParts.split(nnx.eval_shape(lambda: UNet(unet_config, rngs=nnx.Rngs(0))))
    tx, _ = optim.denoiser_optimizer(lr=1e-4, warmup_steps=0, total_steps=10, b1=0.9,
                                     b2=0.999, weight_decay=0.0)

    def loss_fn(params, batch, rng):  # as train_denoiser's step
        model = parts.bind(params)
        terms = losses.ddpm_loss_terms(
            lambda x, t, rng: model(x, t, rng=rng), schedule, 2.0 * batch["image"] - 1.0,
            rng, rescale_timesteps=unet_config.rescale_timesteps)
        return terms["loss"], {}

    _assert_moves_nothing(_compile(cfg, loss_fn, tx, parts.params, labels=False))


CERTIFY = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from dmae_jax import defaults
from dmae_jax.models import ModelParts, create_classifier
from dmae_jax.smoothing import place_replicated, sample_counts
cfg = defaults.model("mu", img_size=16, patch_size=4, depth=1)
parts = ModelParts.split(create_classifier(cfg, 10, rngs=nnx.Rngs(0)))
fn = place_replicated(jax.tree_util.Partial(lambda p, x: parts.bind(p)(x),
                                            jax.tree.map(jnp.asarray, parts.params)))
x = np.random.default_rng(0).random((16, 16, 3), np.float32)
sample_counts(fn, x, sigma=0.25, num=64, batch_size=32, rng=jax.random.key(0), num_classes=10)
"""


def test_certification_sampler_moves_no_image(tmp_path):
    # Compiled through the sampler's public function; XLA writes each optimised module.
    env = helpers.env(num_devices=4, XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text")
    out = subprocess.run([sys.executable, "-c", CERTIFY], cwd=helpers.REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    texts = []
    for path in glob.glob(os.path.join(tmp_path, "*after_optimizations.txt")):
        with open(path) as f:
            texts.append(f.read())
    # Every program the sampler compiled, the one that runs the classifier among them.
    assert any(" dot(" in t for t in texts), sorted(os.listdir(tmp_path))[:20]
    for text in texts:
        _assert_moves_nothing(aot.count_collectives(text, 4))
