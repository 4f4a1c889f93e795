r"""Entry point: `python -m dmae_jax.main --config=configs/NAME.py[:arg] --workdir=DIR`.

Parses the ml_collections config (overrides as `--config.key=value`), joins the other
processes of a multi-host job, and runs `config.task`:

  pretrain            DMAE pretraining (dmae_jax/train/pretrain.py)
  finetune            smoothed-classifier fine-tuning / linear probing (train/finetune.py)
  certify             Cohen et al. CERTIFY over a data set (smoothing/tasks.py)
  cascade             multi-scale cascaded certification (smoothing/tasks.py)
  train_denoiser      DDPM training of a diffusion denoiser (train/denoiser.py)
  finetune_denoiser   denoiser calibration with a frozen classifier (train/denoiser.py)
  pipeline            the whole digits pipeline end to end (dmae_jax/pipeline.py)
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dmae_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to the config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and reports go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process GPU/CPU runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

_RUNNERS = {
    "pretrain": "dmae_jax.train.pretrain",
    "finetune": "dmae_jax.train.finetune",
    "certify": "dmae_jax.smoothing.tasks",
    "cascade": "dmae_jax.smoothing.tasks",
    "train_denoiser": "dmae_jax.train.denoiser",
    "finetune_denoiser": "dmae_jax.train.denoiser",
    "pipeline": "dmae_jax.pipeline",
}


def main(argv) -> None:
    """Validates the config, initialises distributed JAX, dispatches the task."""
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/NAME.py is required")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir=DIR is required (checkpoints and logs go there)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not flags.FLAGS["verbosity"].present:
        # Progress, evaluation and reports are printed; absl INFO (Orbax's per-save chatter)
        # only with --verbosity=0.
        logging.set_verbosity(logging.WARNING)
    task = config_lib.task(config)
    module = importlib.import_module(_RUNNERS[task])
    module.validate(config)

    from dmae_jax import parallel

    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("task %s, workdir %s\n%s", task, _WORKDIR.value, config)
    module.run(config, _WORKDIR.value)


def _run() -> None:
    """Runs main; a config or data problem is one clear line on stderr, not a traceback."""
    from dmae_jax.checkpoints import CheckpointError

    expected = (config_lib.ConfigError, CheckpointError, FileNotFoundError, ValueError)
    try:
        from dmae_jax.data.datasets import DatasetNotFoundError

        expected = expected + (DatasetNotFoundError,)
    except ImportError:
        pass

    def guarded(argv):
        try:
            main(argv)
        except expected as e:
            logging.error("%s: %s", type(e).__name__, e)
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(guarded)


if __name__ == "__main__":
    _run()
