"""The rest of a run's path once `tasks.prepare` has resolved and validated its config:
lock, check, record, run (the steps are in `dmae_jax.tasks`'s docstring).

`main` calls `execute` after joining the other processes of a multi-host job; each stage of
`end_to_end` calls `run`, which prepares its config first. Process 0 takes the lock and
writes the records; every process checks, so all of them refuse alike.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging

from dmae_jax import checkpoints, storage, tasks
from dmae_jax import config as config_lib
from dmae_jax.tasks import identity
from dmae_jax.train import common


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The whole path for one run: prepare, then `execute`."""
    task, config = tasks.prepare(config, workdir)
    execute(task, config, workdir)


def run_together(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str]) -> None:
    """The whole path for fine-tunings trained in one loop (`finetune.run_together`): each
    prepared, locked, checked and recorded as `run` does it alone, all before any trains."""
    from dmae_jax.tasks import finetune

    prepared = [tasks.prepare(config, workdir)
                for config, workdir in zip(configs, workdirs, strict=True)]
    with contextlib.ExitStack() as stack:
        for (task, config), workdir in zip(prepared, workdirs, strict=True):
            if task.module != finetune.__name__:
                raise ValueError(f"only fine-tunings train together, got task {task.name!r}")
            logging.info("task %s, workdir %s\n%s", task.name, workdir, config)
            stack.enter_context(_lock(task, config, workdir))
        for (_, config), workdir in zip(prepared, workdirs, strict=True):
            checkpoints.check_fingerprint(workdir, common.fingerprint(config))
        if jax.process_index() == 0:
            for (_, config), workdir in zip(prepared, workdirs, strict=True):
                config_lib.save_resolved(config, os.path.join(workdir, "config.json"))
        finetune.run_together([config for _, config in prepared], workdirs)


def execute(task: tasks.Task, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Lock, check, record and run a prepared (resolved, validated) `config` of `task`.

    A LockError, CheckpointError (another config fingerprint) or IdentityError stops the
    run before it writes anything: the records of the run it was refused for stay as they
    were.
    """
    logging.info("task %s, workdir %s\n%s", task.name, workdir, config)
    with _lock(task, config, workdir):
        module = importlib.import_module(task.module)
        if task.kind == "certify":
            log_record = module.check(config, workdir)
        elif task.kind == "train":
            checkpoints.check_fingerprint(workdir, common.fingerprint(config))
        if jax.process_index() == 0:
            if task.kind == "certify":
                log = _log_path(config, workdir)
                config_lib.save_resolved(config, log + ".config.json")
                identity.record(log, log_record)
            else:
                config_lib.save_resolved(config, os.path.join(workdir, "config.json"))
        module.run(config, workdir)


def _log_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    return os.path.join(workdir, config.log_name)


def _lock(task: tasks.Task, config: ml_collections.ConfigDict,
          workdir: str) -> storage.WorkdirLock:
    """The workdir's lock (trainers, the pipeline) or the log's (certify, cascade)."""
    if task.kind == "certify":
        path = _log_path(config, workdir)
        return storage.WorkdirLock(os.path.dirname(path), name=os.path.basename(path) + ".lock",
                                  busy=f"{path} is being written by another certification run")
    if task.kind == "pipeline":
        return storage.WorkdirLock(workdir, busy=f"workdir {workdir} is in use by another "
                                                "run of the pipeline")
    return storage.WorkdirLock(workdir)
