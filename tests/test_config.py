"""Every config file builds and validates with each argument it documents; `:arg` parsing."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re

import pytest

from dmae_jax import checks, defaults, tasks
from dmae_jax import config as config_lib
from dmae_jax.errors import ConfigError
from tests import helpers

CONFIG_FILES = sorted(os.path.relpath(p, helpers.REPO)
                      for p in glob.glob(os.path.join(helpers.REPO, "configs", "*.py")))
# `--config=configs/NAME.py[:arg]` as written in a config file's docstring commands.
_COMMAND = re.compile(r"--config=(configs/[\w]+\.py)(?::([^\s\\]+))?")
# Arguments a config declares in get_config's docstring but no command shows.
EXTRA_ARGS = {
    "configs/calibrate_denoiser_digits.py": ["runlocal"],
    "configs/cascade.py": ["dataset=cifar10,sigmas=0.5/0.25,n=1000"],
    "configs/train_denoiser_digits.py": ["runlocal"],
    "configs/digits.py": ["runlocal", "compare,runlocal"],
    "configs/finetune_cifar10.py": ["sigma=1.0,runlocal"],
    "configs/finetune_digits.py": ["sigma=1.0"],
    "configs/finetune_imagenet.py": ["variant=large,sigma=1.0", "runlocal"],
    "configs/pretrain_digits.py": ["runlocal"],
    "configs/vit_base.py": ["runlocal"],
    "configs/vit_large.py": ["runlocal"],
}
# Fields naming files a test machine does not have; validating stops at them.
_PATH_FIELDS = ("config.checkpoint", "config.checkpoints", "config.denoiser",
                "config.classifier", "config.init_from")


def load_config(path: str, arg: str | None = None):
    """get_config(arg) of a config file, as config_flags loads it."""
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(helpers.REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _documented() -> list[tuple[str, str | None]]:
    cases = set()
    for path in CONFIG_FILES:
        cases.add((path, None))
        for arg in EXTRA_ARGS.get(path, []):
            cases.add((path, arg))
        text = open(os.path.join(helpers.REPO, path)).read()
        for name, arg in _COMMAND.findall(text):
            if os.path.exists(os.path.join(helpers.REPO, name)):
                cases.add((name, arg or None))
    return sorted(cases, key=lambda c: (c[0], c[1] or ""))


def test_every_config_file_documents_a_command():
    for path in CONFIG_FILES:
        text = open(os.path.join(helpers.REPO, path)).read()
        assert f"--config={path}" in text, f"{path}: its docstring must show its command"


@pytest.mark.parametrize("path, arg", _documented())
def test_config_builds_resolves_and_validates(path, arg):
    config = load_config(path, arg)
    try:
        tasks.prepare(config)
    except checks.ConfigError as e:
        # Only a file the test machine lacks may stop validation, and the error says which.
        message = str(e)
        assert message.startswith(_PATH_FIELDS), message
        assert "does not exist" in message or "must name a" in message, message


def test_runlocal_is_a_declared_boolean_not_a_substring():
    full = load_config("configs/vit_base.py")
    assert load_config("configs/vit_base.py", "runlocal=True").total_steps == 10
    assert load_config("configs/vit_base.py", "runlocal").total_steps == 10
    assert load_config("configs/vit_base.py", "runlocal=false").to_dict() == full.to_dict()
    with pytest.raises(checks.ConfigError, match="config argument runlocal must be true or false"):
        load_config("configs/vit_base.py", "runlocal=maybe")
    with pytest.raises(checks.ConfigError, match="unknown config argument 'runlocals'"):
        load_config("configs/digits.py", "runlocals")


@pytest.mark.parametrize("path, arg, message", [
    ("configs/certify.py", "dataset=digitz",
     "config argument dataset must be one of ['imagenet2012', 'cifar10', 'digits'], got 'digitz'"),
    ("configs/certify.py", "sigma=abc", "config argument sigma must be a float, got 'abc'"),
    ("configs/certify.py", "n=1.5", "config argument n must be a int, got '1.5'"),
    ("configs/certify.py", "sigma", "config argument sigma needs a value (sigma=<float>)"),
    ("configs/cascade.py", "sigmas=1.0/x", "config argument sigmas must be a float, got 'x'"),
    ("configs/finetune_imagenet.py", "variant=huge", "config argument variant must be one of"),
    ("configs/denoise_certify_digits.py", "stage=both", "config argument stage must be one of"),
    ("configs/certify.py", "sigma=0.5,sigma=1.0", "config argument sigma is given twice"),
])
def test_bad_arg_is_one_config_error_naming_it(path, arg, message):
    with pytest.raises(checks.ConfigError) as e:
        load_config(path, arg)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_parse_arg_types():
    one_of = config_lib.OneOf
    args = config_lib.parse_arg("sigmas=0.5/0.25,flag,count=3,name=x,kind=b", sigmas=(1.0,),
                                flag=False, count=0, name="", kind=one_of("a", "b"),
                                other=one_of("p", "q"))
    assert args.to_dict() == {"sigmas": (0.5, 0.25), "flag": True, "count": 3, "name": "x",
                              "kind": "b", "other": "p"}
    assert config_lib.parse_arg(None, flag=False).flag is False


def test_arg_and_override_mean_the_same_once_resolved():
    by_arg = config_lib.resolve(load_config("configs/certify.py", "dataset=digits,sigma=1.0"))
    overridden = load_config("configs/certify.py", "dataset=digits")
    overridden.sigma = 1.0
    by_override = config_lib.resolve(overridden)
    assert by_arg.to_dict() == by_override.to_dict()
    assert by_override.log_name == "certify_sigma_1.0.tsv"

    finetune = load_config("configs/finetune_digits.py")
    finetune.sigma = 1.0
    assert config_lib.resolve(finetune).eta == 0.1
    assert config_lib.resolve(load_config("configs/finetune_digits.py", "sigma=1.0")).eta == 0.1
    assert config_lib.resolve(load_config("configs/finetune_digits.py", "sigma=0.5")).eta == 0.5


def test_resolve_keeps_values_the_user_set():
    cfg = load_config("configs/finetune_imagenet.py", "sigma=1.0")
    cfg.eta = 0.3
    assert config_lib.resolve(cfg).eta == 0.3
    cascade = load_config("configs/cascade.py", "sigmas=0.5/0.25")
    assert config_lib.resolve(cascade).log_name == "cascade_0.5_0.25.tsv"
    cascade.log_name = "mine.tsv"
    assert config_lib.resolve(cascade).log_name == "mine.tsv"


def test_digits_pipeline_keeps_a_users_eta():
    from dmae_jax.tasks import end_to_end

    config = load_config("configs/digits.py")
    assert [end_to_end._finetune_config(config, s, "").eta for s in (0.25, 0.5, 1.0)] == [
        0.5, 0.5, 0.1]
    config.finetune.eta = 0.3
    assert [end_to_end._finetune_config(config, s, "").eta for s in (0.25, 1.0)] == [0.3, 0.3]


def test_every_task_has_a_factory_with_every_loop_field():
    loop = ("seed", "num_epochs", "total_steps", "log_every_steps", "ckpt_every_steps",
            "keep_ckpts", "eval_every_steps", "mesh", "accum_steps", "profile_steps")
    for factory in (defaults.pretrain, defaults.finetune, defaults.train_denoiser,
                    defaults.calibrate_denoiser):
        cfg = factory()
        assert all(field in cfg for field in loop), factory.__name__
        checks.training_loop(cfg)
    names = {f().task for f in (defaults.pretrain, defaults.finetune, defaults.certify,
                                defaults.cascade, defaults.train_denoiser,
                                defaults.calibrate_denoiser, defaults.end_to_end)}
    assert names == set(tasks.TASKS)


# ---------------------------------------------------------------------------------------
# Bad values fail at start, in one line, before any data is loaded or anything compiled.
# ---------------------------------------------------------------------------------------


def _set(config, field: str, value) -> None:
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


_BAD_VALUES = [
    # (config file, field, value, message)
    ("configs/pretrain_digits.py", "data.image_size", 20,
     "config.data.image_size must be an integer in [1, config.model.img_size = 16]"),
    ("configs/finetune_digits.py", "data.image_size", 20,
     "config.data.image_size must be an integer in [1, config.model.img_size = 16]"),
    ("configs/pretrain_digits.py", "model.width", 130,
     "model.width must be divisible by 4 (sin-cos embedding) and by model.num_heads (4), "
     "got 130"),
    ("configs/finetune_digits.py", "model.patch_size", 5,
     "model.img_size must be divisible by model.patch_size (5), got 16"),
    ("configs/pretrain_digits.py", "mask_ratio", 0.95,
     "config.mask_ratio = 0.95 keeps no patch visible out of 16: it must be below 0.9375"),
    ("configs/pretrain_digits.py", "total_steps", -5,
     "config.total_steps must be an integer >= 1, or 0 to train num_epochs, got -5"),
    ("configs/calibrate_denoiser_digits.py", "total_steps", -1,
     "config.total_steps must be an integer >= 1, or 0 to train num_epochs, got -1"),
    ("configs/certify.py", "max", 0, "config.max must be -1 (every image) or >= 1, got 0"),
    ("configs/digits.py", "pretrain.log_every_steps", 0,
     "config.pretrain.log_every_steps must be an integer >= 1, got 0"),
    ("configs/digits.py", "finetune.data.image_size", 20,
     "config.finetune.data.image_size must be an integer in [1, config.finetune.model.img_size"),
    ("configs/certify.py", "max", -2, "config.max must be -1 (every image) or >= 1, got -2"),
] + [
    (path, field, value, f"config.{field} must be an integer >= 1, got {value}")
    for path in ("configs/pretrain_digits.py", "configs/finetune_digits.py",
                 "configs/train_denoiser_digits.py")
    for field in ("log_every_steps", "ckpt_every_steps", "keep_ckpts")
    for value in (0, -1)
] + [
    (path, "eval_every_steps", -1, "config.eval_every_steps must be an integer >= 1, or 0 "
     "for no evaluation, got -1")
    for path in ("configs/pretrain_digits.py", "configs/finetune_digits.py",
                 "configs/train_denoiser_digits.py")
]


@pytest.mark.parametrize("path, field, value, message", _BAD_VALUES)
def test_bad_value_fails_validation_in_one_line(path, field, value, message):
    import time

    import dmae_jax.models.vit  # noqa: F401  (imports are not what is timed)

    config = load_config(path)
    _set(config, field, value)
    start = time.monotonic()
    with pytest.raises(checks.ConfigError) as e:
        tasks.prepare(config)
    assert time.monotonic() - start < 3
    assert message in str(e.value) and "\n" not in str(e.value)


def test_workdir_that_is_a_file_or_not_writable_is_one_line(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(checks.ConfigError, match=f"--workdir={path} is a file, not a directory"):
        checks.workdir_usable(str(path))
    if os.access("/sys", os.W_OK) and os.path.exists("/sys/kernel"):
        with pytest.raises(checks.ConfigError,
                           match="--workdir=/sys/dmae_jax_test is not writable"):
            checks.workdir_usable("/sys/dmae_jax_test")
    checks.workdir_usable(str(tmp_path / "new" / "dir"))
    assert not os.path.exists(tmp_path / "new"), "checking a workdir must not create it"
    with pytest.raises(checks.ConfigError, match="is inside .*/file, a file, not a directory"):
        checks.workdir_usable(str(path / "sub"))


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    import errno

    from dmae_jax import errors

    def raising(error):
        return errors.reporting(lambda: (_ for _ in ()).throw(error))

    with pytest.raises(SystemExit) as e:
        raising(errors.CheckpointError("step 4 is unreadable"))()
    assert e.value.code == 2 and capsys.readouterr().err == "error: step 4 is unreadable\n"

    disk = RuntimeError("save failed")
    disk.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SystemExit):
        raising(disk)()
    assert capsys.readouterr().err == (
        "error: cannot write to disk: [Errno 28] No space left on device; free space and "
        "rerun the same command to resume\n")

    # A message that restates an inner error (`raise ... from None`) is the one reported.
    try:
        try:
            raise ConfigError("config.sigma must be > 0, got -1.0")
        except ConfigError as inner:
            raise ConfigError(str(inner).replace("config.", "config.pretrain.")) from None
    except ConfigError as restated:
        with pytest.raises(SystemExit):
            raising(restated)()
    assert capsys.readouterr().err == "error: config.pretrain.sigma must be > 0, got -1.0\n"

    bug = ValueError("cannot reshape array of size 128 into shape (8,5,5)")
    with pytest.raises(ValueError, match="cannot reshape"):
        raising(bug)()


def test_bad_command_lines_are_one_line_each(tmp_path):
    import subprocess
    import sys
    import time

    work = str(tmp_path / "w")
    (tmp_path / "file").write_text("")
    cases = [
        (["--config=configs/certify.py", "--config.sigmaa=0.5"],
         "error: --config.sigmaa: the config has no field 'sigmaa'; did you mean 'sigma'?"),
        (["--config=configs/certify.py:dataset=digitz"],
         "error: config argument dataset must be one of ['imagenet2012', 'cifar10', "
         "'digits'], got 'digitz'"),
        (["--config=configs/certify.py:sigma=abc"],
         "error: config argument sigma must be a float, got 'abc'"),
        (["--config=configs/no_such_config.py"],
         "error: --config: no such config file 'configs/no_such_config.py'"),
        (["--config=configs/pretrain_digits.py", "--config.log_every_steps=0"],
         "error: config.log_every_steps must be an integer >= 1, got 0"),
        (["--config=configs/pretrain_digits.py", f"--workdir={tmp_path / 'file'}"],
         f"error: --workdir={tmp_path / 'file'} is a file, not a directory"),
    ]
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "dmae_jax.main", f"--workdir={work}", *args],
                              cwd=helpers.REPO, env=helpers.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for proc, (args, expected) in zip(procs, cases, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (args, err[-2000:])
        assert err == expected + "\n", (args, err[-2000:])
    assert time.monotonic() - start < 60


# What validation must not import: each costs seconds before a typo can be reported.
_HEAVY = ("jax", "flax", "optax", "orbax", "scipy", "tensorflow", "grain")
_VALIDATE_ONLY = """
import contextlib, io, json, runpy, sys
from dmae_jax import tasks
from dmae_jax.errors import ConfigError
from tests.test_config import _HEAVY, _documented, load_config

