"""Orbax checkpoints: parameter exports and resumable training state.

Two kinds of checkpoint live here:

* a *parameter export* (`save_params` / `load_params`): a directory with `params/` (an Orbax
  PyTree of arrays, the pure-dict form of `nnx.state(model, nnx.Param)`) and `meta.json`
  (what model it is). The importers write these; fine-tuning, certification and the
  denoise-and-classify pipeline start from them;
* the *training state* (`TrainCheckpointer`): an Orbax `CheckpointManager` under
  `<workdir>/checkpoints` with async saves, keep-last-N, and two items per step: `state`
  (params, optimizer state, step, RNG key) and `extra` (JSON: data-iterator position, a
  fingerprint of the model config). A run restarted on the same workdir resumes from the
  newest complete step; a checkpoint that cannot be read, or that belongs to another
  model, is an error, never a silent fresh start.
"""

from __future__ import annotations

import json
import os
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
# Parameter exports.
# ---------------------------------------------------------------------------------------


def save_params(directory: str | os.PathLike, params: Mapping[str, Any], meta: Mapping[str, Any]):
    """Writes `params` (a pure nested dict of arrays) and JSON `meta` to `directory`."""
    path = epath.Path(directory).absolute()
    if (path / "params").exists():
        raise CheckpointError(f"{path} already holds a parameter export; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(np.asarray, dict(params))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", params)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        (path / "meta.json").write_text(json.dumps(dict(meta), indent=2, sort_keys=True))


def load_params(directory: str | os.PathLike) -> tuple[dict, dict]:
    """Reads a parameter export: returns (params as a nested dict of numpy arrays, meta)."""
    path = epath.Path(directory).absolute()
    if not (path / "params").exists() or not (path / "meta.json").exists():
        raise CheckpointError(
            f"{path} is not a dmae_jax parameter export (expected params/ and meta.json); "
            "create one with `python -m dmae_jax.convert` or point at a training workdir's "
            "export/ directory"
        )
    try:
        meta = json.loads((path / "meta.json").read_text())
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path / "params")
    except Exception as e:  # Orbax raises many types; the message is what matters here.
        raise CheckpointError(f"could not read the parameter export at {path}: {e}") from e
    return _int_keys(jax.tree.map(np.asarray, params)), meta


def _int_keys(tree: Any) -> Any:
    """Orbax stores dict keys as strings; list indices (`blocks/3`) come back as ints."""
    if isinstance(tree, Mapping):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
                for k, v in tree.items()}
    return tree


def load_params_checked(
    directory: str | os.PathLike, *, kind: str, field: str
) -> tuple[dict, dict]:
    """Like `load_params`, but the export must be of `kind` ("dmae", "classifier", "unet")."""
    if not directory:
        raise ValueError(f"{field} must name a parameter export directory, got {directory!r}")
    if not epath.Path(directory).exists():
        raise ValueError(f"{field} = {directory!r} does not exist")
    params, meta = load_params(directory)
    if meta.get("kind") != kind:
        raise CheckpointError(
            f"{field} = {directory!r} holds a {meta.get('kind')!r} export, expected {kind!r}"
        )
    return params, meta


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
        _check_shapes(abstract_state, state, where)
        return step, state, extra

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _check_shapes(expected: Any, restored: Any, where: Any) -> None:
    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    flat_r = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
    for path, leaf in flat_e:
        got = flat_r.get(path)
        if got is None or tuple(got.shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"the checkpoint at {where} has {jax.tree_util.keystr(path)} with shape "
                f"{None if got is None else tuple(got.shape)}, this model expects "
                f"{tuple(leaf.shape)}"
            )


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
