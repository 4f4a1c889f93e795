"""Reads PyTorch checkpoint files (`torch.save`'s zip format) as NumPy arrays, without PyTorch.

A `.pth`/`.pt` file since PyTorch 1.6 is a zip archive: `<name>/data.pkl` (a pickle of the
saved object in which every tensor is a call of `torch._utils._rebuild_tensor_v2` on a
storage referenced by a persistent id) and `<name>/data/<key>` (each storage's raw bytes,
in the byte order named by `<name>/byteorder`, little-endian when absent).

The unpickler here resolves only the globals a weights file needs, each to a function or
class of this module: the tensor and parameter rebuild functions, the typed storage
classes, `collections.OrderedDict`, `torch.Size`, and `argparse.Namespace` (to an inert
attribute holder, so MAE-style training checkpoints with their `args` can be read); every
other global (any function or class that could run code, e.g. `os.system`, `builtins.eval`)
is refused with `UnsafeCheckpointError` before anything is called. This is the allow-list
idea of `torch.load(weights_only=True)`, without sparse or quantized tensors or numpy
scalars, and it never imports torch. Files in the pre-1.6 (non-zip) format are refused.
"""

from __future__ import annotations

import collections
import os
import pickle
import sys
import zipfile
from typing import Any

import ml_dtypes
import numpy as np


class CheckpointFormatError(ValueError):
    """The file is not a PyTorch zip checkpoint this reader understands."""


class UnsafeCheckpointError(CheckpointFormatError):
    """The pickle asks for a global outside the weights-only allow-list; nothing was run."""


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """Stands for `torch.<X>Storage` in the pickle: only its element type is used."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """A NumPy copy of `storage[offset:]` viewed with `size` and `stride` (in elements)."""
    del requires_grad, backward_hooks, metadata
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointFormatError(f"negative tensor size {size} or stride {stride}")
    extent = 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else 0
    if storage_offset < 0 or storage_offset + extent > storage.size:
        raise CheckpointFormatError(
            f"tensor of size {size}, stride {stride} at offset {storage_offset} does not fit "
            f"its storage of {storage.size} elements")
    flat = storage[storage_offset:]
    view = np.lib.stride_tricks.as_strided(
        flat, shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data


def _torch_size(dims=()):
    return tuple(int(d) for d in dims)


class Namespace:
    """Stands for `argparse.Namespace` (the `args` of MAE-style training checkpoints): a
    plain attribute holder; unpickling sets its attributes and runs nothing of argparse."""

    def __repr__(self) -> str:
        return f"Namespace({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
    ("argparse", "Namespace"): Namespace,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"the checkpoint's pickle asks for {module}.{name}, which a weights-only "
                f"file does not need; refused (nothing was executed). Allowed: "
                f"{sorted(f'{m}.{n}' for m, n in _ALLOWED)}") from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointFormatError(f"unexpected persistent id {pid!r:.100}")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise CheckpointFormatError(f"storage data/{key} is missing") from None
            dtype = storage_type.dtype
            if len(raw) != int(numel) * dtype.itemsize:
                raise CheckpointFormatError(
                    f"storage data/{key} has {len(raw)} bytes, expected {numel} x "
                    f"{dtype.itemsize}")
            array = np.frombuffer(raw, dtype=dtype)
            if self._byteorder != sys.byteorder:
                array = array.byteswap()
            self._storages[key] = array
        return self._storages[key]


def load(path: str | os.PathLike) -> Any:
    """The object saved in a PyTorch zip checkpoint, with tensors as NumPy arrays.

    Raises FileNotFoundError for a missing file, `UnsafeCheckpointError` for a pickle that
    needs anything beyond plain tensors in dicts/lists/tuples, `CheckpointFormatError` for
    other files.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(
            f"{path} is not a PyTorch zip checkpoint (torch.save's format since PyTorch 1.6); "
            "an older file can be re-saved with a current PyTorch: "
            "torch.save(torch.load(f, weights_only=True), f)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{path}: expected one */data.pkl, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        with archive.open(pickles[0]) as f:
            try:
                return _WeightsUnpickler(f, archive, prefix, byteorder).load()
            except CheckpointFormatError:
                raise
            except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as e:
                raise CheckpointFormatError(f"{path}: unreadable pickle ({e})") from None
