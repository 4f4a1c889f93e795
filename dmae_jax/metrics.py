"""TensorBoard event files without TensorFlow: scalars, images and text.

`create_writer(workdir)` returns a writer with the methods of CLU's `MetricWriter` that the
trainers use (`write_scalars`, `write_images`, `write_texts`, `write_hparams`, `flush`,
`close`), so a CLU writer can stand in for it and vice versa. It writes the TFRecord framing
itself (length, masked CRC32C, data, masked CRC32C) around TensorBoard's own protocol buffers
(`tensorboard.compat.proto`): neither TensorFlow nor PyTorch is imported, where CLU's writers
import TensorFlow, TensorBoard's `EventFileWriter` imports TensorFlow when it is installed
and tensorboardX imports PyTorch when that is installed (seconds at every start).

One run, one events stream: the file is `<workdir>/events.out.tfevents.dmae_jax` (the name
TensorBoard looks for); a resumed run appends to it. Before appending, a record cut short
by a kill is truncated, and the first event written after reopening is preceded by a
`SessionLog.START` at its step, so TensorBoard discards the steps the killed attempt logged
after its last checkpoint instead of showing them twice. Only process 0 writes; other
processes get a writer that does nothing, and so does a run without the `tensorboard`
package (with a warning). A workdir on object storage (`gs://...`) cannot be appended to:
there the stream is kept in memory and the object rewritten whole (one atomic upload, so
TensorBoard reads whole records only) at most once a minute and at the end
(`dmae_jax.storage`'s DESIGN).
"""

from __future__ import annotations

import io
import os
import struct
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from dmae_jax import storage

EVENTS_FILE = "events.out.tfevents.dmae_jax"
_FILE_VERSION = "brain.Event:2"


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord framing uses it."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked CRC of the length, data, masked CRC of the data."""
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


def valid_prefix_length(data: bytes) -> int:
    """Bytes at the start of `data` that hold whole, checksummed records (a cut tail is not).

    A kill can only cut the stream's end, so every record's length checksum is checked but
    only the last record's data checksum (the data CRC is pure Python, ~10 ms per MB).
    """
    size, end, last = len(data), 0, None
    while end + 12 <= size:
        header = data[end:end + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[end + 8:end + 12])[0] != masked_crc32c(header):
            break
        if end + 16 + length > size:
            break
        last, end = end, end + 16 + length
    if last is not None:
        record = data[last + 12:end - 4]
        if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(record):
            end = last
    return end


