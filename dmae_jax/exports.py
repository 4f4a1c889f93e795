"""Parameter exports: the one format every model is saved in and built from.

An export is a directory with `params/` (an Orbax PyTree of arrays: the pure-dict form of
`nnx.state(model, nnx.Param)`) and `meta.json`, which says what model it is:

    {"kind": "dmae" | "classifier" | "unet", "model": {...} or "config": {...}, ...}

Training writes one at `<workdir>/export` when it finishes (`save_final`); the importers
(`dmae_jax.convert`, `dmae_jax.diffusion.convert`) write them from the official PyTorch
checkpoints (`save`). Each model module builds its model from an export in one way
(`dmae.from_export`, `classifier.from_export`, `unet.from_export`), all through
`load_checked` and `match_tree` here.

JAX and Orbax are imported inside the functions that move arrays: validation reads exports'
meta.json (`read_meta`) before either is imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from dmae_jax import storage
from dmae_jax.errors import CheckpointError, ConfigError

KINDS = ("dmae", "classifier", "unet")


def _checkpointer():
    """Orbax's array checkpointer, imported here, where parameters are read or written:
    checking a config reads an export's meta.json only and should not pay for Orbax."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


class ParamTreeError(CheckpointError, ValueError):
    """A parameter tree does not fit a model: an entry is missing, unexpected or mis-shaped."""


def save(directory: str | os.PathLike, params: Mapping[str, Any], meta: Mapping[str, Any]):
    """Writes `params` (a pure nested dict of host arrays) and JSON `meta` to `directory`."""
    import jax

    path = storage.absolute(directory)
    if (path / "params").exists():
        raise CheckpointError(f"{path} already holds a parameter export; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(np.asarray, dict(params))
    with _checkpointer() as ckptr:
        ckptr.save(path / "params", params)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        # Written last and whole: its presence is what says the export is complete.
        storage.write_atomic(os.fspath(path / "meta.json"),
                             json.dumps(dict(meta), indent=2, sort_keys=True))


def gather(tree: Any) -> Any:
    """Every array fully addressable here: sharded global arrays are all-gathered."""
    import jax
    from jax.experimental import multihost_utils

    def full(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree.map(full, tree)


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy on every process (gathered across processes when sharded)."""
    import jax

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), gather(tree))


def save_final(workdir: str, params: Any, meta: Mapping[str, Any]) -> str:
    """Writes a training run's final `params` (global arrays) as `<workdir>/export`.

    A previous export there (a rerun of a finished run) is replaced. Returns the path.
    """
    import jax

    path = storage.absolute(workdir) / "export"
    host = to_host(params)
    if path.exists() and jax.process_index() == 0:
        path.rmtree()
    save(path, host, meta)
    return str(path)


def load(directory: str | os.PathLike) -> tuple[dict, dict]:
    """Reads an export: returns (params as a nested dict of numpy arrays, meta)."""
    import jax

    path = storage.absolute(directory)
    if not (path / "params").exists() or not (path / "meta.json").exists():
        raise CheckpointError(
            f"{path} is not a dmae_jax parameter export (expected params/ and meta.json); "
            "create one with `python -m dmae_jax.convert` or point at a training workdir's "
            "export/ directory"
        )
    try:
        meta = json.loads((path / "meta.json").read_text())
        with _checkpointer() as ckptr:
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


def read_meta(directory: str | os.PathLike, *, kind: str, field: str) -> dict:
    """The meta of the export `directory`, which must be of `kind`; no parameter is read.

    What validation, run identities and model selection read: errors name the config `field`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if not directory or not isinstance(directory, str | os.PathLike):
        raise ConfigError(f"{field} must name a parameter export directory, got {directory!r}")
    path = epath.Path(directory)
    if not path.exists():
        raise ConfigError(f"{field} = {os.fspath(directory)!r} does not exist")
    if not (path / "params").is_dir() or not (path / "meta.json").is_file():
        raise CheckpointError(
            f"{field} = {os.fspath(directory)!r} is not a dmae_jax parameter export (expected "
            "params/ and meta.json); create one with `python -m dmae_jax.convert` or point at "
            "a training workdir's export/ directory")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{field} = {os.fspath(directory)!r}: its meta.json cannot be "
                              f"read ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else meta
        raise CheckpointError(
            f"{field} = {os.fspath(directory)!r} holds a {found!r} export, expected {kind!r}")
    return meta


def load_checked(directory: str | os.PathLike, *, kind: str, field: str) -> tuple[dict, dict]:
    """`read_meta` (the export must be of `kind`), then its parameters: (params, meta)."""
    read_meta(directory, kind=kind, field=field)
    return load(directory)


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def match_tree(expected: Any, given: Any, *, where: str) -> Any:
    """`given`'s arrays in `expected`'s tree structure, each checked against its shape.

    The one "copy a parameter tree into a model" check: every entry of `expected` (arrays
    or shape-dtype structs) must be in `given` with the same shape, and `given` may hold
    nothing else. Raises `ParamTreeError` naming `where`, the entry and both shapes.
    """
    import jax

    flat_expected, treedef = jax.tree_util.tree_flatten_with_path(expected)
    flat_given = dict(jax.tree_util.tree_flatten_with_path(given)[0])
    missing = sorted(_name(p) for p, _ in flat_expected if p not in flat_given)
    extra = sorted(_name(p) for p in flat_given.keys() - {p for p, _ in flat_expected})
    if missing or extra:
        raise ParamTreeError(
            f"{where}: parameter tree mismatch: missing {missing[:8]}, unexpected {extra[:8]}")
    out = []
    for path, leaf in flat_expected:
        got = flat_given[path]
        if tuple(np.shape(got)) != tuple(np.shape(leaf)):
            raise ParamTreeError(
                f"{where}: {_name(path)} has shape {tuple(np.shape(got))}, the model expects "
                f"{tuple(np.shape(leaf))}")
        out.append(got)
    return jax.tree_util.tree_unflatten(treedef, out)