for path, arg in _documented():  # every documented config, every task's checks
    try:
        tasks.prepare(load_config(path, arg), sys.argv[1])
    except ConfigError:
        pass  # an export the test machine lacks; the checks before it ran
for argv in (["dmae_jax.main", "--config=configs/digits.py", "--workdir=" + sys.argv[1],
              "--config.pretrain.sigma=-1"],
             ["dmae_jax.report", sys.argv[1] + "/missing.tsv"]):
    sys.argv[:] = argv
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            assert e.code == 2 and err.getvalue().startswith("error: "), (e.code, err.getvalue())
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(_HEAVY))))
"""


def test_validation_imports_neither_jax_nor_flax(tmp_path):
    """Every documented config validated, and `main`'s and `report`'s error paths run, in one
    fresh process that never imports JAX, Flax, Optax, Orbax, SciPy, TensorFlow or Grain: the
    models' rules are plain Python (`dmae_jax.architectures`), so a bad value is reported
    about half a second after the command starts, not after JAX's 2-4 s import."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _VALIDATE_ONLY, str(tmp_path)],
                          cwd=helpers.REPO, env=helpers.env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [], proc.stdout


def test_validation_import_check_can_fail(tmp_path):
    """Control: the same check run after `import jax` reports it (the check is not vacuous)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import jax\n" + _VALIDATE_ONLY,
                           str(tmp_path)], cwd=helpers.REPO, env=helpers.env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jax" in json.loads(proc.stdout.splitlines()[-1])


def test_library_reports_of_a_full_disk_are_left_to_the_one_error_line():
    import logging

    from dmae_jax import errors

    def record(message, level=logging.ERROR):
        path = os.path.join("site-packages", "orbax", "checkpoint", "future.py")
        return logging.LogRecord("absl", level, path, 1, message, None, None)

    quiet = errors._DiskFullReports()
    assert not quiet.filter(record('RESOURCE_EXHAUSTED: Error writing "opt_state/0"'))
    assert not quiet.filter(record("[Errno 28] No space left on device"))
    assert quiet.filter(record("some other save failure"))
    assert quiet.filter(record("No space left on device", logging.WARNING))


def test_closed_event_loop_and_full_disk_reports_are_dropped_other_ones_kept():
    import errno
    import types

    from dmae_jax import errors

    seen = []
    hook = errors.without_disk_full_reports(seen.append)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    full = types.SimpleNamespace(exc_value=OSError(errno.ENOSPC, "No space left on device"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    for report in (closed, full, other):
        hook(report)
    assert seen == [other]


def test_validation_knows_the_engines_noises():
    from dmae_jax.smoothing import settings

    assert checks.CERTIFY_NOISES == settings.NOISES
    config = config_lib.resolve(defaults.certify("digits", 0.25))
    config.noise = "exact"
    with pytest.raises(ConfigError, match=r"config.noise must be one of \['float', 'sound'\]"):
        checks.certification(config, exports=False)
