"""Several steps per dispatch, and fine-tunings trained together: same numbers, same resume."""

from __future__ import annotations

import os
import subprocess

import jax
import numpy as np
import pytest

from tests import helpers


def test_calls_end_at_every_save_eval_and_profile_boundary():
    from dmae_jax.train import common

    assert list(common.calls(0, 25, 10, (12, 0))) == [(1, 10), (11, 12), (13, 22), (23, 24),
                                                      (25, 25)]
    assert list(common.calls(7, 20, 10, (), ends=(9, 13))) == [(8, 9), (10, 13), (14, 20)]
    assert list(common.calls(20, 20, 10)) == []
    assert list(common.calls(0, 3, 1)) == [(1, 1), (2, 2), (3, 3)]


def _pretrain_steps(steps_per_call: int):
    """(run(state, calls) -> (state, per-step losses), initial state) of a 1-block DMAE."""
    from flax import nnx

    from dmae_jax import config as config_lib
    from dmae_jax import parallel
    from dmae_jax.models import ModelParts, create_dmae
    from dmae_jax.tasks import pretrain
    from dmae_jax.train import common
    from tests.test_train import load_config

    config = config_lib.resolve(load_config("configs/pretrain_digits.py"))
    config.model.update(depth=1, decoder_depth=1)
    config.batch_size = 16
    mesh = parallel.make_mesh(1)
    parts = ModelParts.split(create_dmae(config.model, rngs=nnx.Rngs(0)))
    tx, schedule = pretrain.make_optimizer(config, parts.params, steps_per_epoch=10,
                                           total_steps=100)

    def make_state(params):
        return common.init_state(params, tx, jax.random.key(0))

    shardings = common.state_shardings(make_state, parts.params, mesh)
    step = common.make_train_step(pretrain.make_loss_fn(config, parts), tx, mesh=mesh,
                                  state_sharding=shardings, lr_fn=schedule,
                                  steps_per_call=steps_per_call)
    images = np.random.default_rng(0).random((7, 16, 16, 16, 3), np.float32)

    def run(counts):
        state = jax.jit(make_state, out_shardings=shardings)(
            common.put_global(parts.params, shardings["params"]))
        losses, done = [], 0
        for count in counts:
            state, metrics = common.run_steps(
                step, state, {"image": images[done:done + count]}, mesh, steps_per_call)
            losses += list(np.asarray(metrics["loss"]))
            done += count
        return jax.device_get(state), losses

    return run


def _assert_same_bits(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_steps_cut_into_calls_anywhere_train_bit_for_bit_alike():
    # One device loop program for every steps_per_call > 1 and every count: a run resumed
    # or cut at any step trains exactly as an uninterrupted one.
    run4, run3 = _pretrain_steps(4), _pretrain_steps(3)
    state, losses = run4([4, 3])
    for other, other_losses in (run4([2, 4, 1]), run3([1, 3, 3])):
        _assert_same_bits(state, other)
        assert losses == other_losses
    assert len(losses) == 7 and losses[0] != losses[-1]


# Fine-tunes 1-block digits classifiers (configs/finetune_digits.py) at the given sigmas
# together through the run path, as the pipeline does; one sigma is a fine-tuning on its own.
FINETUNE = """
import sys
from dmae_jax import config as config_lib
from dmae_jax.tasks import execute
from tests.test_train import load_config

workdirs, sigmas, data_dir = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3]
configs = []
for sigma in sigmas:
    config = load_config("configs/finetune_digits.py", f"sigma={sigma}")
    config.data.data_dir = data_dir
    config.model.depth = 1
    config.update(total_steps=8, log_every_steps=1, ckpt_every_steps=2, eval_every_steps=4,
                  eval_batch_size=16, eval_noise_draws=2, batch_size=16, steps_per_call=2)
    configs.append(config_lib.resolve(config))
execute.run_together(configs, workdirs)
"""


def _finetune(workdirs: list[str], sigmas: tuple[str, ...], data_dir: str) -> list[str]:
    import sys

    return [sys.executable, "-c", FINETUNE, ",".join(workdirs), ",".join(sigmas), data_dir]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dmae_jax.data import datasets

    path = str(tmp_path_factory.mktemp("tfds"))
    datasets.load_source("digits", "train", data_dir=path, image_size=16)
    datasets.load_source("digits", "test", data_dir=path, image_size=16)
    return path


def test_finetunings_trained_together_match_each_alone_after_kills(tmp_path, data_dir):
    import shutil

    from dmae_jax import exports

    sigmas = ("0.25", "1.0")
    alone = {}
    for sigma in sigmas:
        work = str(tmp_path / f"alone_{sigma}")
        helpers.run(_finetune([work], (sigma,), data_dir))
        alone[sigma] = exports.load(os.path.join(work, "export"))[0]

    workdirs = [str(tmp_path / f"together_{sigma}") for sigma in sigmas]
    cmd = _finetune(workdirs, sigmas, data_dir)
    # SIGKILL once both runs saved a checkpoint, then rerun: the runs resume together.
    proc = subprocess.Popen(cmd, cwd=helpers.REPO, env=helpers.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    helpers.wait_for(lambda: all(helpers.checkpoint_steps(w) for w in workdirs), 300,
                     "a checkpoint of each run", proc)
    proc.kill()
    proc.wait()
    assert max(helpers.checkpoint_steps(w)[-1] for w in workdirs) < 8, "finished too early"
    out = helpers.run(cmd).stdout
    assert "sigma=0.25: step 8/8" in out and "sigma=1.0: step 8/8" in out
    for sigma, work in zip(sigmas, workdirs, strict=True):
        _assert_same_bits(exports.load(os.path.join(work, "export"))[0], alone[sigma])
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(work))

    # A kill that lands while the runs are saving leaves them at different steps: take the
    # newest save of the second run away. Each is then trained on alone from its own.
    for work in workdirs:
        shutil.rmtree(os.path.join(work, "export"))
    newest = helpers.checkpoint_steps(workdirs[1])[-1]
    shutil.rmtree(os.path.join(workdirs[1], "checkpoints", str(newest)))
    out = helpers.run(cmd).stdout
    assert f"resumed from step {newest - 2} of 8" in out
    assert "sigma=" not in out, "runs resumed at different steps train one at a time"
    for sigma, work in zip(sigmas, workdirs, strict=True):
        _assert_same_bits(exports.load(os.path.join(work, "export"))[0], alone[sigma])
