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
    assert f"resumed from step {killed_at} of {total}" in "".join(seen)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, rest
    preempted_at = helpers.checkpoint_steps(work)[-1]
    assert killed_at < preempted_at < total, (killed_at, preempted_at)

    out = helpers.run(cmd).stdout
    assert min(helpers.losses(out)) == preempted_at + 1
    assert f"resumed from step {preempted_at} of {total}" in out
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


def test_nonfinite_loss_stops_before_saving_and_names_no_unverified_step(tmp_path, data_dir,
                                                                        monkeypatch):
    from dmae_jax.data import pipeline
    from dmae_jax.tasks import pretrain
    from dmae_jax.train import common

    config = load_config(CONFIG)
    config.data.data_dir = data_dir
    config.update(total_steps=10, log_every_steps=1, ckpt_every_steps=2, eval_every_steps=0,
                  batch_size=16)
    config.model.update(depth=1, decoder_depth=1)  # compiles in a fraction of the time
    real, calls = pipeline.TrainIterator.__next__, []

    def poisoned_after_four(iterator):
        calls.append(1)
        batch = real(iterator)
        if len(calls) > 4:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch

    monkeypatch.setattr(pipeline.TrainIterator, "__next__", poisoned_after_four)
    with pytest.raises(common.NonFiniteLossError) as e:
        pretrain.run(config, str(tmp_path))
    message = str(e.value)
    assert message.startswith("loss=nan grad_norm=nan at step 5: stopping without saving it.")
    assert "whose checksums verify" in message and "step 4" not in message
    assert helpers.checkpoint_steps(str(tmp_path)) == [2, 4]


def test_accumulated_micro_batches_make_the_same_step_as_the_whole_batch():
    import jax
    import jax.numpy as jnp
    import optax

    from dmae_jax import parallel
    from dmae_jax.train import common

    def loss_fn(params, batch, rng):
        del rng
        return jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"])), {}

    mesh = parallel.make_mesh()
    tx = optax.sgd(0.1)
    params = {"w": np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(3, 2)}
    n = 4 * jax.device_count()
    rows = np.arange(n * 3, dtype=np.float32).reshape(n, 3) / (n * 3)
    batch = parallel.global_batch({"x": rows, "y": np.cos(rows[:, :2])}, mesh)

    def make_state(p):
        return common.init_state(p, tx, jax.random.key(0))

    shardings = common.state_shardings(make_state, params, mesh)
    results = []
    for accum_steps in (1, 2):
        step = common.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=shardings,
                                      accum_steps=accum_steps)
        state, measurements = step(jax.jit(make_state, out_shardings=shardings)(params), batch)
        results.append((np.asarray(state["params"]["w"]), float(measurements["loss"])))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-6)


def test_a_second_writer_on_a_workdir_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    from dmae_jax import storage
    from dmae_jax.errors import LockError

    work = str(tmp_path / "w")
    os.makedirs(work)
    # A lock file left by a process that is gone (no kernel lock held on it).
    with open(os.path.join(work, storage.LOCK_FILE), "w") as f:
        f.write("pid 999999 on elsewhere since 2020-01-01 00:00:00\n")
    with storage.WorkdirLock(work):
        with open(os.path.join(work, storage.LOCK_FILE)) as f:
            assert f.read().startswith(f"pid {os.getpid()} ")
        with pytest.raises(LockError, match="in use"), storage.WorkdirLock(work):
            pass  # taken once per run: not even this process takes it twice
        before = os.listdir(work)
        proc = helpers.run(helpers.main_command(CONFIG, work), check=False, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"workdir {work} is in use by another training run (pid {os.getpid()} " \
            in proc.stderr and "Traceback" not in proc.stderr
        assert os.listdir(work) == before, "the refused run wrote into the workdir"
    with storage.WorkdirLock(work):
        pass  # released: the next run gets it


def test_ctrl_c_and_sigterm_request_a_save_and_the_matching_exit_code():
    import signal

    from dmae_jax.train import common

    class Checkpoints:
        directory = "ckpt"

        def wait(self):
            pass

    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        with common.StopSignals() as stop:
            assert not stop.requested(sync=False)
            os.kill(os.getpid(), signum)
            assert stop.requested(sync=False), "a single process checks at every step"
            with pytest.raises(SystemExit) as e:
                stop.exit(7, Checkpoints())
            assert e.value.code == code
        assert signal.getsignal(signum) is not stop._handle


def test_stop_check_of_several_processes_gathers_only_on_sync_steps(monkeypatch):
    import jax
    from jax.experimental import multihost_utils

    from dmae_jax.train import common

    gathers = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: gathers.append(x) or np.stack([x, ~x]))
    stop = common.StopSignals()
    assert not any(stop.requested(sync=False) for _ in range(100))
    assert not gathers, "no host synchronisation between log and checkpoint steps"
    assert stop.requested(sync=True), "another process was signalled"
    assert len(gathers) == 1


