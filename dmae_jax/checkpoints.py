"""Orbax checkpoints of the resumable training state (parameter exports: `dmae_jax.exports`).

* the *training state* (`TrainCheckpointer`): an Orbax `CheckpointManager` under
  `<workdir>/checkpoints` with async saves, keep-last-N, and two items per step: `state`
  (params, optimizer state, step, RNG key) and `extra` (JSON: data-iterator position, a
  fingerprint of the model config). A run restarted on the same workdir resumes from the
  newest readable step (an unreadable newer one is set aside with a warning); a checkpoint
  of another configuration, or none readable, is an error, never a silent fresh start.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from dmae_jax import config as config_lib
from dmae_jax import storage
from dmae_jax.errors import CheckpointError, ConfigError

# ---------------------------------------------------------------------------------------
# Training state.
# ---------------------------------------------------------------------------------------


class TrainCheckpointer:
    """Resumable training checkpoints under `<workdir>/checkpoints` (Orbax, async, keep-N)."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, fingerprint: Mapping[str, Any]):
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ConfigError(
                f"config.keep_ckpts must be an integer >= 1 (checkpoints kept to resume "
                f"from), got {max_to_keep!r}")
        self.directory = storage.absolute(workdir) / "checkpoints"
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
        """Restores the newest readable (or the given) step into `abstract_state`'s shapes.

        Returns None when there is no checkpoint. A step whose files cannot be read (a
        truncated or garbage array file, a deleted _METADATA or manifest) is moved to
        `<workdir>/checkpoints_unreadable/` with a warning naming it, and the next older
        step is tried. CheckpointError when no step is readable (never a silent fresh
        start) or a checkpoint was written for another configuration.
        """
        candidates = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        if not candidates:
            return None
        unreadable: list[tuple[int, Exception]] = []
        for step in candidates:  # noqa: B020
            where = self.directory / str(step)
            try:
                extra = self._restore_item(step, extra=ocp.args.JsonRestore())
            except Exception as e:  # Orbax and TensorStore raise many types
                unreadable.append((step, e))
                continue
            self._check_fingerprint(extra, where)
            try:
                state = self._restore_item(
                    step, state=ocp.args.StandardRestore(abstract_state))
            except Exception as e:
                unreadable.append((step, e))
                continue
            break
        else:
            listed = "; ".join(f"step {s}: {_reason(e)}" for s, e in unreadable)
            raise CheckpointError(
                f"no checkpoint under {self.directory} can be read ({listed}). Not starting "
                f"from scratch: move {self.directory} aside to train from step 0, or use "
                "another --workdir")
        if unreadable:
            self._set_aside(unreadable, resumed_from=step)
        from dmae_jax.exports import match_tree

        match_tree(abstract_state, state, where=f"the checkpoint at {where}")
        return step, state, extra

    def _restore_item(self, step: int, **item: Any) -> Any:
        (name, args), = item.items()
        return self.manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]

    def _check_fingerprint(self, extra: Mapping[str, Any], where: Any) -> None:
        """The checkpoint's config fingerprint must equal this run's; the error names fields."""
        recorded = extra.get("fingerprint") or {}
        if recorded == self.fingerprint:
            return
        old, new = config_lib.flatten(recorded), config_lib.flatten(self.fingerprint)
        differences = [f"{k} = {old.get(k, '<absent>')!r} there, {new.get(k, '<absent>')!r} here"
                       for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise CheckpointError(
            f"the checkpoint at {where} was written for a different configuration: "
            f"{'; '.join(differences)}. Rerun with the checkpoint's values, or use another "
            "--workdir")

    def _set_aside(self, unreadable: list[tuple[int, Exception]], resumed_from: int) -> None:
        """Moves unreadable steps out of Orbax's sight (a later save may reuse their number)."""
        aside = self.directory.parent / "checkpoints_unreadable"
        for step, error in unreadable:
            where, dest = self.directory / str(step), aside / str(step)
            if jax.process_index() == 0:
                aside.mkdir(parents=True, exist_ok=True)
                suffix = 0
                while dest.exists():
                    suffix += 1
                    dest = aside / f"{step}.{suffix}"
                storage.move_tree(where, dest)  # gs:// has no rename
                print(f"warning: checkpoint step {step} at {where} is unreadable "
                      f"({_reason(error)}); moved to {dest}. Resuming from step {resumed_from}, "
                      "the newest intact checkpoint", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dmae_jax.checkpoints: unreadable steps moved")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _reason(error: Exception) -> str:
    """The first line of an error, without TensorStore's spec dump, at most 200 characters."""
    text = str(error).split("\n")[0].split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {text[:200]}"

