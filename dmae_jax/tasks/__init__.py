"""The tasks `python -m dmae_jax.main` runs, and the one path every run takes.

  task                what                                                module (tasks/)
  pretrain            DMAE pretraining                                    pretrain.py
  finetune            smoothed-classifier fine-tuning, linear probing     finetune.py
  certify             Cohen et al.'s CERTIFY over a data set              certification.py
  cascade             the multi-scale cascade over several sigmas         certification.py
  train_denoiser      DDPM training of a diffusion denoiser               train_denoiser.py
  calibrate_denoiser  denoiser calibration against a fixed classifier     calibrate_denoiser.py
  end_to_end          the digits pipeline, each stage a run of its own    end_to_end.py

Whoever starts a run (`main`, each stage of `end_to_end`; `aot` up to validation), it goes:

  resolve   fill in the fields derived from others (`config.resolve`)
  validate  every field (`checks.<task>`) and the workdir: no data, checkpoint or parameter
            is read (an export's meta.json is), no data or checkpoint library imported
  lock      the workdir (trainers, end_to_end) or the log (certify, cascade): one writer
  check     the newest checkpoint's config fingerprint (trainers), the log's identity and
            subset (certification): a resume under another configuration stops here
  record    the resolved config (`<workdir>/config.json`, or `<log>.config.json`) and the
            log's identity (`<log>.identity.json`)
  run       the task module's `run(config, workdir)`

Nothing is written before `record`, so a run refused at any step leaves the files of the run
it was refused for as they were. `prepare` here is the first two steps, cheap enough to
fail a typo in about a second; `dmae_jax.tasks.execute` is the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from dmae_jax import checks
from dmae_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: what it is, where its `run` is, how its config is checked, what it writes.

    kind: "train" (locks its workdir, resumes from checkpoints), "certify" (locks its log,
    resumes after the last logged image) or "pipeline" (locks its workdir; its stages are
    runs of their own).
    """

    name: str
    what: str
    module: str
    validate: Callable[..., None]  # (config, *, exports=True): `checks.<task>`
    kind: str


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("pretrain", "DMAE pretraining", "dmae_jax.tasks.pretrain", checks.pretrain, "train"),
    Task("finetune", "smoothed-classifier fine-tuning or linear probing",
         "dmae_jax.tasks.finetune", checks.finetune, "train"),
    Task("certify", "Cohen et al.'s CERTIFY over a data set", "dmae_jax.tasks.certification",
         checks.certification, "certify"),
    Task("cascade", "the multi-scale cascade over several sigmas",
         "dmae_jax.tasks.certification", checks.certification, "certify"),
    Task("train_denoiser", "DDPM training of a diffusion denoiser",
         "dmae_jax.tasks.train_denoiser", checks.train_denoiser, "train"),
    Task("calibrate_denoiser", "denoiser calibration against a fixed classifier",
         "dmae_jax.tasks.calibrate_denoiser", checks.calibrate_denoiser, "train"),
    Task("end_to_end", "the digits pipeline: pretrain, fine-tune, certify, cascade, report",
         "dmae_jax.tasks.end_to_end", checks.end_to_end, "pipeline"),
)}


def task_of(config: ml_collections.ConfigDict) -> Task:
    """The task `config.task` names (a ConfigError lists the valid ones)."""
    checks.one_of(config, "task", TASKS)
    return TASKS[config.task]


def prepare(config: ml_collections.ConfigDict, workdir: str | None = None, *,
            exports: bool = True) -> tuple[Task, ml_collections.ConfigDict]:
    """Resolve and validate: (the task, a resolved copy of `config`), or a ConfigError.

    `workdir`, when given, must be a directory this process can write or create (nothing is
    created here). `exports=False` leaves out the checks that read the exports the config
    names (the compile-only mode needs shapes only).
    """
    task = task_of(config)
    config = config_lib.resolve(config)
    task.validate(config, exports=exports)
    if workdir is not None:
        checks.workdir_usable(workdir)
    return task, config