def test_progress_leaves_compilation_out_of_the_eta_and_says_resumed_or_complete(capsys):
    import jax.numpy as jnp

    from dmae_jax.train import common

    class Writer:
        def __init__(self):
            self.scalars = {}

        def write_scalars(self, step, values):
            self.scalars[step] = values

    writer = Writer()
    progress = common.Progress(writer, None, first_step=10, total_steps=20,
                               global_batch_size=8)
    for step in (11, 12):
        progress.report(step, {"loss": jnp.float32(0.5), "grad_norm": jnp.float32(1.0)})
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("step 11/20 loss=0.5000") and "with compilation" in first
    assert "ETA" not in first and "images_per_sec" not in writer.scalars[11]
    assert "img/s ETA" in second and "images_per_sec" in writer.scalars[12]

    class Checkpoints:
        directory = "ckpt"

        def __init__(self, step):
            self.step = step

        def restore(self, abstract):
            return self.step, {"params": {}}, {"data_iter": {"position": 3}}

    class Batches:
        def set_state(self, state):
            self.state = state

    for step, said in ((6, "resumed from step 6 of 20"), (20, "already complete")):
        batches = Batches()
        state, first_step = common.restore_or_init(
            Checkpoints(step), lambda p: {"params": p}, {}, {"params": {}}, batches, 20)
        assert first_step == step and batches.state == {"position": 3}
        assert said in capsys.readouterr().out


def test_profile_steps_write_a_trace_to_the_workdir(tmp_path):
    import jax
    import jax.numpy as jnp

    from dmae_jax import checks
    from dmae_jax.errors import ConfigError
    from dmae_jax.train import common

    state = jnp.ones((64, 64))
    with common.Profiler((2, 4), str(tmp_path)) as profiler:
        for step in range(1, 6):
            profiler.step(step, state)
            state = jax.jit(lambda x: x @ x / 64.0)(state)
    traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files
              if f.endswith(".xplane.pb")]
    assert traces, "no trace written"
    assert checks.profile_steps(()) == (0, 0)
    for bad in ((3,), (5, 5), (0, 2), "1,2"):
        with pytest.raises(ConfigError, match="config.profile_steps must be"):
            checks.profile_steps(bad)


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
    from dmae_jax import tasks

    config = load_config(CONFIG)
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError) as e:
        tasks.prepare(config)
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
    for name in ("sigma=0.25", "sigma=0.5", "sigma=1.0", "cascade", "ACR",
                 "reconstruction MSE", "of flat blocks"):
        assert name in report
    for png in ("certified_accuracy.png", "reconstructions.png"):
        assert os.path.getsize(os.path.join(work, png)) > 1000
    assert helpers.losses(first), "the first run trains"
    second = helpers.run(cmd, timeout=900).stdout
    assert not helpers.losses(second), "a finished pipeline does not train again"
    assert "certify sigma=0.25" in second
