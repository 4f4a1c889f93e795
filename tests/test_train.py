"""Training loop guarantees: resume after SIGKILL, save on SIGTERM, NaN guard, multi-host."""

from __future__ import annotations

import os
import signal
import subprocess

import numpy as np
import portpicker
import pytest

from tests import helpers

CONFIG = "configs/pretrain_digits.py"


def _overrides(data_dir: str, total_steps: int, **extra) -> list[str]:
    values = dict(total_steps=total_steps, log_every_steps=1, ckpt_every_steps=3,
                  eval_every_steps=0, batch_size=16, **extra)
    return [f"--config.data.data_dir={data_dir}"] + [
        f"--config.{k}={v}" for k, v in values.items()]


def _export(workdir: str) -> dict:
    from dmae_jax import exports

    params, _ = exports.load(os.path.join(workdir, "export"))
    return params


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dmae_jax.data import datasets

    path = str(tmp_path_factory.mktemp("tfds"))
    datasets.load_source("digits", "train", data_dir=path, image_size=16)
    return path


def test_killed_and_preempted_run_resumes_to_the_uninterrupted_result(tmp_path, data_dir):
    total = 24
    args = _overrides(data_dir, total)
    reference = str(tmp_path / "reference")
    ref_out = helpers.run(helpers.main_command(CONFIG, reference, *args)).stdout
    assert sorted(helpers.losses(ref_out)) == list(range(1, total + 1))

    # SIGKILL as soon as the first checkpoint is on disk: nothing may be lost but the steps
    # after that save.
    work = str(tmp_path / "interrupted")
    cmd = helpers.main_command(CONFIG, work, *args)
    killed_at = _kill_at_first_checkpoint(cmd, work, total)

    # Restart; SIGTERM (a preemption notice) after a few more steps must save and exit 143.
    proc = subprocess.Popen(cmd, cwd=helpers.REPO, env=helpers.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []

    def stepped_past_restore():
        line = proc.stdout.readline()
        seen.append(line)
        found = helpers.losses(line)
        return bool(found) and min(found) > killed_at

    helpers.wait_for(stepped_past_restore, 300, "a step after the restore", proc)
    first_resumed = min(helpers.losses("".join(seen)))
    assert first_resumed == killed_at + 1, "the restarted run did not continue from its save"
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, rest
    preempted_at = helpers.checkpoint_steps(work)[-1]
    assert killed_at < preempted_at < total, (killed_at, preempted_at)

    out = helpers.run(cmd).stdout
    assert min(helpers.losses(out)) == preempted_at + 1
    ref_losses, got = helpers.losses(ref_out), helpers.losses(out)
    for step in got:
        np.testing.assert_allclose(got[step], ref_losses[step], rtol=1e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(_flat(_export(work)), _flat(_export(reference)),
                               rtol=1e-5, atol=1e-6)


def _kill_at_first_checkpoint(cmd: list[str], work: str, total: int) -> int:
    """Starts `cmd`, SIGKILLs it once a checkpoint is on disk; returns that step."""
    proc = subprocess.Popen(cmd, cwd=helpers.REPO, env=helpers.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    helpers.wait_for(lambda: helpers.checkpoint_steps(work), 300, "a checkpoint", proc)
    proc.kill()
    proc.wait()
    killed_at = helpers.checkpoint_steps(work)[-1]
    assert killed_at < total, "the run finished before it could be killed"
    return killed_at


def _flat(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_two_processes_with_two_devices_match_one_process_with_four(tmp_path, data_dir):
    steps = 3
    args = _overrides(data_dir, steps)
    single = helpers.run(helpers.main_command(CONFIG, str(tmp_path / "single"), *args),
                         num_devices=4).stdout
    port = portpicker.pick_unused_port()
    procs = []
    for i in range(2):
        cmd = helpers.main_command(
            CONFIG, str(tmp_path / "multi"), *args, f"--coordinator_address=localhost:{port}",
            "--num_processes=2", f"--process_id={i}")
        procs.append(subprocess.Popen(cmd, cwd=helpers.REPO, env=helpers.env(2),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]
        outs.append(out)
    expected = helpers.losses(single)
    got = helpers.losses(outs[0])
    assert sorted(got) == list(range(1, steps + 1))
    assert not helpers.losses(outs[1]), "only process 0 prints progress"
    for step in expected:
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-5, err_msg=f"step {step}")


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    import jax
    import jax.numpy as jnp

    from dmae_jax import parallel
    from dmae_jax.train import common

    class Batches:
        position = 0

        def __next__(self):
            self.position += 1
            return {"x": np.ones((jax.device_count(), 2), np.float32)}

        def get_state(self):
            return {"position": self.position}

        def set_state(self, state):
            self.position = state["position"]

    def make_state(params):
        return {"params": params, "step": jnp.zeros((), jnp.int32)}

    def step_builder(shardings):
        def step(state, batch):
            loss = jnp.where(state["step"] >= 4, jnp.nan, jnp.sum(batch["x"]))
            return (dict(state, step=state["step"] + 1),
                    {"loss": loss, "grad_norm": jnp.float32(1.0)})
        return jax.jit(step)

    class Writer:
        def write_scalars(self, step, values):
            pass

        def flush(self):
            pass

    with pytest.raises(common.NonFiniteLossError, match="last good checkpoint is step 4"):
        common.run_training(
            workdir=str(tmp_path), mesh=parallel.make_mesh(),
            loop=common.LoopConfig(total_steps=10, log_every=1, ckpt_every=2, keep_ckpts=5,
                                   global_batch_size=4),
            step_builder=step_builder, init_params={"w": np.zeros(3, np.float32)},
            make_state=make_state, data_iter=Batches(), fingerprint={"t": 1}, writer=Writer())
    assert helpers.checkpoint_steps(str(tmp_path)) == [2, 4]


def test_checkpoint_of_another_model_is_an_error_not_a_fresh_start(tmp_path, data_dir):
    work = str(tmp_path / "w")
    helpers.run(helpers.main_command(CONFIG, work, *_overrides(data_dir, 3)))
    proc = helpers.run(helpers.main_command(
        CONFIG, work, *_overrides(data_dir, 6), "--config.model.decoder_depth=1"), check=False)
    assert proc.returncode == 2
    assert "different configuration" in proc.stderr


def test_vit_large_without_imagenet_is_a_clear_message(tmp_path):
    proc = helpers.run(helpers.main_command(
        "configs/vit_large.py", str(tmp_path / "w"), f"--config.data.data_dir={tmp_path}"),
        check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "imagenet2012" in proc.stderr and "Traceback" not in proc.stderr


def load_config(path: str, arg: str | None = None):
    """get_config(arg) of a config file, as config_flags loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", os.path.join(helpers.REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("field, value, message", [
    ("sigma", -0.25, "config.sigma must be > 0, got -0.25"),
    ("mask_ratio", 1.0, "config.mask_ratio must be in [0.0, 1.0), got 1.0"),
    ("model.variant", "gigantic", "config.model.variant must be one of"),
    ("data.dataset", "mnist", "config.data.dataset must be one of"),
    ("init_from", "/does/not/exist", "config.init_from = '/does/not/exist' does not exist"),
])
def test_bad_config_stops_at_start_naming_field_value_and_valid_values(field, value, message):
    from dmae_jax.train import pretrain

    config = load_config(CONFIG)
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError) as e:
        pretrain.validate(config)
    assert message in str(e.value)


def test_batch_not_divisible_by_devices_is_a_clear_error():
    from dmae_jax import parallel

    with pytest.raises(ValueError, match="config.batch_size must be a positive multiple of the "
                                         "device count \\(4\\).*got 6"):
        parallel.check_batch_size(6, "config.batch_size")


def test_killed_finetuning_resumes_to_the_uninterrupted_result(tmp_path, data_dir):
    args = [f"--config.data.data_dir={data_dir}", "--config.total_steps=12",
            "--config.log_every_steps=1", "--config.ckpt_every_steps=4",
            "--config.eval_every_steps=0", "--config.batch_size=16"]
    config = "configs/finetune_digits.py:sigma=0.5"
    reference = str(tmp_path / "reference")
    ref_out = helpers.run(helpers.main_command(config, reference, *args)).stdout
    work = str(tmp_path / "interrupted")
    cmd = helpers.main_command(config, work, *args)
    killed_at = _kill_at_first_checkpoint(cmd, work, 12)
    out = helpers.run(cmd).stdout
    assert min(helpers.losses(out)) == killed_at + 1
    ref_losses, got = helpers.losses(ref_out), helpers.losses(out)
    for step in got:
        np.testing.assert_allclose(got[step], ref_losses[step], rtol=1e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(_flat(_export(work)), _flat(_export(reference)),
                               rtol=1e-5, atol=1e-6)


def test_digits_pipeline_runs_end_to_end_and_a_rerun_resumes(tmp_path, data_dir):
    work = str(tmp_path / "digits")
    dirs = [f"--config.{stage}.data.data_dir={data_dir}"
            for stage in ("pretrain", "finetune", "certify")]
    cmd = helpers.main_command("configs/digits.py:runlocal", work, *dirs)
    first = helpers.run(cmd, timeout=900).stdout
    report = open(os.path.join(work, "report.md")).read()
    for name in ("sigma=0.25", "sigma=0.5", "sigma=1.0", "cascade", "ACR"):
        assert name in report
    for png in ("certified_accuracy.png", "reconstructions.png"):
        assert os.path.getsize(os.path.join(work, png)) > 1000
    assert helpers.losses(first), "the first run trains"
    second = helpers.run(cmd, timeout=900).stdout
    assert not helpers.losses(second), "a finished pipeline does not train again"
    assert "certify sigma=0.25" in second
