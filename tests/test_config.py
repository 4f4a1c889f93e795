"""Every config file builds and validates with each argument it documents; `:arg` parsing."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re

import pytest

from dmae_jax import config as C
from dmae_jax import defaults
from tests import helpers

CONFIG_FILES = sorted(os.path.relpath(p, helpers.REPO)
                      for p in glob.glob(os.path.join(helpers.REPO, "configs", "*.py")))
# `--config=configs/NAME.py[:arg]` as written in a config file's docstring commands.
_COMMAND = re.compile(r"--config=(configs/[\w]+\.py)(?::([^\s\\]+))?")
# Arguments a config declares in get_config's docstring but no command shows.
EXTRA_ARGS = {
    "configs/calibrate_digits.py": ["runlocal"],
    "configs/cascade.py": ["dataset=cifar10,sigmas=0.5/0.25,n=1000"],
    "configs/denoiser_digits.py": ["runlocal"],
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
_RUNNERS = {
    "pretrain": "dmae_jax.train.pretrain",
    "finetune": "dmae_jax.train.finetune",
    "certify": "dmae_jax.smoothing.tasks",
    "cascade": "dmae_jax.smoothing.tasks",
    "train_denoiser": "dmae_jax.train.denoiser",
    "finetune_denoiser": "dmae_jax.train.denoiser",
    "pipeline": "dmae_jax.pipeline",
}


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
    config = C.resolve(load_config(path, arg))
    module = importlib.import_module(_RUNNERS[C.task(config)])
    try:
        module.validate(config)
    except C.ConfigError as e:
        # Only a file the test machine lacks may stop validation, and the error says which.
        message = str(e)
        assert message.startswith(_PATH_FIELDS), message
        assert "does not exist" in message or "must name a parameter export" in message, message


def test_runlocal_is_a_declared_boolean_not_a_substring():
    full = load_config("configs/vit_base.py")
    assert load_config("configs/vit_base.py", "runlocal=True").total_steps == 10
    assert load_config("configs/vit_base.py", "runlocal").total_steps == 10
    assert load_config("configs/vit_base.py", "runlocal=false").to_dict() == full.to_dict()
    with pytest.raises(C.ConfigError, match="config argument runlocal must be true or false"):
        load_config("configs/vit_base.py", "runlocal=maybe")
    with pytest.raises(C.ConfigError, match="unknown config argument 'runlocals'"):
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
    with pytest.raises(C.ConfigError) as e:
        load_config(path, arg)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_parse_arg_types():
    args = C.parse_arg("sigmas=0.5/0.25,flag,count=3,name=x,kind=b", sigmas=(1.0,), flag=False,
                       count=0, name="", kind=C.OneOf("a", "b"), other=C.OneOf("p", "q"))
    assert args.to_dict() == {"sigmas": (0.5, 0.25), "flag": True, "count": 3, "name": "x",
                              "kind": "b", "other": "p"}
    assert C.parse_arg(None, flag=False).flag is False


def test_arg_and_override_mean_the_same_once_resolved():
    by_arg = C.resolve(load_config("configs/certify.py", "dataset=digits,sigma=1.0"))
    overridden = load_config("configs/certify.py", "dataset=digits")
    overridden.sigma = 1.0
    by_override = C.resolve(overridden)
    assert by_arg.to_dict() == by_override.to_dict()
    assert by_override.log_name == "certify_sigma_1.0.tsv"

    finetune = load_config("configs/finetune_digits.py")
    finetune.sigma = 1.0
    assert C.resolve(finetune).eta == 0.1
    assert C.resolve(load_config("configs/finetune_digits.py", "sigma=1.0")).eta == 0.1
    assert C.resolve(load_config("configs/finetune_digits.py", "sigma=0.5")).eta == 0.5


def test_resolve_keeps_values_the_user_set():
    cfg = load_config("configs/finetune_imagenet.py", "sigma=1.0")
    cfg.eta = 0.3
    assert C.resolve(cfg).eta == 0.3
    cascade = load_config("configs/cascade.py", "sigmas=0.5/0.25")
    assert C.resolve(cascade).log_name == "cascade_0.5_0.25.tsv"
    cascade.log_name = "mine.tsv"
    assert C.resolve(cascade).log_name == "mine.tsv"


def test_digits_pipeline_keeps_a_users_eta():
    from dmae_jax import pipeline

    config = load_config("configs/digits.py")
    assert [pipeline._finetune_config(config, s, "").eta for s in (0.25, 0.5, 1.0)] == [
        0.5, 0.5, 0.1]
    config.finetune.eta = 0.3
    assert [pipeline._finetune_config(config, s, "").eta for s in (0.25, 1.0)] == [0.3, 0.3]


def test_every_task_has_a_factory_with_every_loop_field():
    loop = ("seed", "num_epochs", "total_steps", "log_every_steps", "ckpt_every_steps",
            "keep_ckpts", "eval_every_steps", "mesh", "accum_steps")
    for factory in (defaults.pretrain, defaults.finetune, defaults.train_denoiser,
                    defaults.finetune_denoiser):
        cfg = factory()
        assert all(field in cfg for field in loop), factory.__name__
        C.training_loop(cfg)
    tasks = {f().task for f in (defaults.pretrain, defaults.finetune, defaults.certify,
                                defaults.cascade, defaults.train_denoiser,
                                defaults.finetune_denoiser, defaults.pipeline)}
    assert tasks == set(C.TASKS)
