"""Orbax checkpoints of the resumable training state (parameter exports: `dmae_jax.exports`).

* the *training state* (`TrainCheckpointer`): an Orbax `CheckpointManager` under
  `<workdir>/checkpoints` with async saves, keep-last-N, and two items per step: `state`
  (params, optimizer state, step, RNG key) and `extra` (JSON: data-iterator position, a
  fingerprint of the model config). A run restarted on the same workdir resumes from the
  newest complete step; a checkpoint that cannot be read, or that belongs to another
  model, is an error, never a silent fresh start.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dmae_jax.errors import CheckpointError

# ---------------------------------------------------------------------------------------
# Training state.
# ---------------------------------------------------------------------------------------


class TrainCheckpointer:
    """Resumable training checkpoints under `<workdir>/checkpoints` (Orbax, async, keep-N)."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, fingerprint: Mapping[str, Any]):
        self.directory = epath.Path(workdir).absolute() / "checkpoints"
        self.fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=True,
                create=True,
            ),
            item_names=("state", "extra"),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, extra: Mapping[str, Any]) -> None:
        """Starts an async save of `state` (a pytree of arrays) and JSON `extra` at `step`."""
        extra = dict(extra, fingerprint=self.fingerprint)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)
            ),
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
        """Restores the newest (or the given) step into the shapes/shardings of `abstract_state`.

        Returns None when there is no checkpoint; raises CheckpointError when one exists but
        cannot be read or belongs to a different model configuration.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        where = self.directory / str(step)
        try:
            extra = self.manager.restore(
                step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())
            )["extra"]
        except Exception as e:
            raise CheckpointError(
                f"the checkpoint at {where} cannot be read ({type(e).__name__}: {e}). Not "
                "starting from scratch: delete that step directory to fall back to an older "
                "one, or use another --workdir"
            ) from e
        if extra.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"the checkpoint at {where} was written for a different configuration:\n"
                f"  checkpoint: {extra.get('fingerprint')}\n  this run:   {self.fingerprint}\n"
                "Use another --workdir, or restore the original config."
            )
        try:
            state = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )["state"]
        except Exception as e:
            raise CheckpointError(
                f"the checkpoint at {where} does not match this model's state "
                f"({type(e).__name__}: {e})"
            ) from e
        from dmae_jax.exports import match_tree

        match_tree(abstract_state, state, where=f"the checkpoint at {where}")
        return step, state, extra

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------------------
# Preemption.
# ---------------------------------------------------------------------------------------


class PreemptionWatcher:
    """Turns SIGTERM (a preemption notice) into a flag that the loop polls at each step.

    Every process of a multi-host job must agree on the step at which to stop, so the flag
    is OR-reduced across processes before it is acted on.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._event.set()

    def should_stop(self) -> bool:
        """True once any process has received SIGTERM (collective when multi-process)."""
        flag = self._event.is_set()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
        return flag

    def restore_handler(self) -> None:
        """Puts back the SIGTERM handler that was installed before this watcher."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