class _AppendFile:
    """A local events file, opened for appending; every flush reaches the disk."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self._file = open(path, "ab")  # noqa: SIM115 (closed in close())

    @staticmethod
    def existing(path: str) -> bytes:
        if not os.path.exists(path):
            return b""
        with open(path, "rb") as f:
            return f.read()

    def truncate(self, size: int) -> None:
        self._file.truncate(size)
        self._file.seek(size)

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def flush(self, force: bool = False) -> None:
        del force
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class _RewrittenObject:
    """An events file on an object store (gs://...), which cannot append: the whole stream
    is kept in memory and the object rewritten on flush, at most every `interval_s`."""

    def __init__(self, path: str, interval_s: float = 60.0):
        self.path, self._interval = path, interval_s
        self._data = bytearray(self.existing(path))
        self._uploaded = time.monotonic()
        self._dirty = False

    @staticmethod
    def existing(path: str) -> bytes:
        try:
            return storage.read_bytes(path)
        except FileNotFoundError:
            return b""

    def truncate(self, size: int) -> None:
        del self._data[size:]
        self._dirty = True

    def write(self, data: bytes) -> None:
        self._data += data
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        if self._dirty and (force or time.monotonic() - self._uploaded >= self._interval):
            try:
                storage.write_atomic(self.path, bytes(self._data))
            except Exception as e:  # a storage hiccup must not stop training; retried later
                logging.warning("could not write %s (%s); retrying at the next flush",
                                self.path, e)
                return
            self._uploaded, self._dirty = time.monotonic(), False

    def close(self) -> None:
        self.flush(force=True)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _uint8_images(name: str, value: Any) -> np.ndarray:
    """[N, H, W, C] uint8 from uint8 or float-in-[0,1] images, [H, W, C] or [N, H, W, C]."""
    array = np.asarray(value)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image {name!r} must be [H, W, C] or [N, H, W, C] with C in (1, 3, 4), "
            f"got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    return array


class SummaryWriter:
    """CLU-style metric writer appending TensorBoard events to one file per run."""

    def __init__(self, logdir: str, *, filename: str = EVENTS_FILE,
                 object_store: bool | None = None):
        from tensorboard.compat.proto import event_pb2, summary_pb2

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        logdir = os.fspath(logdir)
        if object_store is None:
            object_store = "://" in logdir
        self.path = f"{logdir.rstrip('/')}/{filename}"
        sink = _RewrittenObject if object_store else _AppendFile
        existing = sink.existing(self.path)
        valid = valid_prefix_length(existing)
        self._sink = sink(self.path)
        if valid < len(existing):
            logging.warning("%s: dropping %d bytes of a cut-off record", self.path,
                            len(existing) - valid)
            self._sink.truncate(valid)
        self._restart_pending = valid > 0
        if not valid:
            self._write(self._event_pb2.Event(wall_time=time.time(), file_version=_FILE_VERSION))

    def _write(self, event) -> None:
        self._sink.write(frame_record(event.SerializeToString()))

    def _write_summary(self, step: int, values: list) -> None:
        if self._restart_pending:
            self._restart_pending = False
            self._write(self._event_pb2.Event(
                wall_time=time.time(), step=int(step),
                session_log=self._event_pb2.SessionLog(
                    status=self._event_pb2.SessionLog.START)))
        self._write(self._event_pb2.Event(
            wall_time=time.time(), step=int(step),
            summary=self._summary_pb2.Summary(value=values)))
        self._sink.flush()  # TensorBoard shows a running job's values as they come

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One scalar per tag at `step`."""
        value = self._summary_pb2.Summary.Value
        self._write_summary(step, [value(tag=k, simple_value=float(v))
                                   for k, v in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Images [H, W, C] or [N, H, W, C], uint8 or float in [0, 1]; N > 1 gives tag/i."""
        summary = self._summary_pb2.Summary
        values = []
        for name, value in images.items():
            batch = _uint8_images(name, value)
            for i, image in enumerate(batch):
                h, w, c = image.shape
                tag = name if len(batch) == 1 else f"{name}/{i}"
                values.append(summary.Value(tag=tag, image=summary.Image(
                    height=h, width=w, colorspace=c,
                    encoded_image_string=_png(image[..., 0] if c == 1 else image))))
        self._write_summary(step, values)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Markdown text per tag (TensorBoard's Text tab)."""
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

        meta = self._summary_pb2.SummaryMetadata(
            plugin_data=self._summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        values = [
            self._summary_pb2.Summary.Value(tag=k, metadata=meta, tensor=tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING, string_val=[str(v).encode("utf-8")],
                tensor_shape=tensor_shape_pb2.TensorShapeProto()))
            for k, v in texts.items()
        ]
        self._write_summary(step, values)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's hyperparameters, as a markdown table under the tag `hparams`."""
        lines = ["| name | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(hparams.items())]
        self.write_texts(0, {"hparams": "\n".join(lines)})

    def flush(self) -> None:
        """Makes everything written so far visible to TensorBoard."""
        self._sink.flush(force=True)

    def close(self) -> None:
        """Flushes and closes the file."""
        self._sink.close()


class NullWriter:
    """The writer of processes other than 0: accepts everything, writes nothing."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Does nothing."""

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Does nothing."""

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Does nothing."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Does nothing."""

    def flush(self) -> None:
        """Does nothing."""

    def close(self) -> None:
        """Does nothing."""


def create_writer(workdir: str) -> SummaryWriter | NullWriter:
    """The run's TensorBoard writer on process 0 (events in `workdir`), a no-op elsewhere."""
    if jax.process_index() > 0:
        return NullWriter()
    try:
        import tensorboard.compat.proto.event_pb2  # noqa: F401
    except ImportError:
        logging.warning("tensorboard is not installed (pip install tensorboard): this run "
                        "writes no TensorBoard events")
        return NullWriter()
    return SummaryWriter(os.fspath(workdir))
