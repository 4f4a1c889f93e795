"""Files on a local disk or in Google Cloud Storage (`gs://bucket/...`), with one design for both.

Every directory a run takes (workdir, data_dir, checkpoints, exports, certification logs,
report outputs) may be a `gs://` path. Large arrays go through the libraries that own them
(Orbax on TensorStore's GCS driver for checkpoints and exports; TFDS and ArrayRecord's GCS
reader for data); the small files whose guarantees are ours go through this module.

DESIGN: what object storage gives, and how each guarantee is built on it.

GCS is not a file system. A single-object upload is atomic (a reader sees the old object or
the new one, never part of one), reads and listings are strongly consistent, and every
object has a generation number that an upload can be made conditional on
(`ifGenerationMatch`; 0 means "only if it does not exist"): compare-and-swap on one object.
There is no append, no rename (a copy and a delete, not atomic), no `flock`, and an object
name takes at most about one update per second. So:

- Records (`config.json`, a log's `.identity.json` and `.config.json`, exports' `meta.json`,
  reports, reconstructions): `write_atomic`. Locally a temporary file, fsync, rename, fsync
  of the directory; on GCS one upload, which is atomic by itself. Where two writers could
  race, the run path holds the workdir's or the log's lock first (below).
- One writer per workdir (`WorkdirLock`): locally a kernel lock (`flock`) that dies with its
  process. On GCS a lock object holding a lease: it is created with `ifGenerationMatch=0`
  (exactly one of two racing runs succeeds), renewed by its holder every `LEASE_S / 4`
  seconds with `ifGenerationMatch=<its generation>`, and released by overwriting it with a
  released record under the same precondition (the emulator we test against ignores
  preconditions on DELETE, and a released record also says who had it). A run that finds a
  live lease is refused with one line naming the holder. A lease is taken over, with
  `ifGenerationMatch=<the stale generation>` so that two contenders cannot both win, when it
  was released, when the server's update time of the object is more than `LEASE_S` old (its
  holder died elsewhere: a preempted VM), or at once when its holder ran on this machine
  (same host, boot and PID namespace) and that process is gone (a killed run restarted on the
  same VM, as a local flock would allow). A holder that cannot renew for `0.75 * LEASE_S`
  or finds its lease taken over stops its process at once (`LOST_LEASE_EXIT`) without
  writing anything more: two runs never write one workdir while the holder keeps running.
- Logs (`SyncedObject`, used by certification logs): appending to an object is impossible,
  so the log is a local file (appended and fsynced as on a local disk) whose whole content
  is uploaded as one object, conditional on the generation this run last wrote (a second
  writer is detected, not overwritten). The object in the bucket is therefore always a
  whole number of complete rows. Uploads happen after a row when at least
  `SYNC_INTERVAL_S` has passed since the last one, and at close: a kill loses at most the
  rows of the last `SYNC_INTERVAL_S` seconds, which the resumed run computes again (a row
  depends only on its image and the run's seed). Rows that reached the bucket are never
  rewritten differently, so they stay byte-identical across resumes. Chosen over one object
  per row (and a compose into the log): the log in the bucket stays one plain TSV that
  every tool reads at any moment, without an assembly step, compose's limit of 1024
  components or orphaned row objects to clean up; its cost, one upload of the whole log per
  sync, is ~1 MB for a 10,000-row log.
- TensorBoard events (`dmae_jax.metrics`): the same idea, the stream rewritten whole.
- Data preparation (`staged_upload`): ArrayRecord can read `gs://` but not write it, so a
  data set is prepared in a local directory and uploaded, TFDS's two files that make a
  directory count as prepared (`features.json`, `dataset_info.json`) last: a reader sees
  the data set complete or not at all.

Clients: google-cloud-storage here (generations and preconditions), gcsfs for everything
that goes through `etils.epath` (Orbax's metadata, TFDS, exports), TensorStore for Orbax's
arrays, google-cloud-cpp inside ArrayRecord for reading data. Two defaults, set when the
package is imported (`dmae_jax/__init__.py`), make the clients that run the ones tested
against the emulator (tests/gcs_emulator.py): `EPATH_USE_TF=false` (with TensorFlow
installed, etils would otherwise route gs:// through `tf.io.gfile`, whose GCS client
cannot be pointed at an emulator) and
`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (gcsfs's experimental layer asks the Storage
Control API for each bucket's layout first; we use no zonal or hierarchical-namespace
bucket features). Both can be overridden in the environment.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import glob as glob_lib
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from dmae_jax.errors import ConfigError, LockError

LOCK_FILE = "train.lock"
LEASE_S = 120.0  # a dead holder elsewhere blocks its workdir at most this long
SYNC_INTERVAL_S = 2.0  # GCS takes about one update per second of one object name
LOST_LEASE_EXIT = 75  # EX_TEMPFAIL: rerunning the same command resumes
_TIMEOUT = (10.0, 30.0)  # connect, read: a lock request must answer well within a lease


def is_gcs(path: str | os.PathLike | None) -> bool:
    """True for a `gs://` path."""
    return path is not None and os.fspath(path).startswith("gs://")


def _split(path: str) -> tuple[str, str]:
    bucket, _, name = os.fspath(path)[len("gs://"):].partition("/")
    return bucket, name


def _client():
    # One client per endpoint: a test that starts another emulator gets a client for it.
    return _client_for(os.environ.get("STORAGE_EMULATOR_HOST"))


@functools.cache
def _client_for(endpoint: str | None):
    del endpoint  # the cache key; the client reads the variable itself
    from google.cloud import storage

    return storage.Client()


def _blob(path: str):
    bucket, name = _split(path)
    return _client().bucket(bucket).blob(name)


def _retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY


def _precondition_failed():
    from google.api_core.exceptions import PreconditionFailed

    return PreconditionFailed


# ---------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------


def absolute(path: str | os.PathLike):
    """`path` as an absolute `etils.epath.Path`, the type Orbax and TFDS take.

    A gs:// path is already absolute: etils' own `absolute()` would put the working
    directory in front of it, and Orbax would then write the checkpoint to a local
    directory named `gs:`.
    """
    from etils import epath

    return epath.Path(path) if is_gcs(path) else epath.Path(path).absolute()


def exists(path: str | os.PathLike) -> bool:
    """Whether the file (object) exists; a gs:// "directory" exists if an object is under it."""
    path = os.fspath(path)
    if not is_gcs(path):
        return os.path.exists(path)
    if _blob(path).exists(retry=_retry()):
        return True
    bucket, name = _split(path)
    prefix = name.rstrip("/") + "/" if name else ""
    return any(True for _ in _client().list_blobs(bucket, prefix=prefix, max_results=1))


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file; FileNotFoundError if it does not exist."""
    path = os.fspath(path)
    if not is_gcs(path):
        with open(path, "rb") as f:
            return f.read()
    from google.api_core.exceptions import NotFound

    try:
        return _blob(path).download_as_bytes(retry=_retry())
    except NotFound:
        raise FileNotFoundError(f"No such object: {path}") from None


def read_text(path: str | os.PathLike) -> str:
    """The whole file as UTF-8 text."""
    return read_bytes(path).decode("utf-8")


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Replaces the file with `data` whole: readers see the old content or the new, never a mix.

    Locally: a temporary file beside it, fsync, rename, fsync of the directory (creating
    the directory). On GCS: one upload, atomic by itself.
    """
    path = os.fspath(path)
    data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if is_gcs(path):
        _blob(path).upload_from_string(data, retry=_retry())
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    fsync_dir(path)


def check_writable(path: str, flag: str) -> None:
    """ConfigError (naming `flag`) unless `path` is a gs:// location this process can write.

    Writes and deletes one probe object, so a bucket that is missing, or that the
    credentials cannot write, is one line before anything is loaded.
    """
    from google.api_core import exceptions
    from google.auth.exceptions import DefaultCredentialsError

    if not is_gcs(path):
        raise ConfigError(f"{flag}={path}: object storage is supported as gs://bucket/path "
                          "(Google Cloud Storage); other schemes are not")
    bucket, name = _split(path)
    if not bucket:
        raise ConfigError(f"{flag}={path} names no bucket: use gs://bucket/path")
    probe = f"gs://{bucket}/{name.rstrip('/') + '/' if name else ''}.write-test-{uuid.uuid4().hex}"
    try:
        _blob(probe).upload_from_string(b"", if_generation_match=0, timeout=_TIMEOUT)
        _blob(probe).delete(timeout=_TIMEOUT, retry=_retry())
    except exceptions.NotFound:
        raise ConfigError(f"{flag}={path}: bucket {bucket!r} does not exist") from None
    except DefaultCredentialsError:
        raise ConfigError(f"{flag}={path}: no Google Cloud credentials on this machine (on a "
                          "workstation: gcloud auth application-default login)") from None
    except exceptions.Forbidden as e:
        raise ConfigError(f"{flag}={path} is not writable with this machine's credentials "
                          f"({e.message})") from None


def fsync_dir(path: str) -> None:
    """Makes a local file's creation or rename durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str | os.PathLike) -> None:
    """Deletes one file (object); FileNotFoundError if it does not exist."""
    path = os.fspath(path)
    if not is_gcs(path):
        os.remove(path)
        return
    from google.api_core.exceptions import NotFound

    try:
        _blob(path).delete(retry=_retry())
    except NotFound:
        raise FileNotFoundError(f"No such object: {path}") from None


def makedirs(path: str | os.PathLike) -> None:
    """Creates a local directory and its parents; nothing to do on GCS (no directories)."""
    if not is_gcs(path):
        os.makedirs(os.fspath(path), exist_ok=True)


def with_prefix(prefix: str | os.PathLike) -> list[str]:
    """Sorted paths of the files whose path starts with `prefix` (in its directory only)."""
    prefix = os.fspath(prefix)
    if not is_gcs(prefix):
        return sorted(glob_lib.glob(glob_lib.escape(prefix) + "*"))
    bucket, name = _split(prefix)
    return sorted(f"gs://{bucket}/{blob.name}"
                  for blob in _client().list_blobs(bucket, prefix=name, delimiter="/"))


def listdir(path: str | os.PathLike) -> list[str]:
    """Sorted names of the files and subdirectories in a directory ([] if there is none)."""
    path = os.fspath(path)
    if not is_gcs(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    bucket, name = _split(path)
    prefix = name.rstrip("/") + "/" if name else ""
    listing = _client().list_blobs(bucket, prefix=prefix, delimiter="/")
    names = [blob.name[len(prefix):] for blob in listing]
    names += [p[len(prefix):].rstrip("/") for p in listing.prefixes]
    return sorted(n for n in names if n)


def copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies one file, local or gs://, to another (atomically where `write_atomic` is)."""
    write_atomic(target, read_bytes(source))


# The files whose presence makes TFDS count a data set's directory as prepared.
TFDS_COMMIT_FILES = ("features.json", "dataset_info.json")


def move_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves a directory. Locally one rename; on GCS (no rename) a copy of every object,
    then deletes, Orbax's `commit_success.txt` markers first, so that a move cut short
    leaves no step that Orbax would take for complete at `source`."""
    source, target = os.fspath(source).rstrip("/"), os.fspath(target).rstrip("/")
    if not is_gcs(source):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        os.rename(source, target)
        return
    bucket, prefix = _split(source)
    blobs = list(_client().list_blobs(bucket, prefix=prefix + "/"))
    to_bucket, to_prefix = _split(target)
    for blob in blobs:
        _client().bucket(bucket).copy_blob(
            blob, _client().bucket(to_bucket), to_prefix + blob.name[len(prefix):],
            retry=_retry())
    blobs.sort(key=lambda b: not b.name.endswith("commit_success.txt"))
    for blob in blobs:
        blob.delete(retry=_retry())


@contextlib.contextmanager
def staged_upload(remote_dir: str, *, last: Sequence[str] = (),
                  exclude: Sequence[str] = ("downloads",)) -> Iterator[str]:
    """A local directory to fill; on success its tree is uploaded to `remote_dir` (gs://).

    Files named in `last` (basenames) go up after all others, so a reader that checks for
    them sees the tree complete or not at all; top-level entries in `exclude` stay behind
    (TFDS's download cache). The local copy is removed either way.
    """
    local = tempfile.mkdtemp(prefix="dmae_jax-stage-")
    try:
        yield local
        files = sorted(os.path.relpath(os.path.join(root, f), local)
                       for root, _, names in os.walk(local) for f in names)
        files = [f for f in files if f.split(os.sep, 1)[0] not in exclude]
        files.sort(key=lambda f: os.path.basename(f) in last)  # stable: `last` at the end
        for relative in files:
            _blob(f"{remote_dir.rstrip('/')}/{relative}").upload_from_filename(
                os.path.join(local, relative), retry=_retry())
    finally:
        shutil.rmtree(local, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# One writer per workdir.
# ---------------------------------------------------------------------------------------


class WorkdirLock:
    """One run per workdir (or per log): process 0 holds an exclusive lock until the run ends.

    `<directory>/<name>` (`train.lock`; a certification log's is `<log>.lock`). Locally a
    kernel lock (`flock`), so a run that died, however it died, holds nothing; on GCS a
    lease object (the module's DESIGN). A second live writer is refused at once with
    `LockError` saying `busy` and naming the holder (pid, host, start time). Taken once per
    run, not nested: a second `WorkdirLock` on the same directory in the same process is
    refused like any other writer. Other processes of a multi-host job share process 0's
    run and take no lock.
    """

    def __init__(self, directory: str | os.PathLike, *, name: str = LOCK_FILE,
                 busy: str | None = None, lease_s: float = LEASE_S):
        import jax

        self.directory = os.fspath(directory)
        self.path = f"{self.directory.rstrip('/')}/{name}"
        self._file = self._lease = None
        if jax.process_index() != 0:
            return
        busy = busy or f"workdir {self.directory} is in use by another training run"
        if is_gcs(self.directory):
            self._lease = _Lease(self.path, busy, lease_s)
            return
        os.makedirs(self.directory, exist_ok=True)
        self._file = open(self.path, "a+")  # noqa: SIM115 (closed in release())
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise LockError(f"{busy} ({holder}); wait for it to finish or stop it, or use "
                            "another --workdir") from None
        self._file.seek(0)
        previous = self._file.read().strip()
        if previous:
            _log(f"took over the lock of a run that is gone ({previous})")
        self._file.seek(0)
        self._file.truncate()
        self._file.write(_holder() + "\n")
        self._file.flush()

    def release(self) -> None:
        """Lets the next run have the workdir (also happens when this process exits)."""
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _log(line: str) -> None:
    from absl import logging

    logging.info(line)


def _machine() -> str | None:
    """This machine and PID namespace: where a recorded pid means this process table."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{namespace}"


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


class _Lease:
    """The GCS lock object of `WorkdirLock`: taken, renewed and released by generation."""

    def __init__(self, path: str, busy: str, lease_s: float):
        self.path, self.lease_s = path, float(lease_s)
        self.token = uuid.uuid4().hex
        self.holder = _holder()
        self.generation = self._acquire(busy)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"lease {path}")
        self._thread.start()

    def _record(self, released: bool = False) -> bytes:
        return json.dumps({
            "holder": self.holder, "token": self.token, "lease_s": self.lease_s,
            "machine": _machine(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "released": released,
        }, indent=1).encode()

    def _put(self, generation: int, released: bool = False) -> int:
        """Uploads our record if the object is still at `generation`; the new generation."""
        blob = _blob(self.path)
        try:
            blob.upload_from_string(self._record(released), content_type="application/json",
                                    if_generation_match=generation, timeout=_TIMEOUT)
        except _precondition_failed():
            # A retried request whose first attempt went through fails its own precondition:
            # the object then holds our token.
            current = _blob(self.path)
            data = current.download_as_bytes(timeout=_TIMEOUT)
            if _parse(data).get("token") != self.token:
                raise
            return current.generation
        return blob.generation

    def _acquire(self, busy: str) -> int:
        bucket, name = _split(self.path)
        for _ in range(5):
            found = _client().bucket(bucket).get_blob(name, timeout=_TIMEOUT, retry=_retry())
            generation, reason = 0, None
            if found is not None:
                generation = found.generation
                try:
                    data = found.download_as_bytes(if_generation_match=generation,
                                                   timeout=_TIMEOUT)
                except _precondition_failed():
                    continue  # changed between the two reads: look again
                previous = _parse(data)
                reason = self._stale(previous, found.updated)
                if reason is None:
                    age = _age(found.updated)
                    raise LockError(
                        f"{busy} ({previous.get('holder', 'another process')}, lease renewed "
                        f"{age:.0f} s ago); wait for it to finish or stop it, or use another "
                        f"--workdir (a run that died elsewhere frees it {self.lease_s:.0f} s "
                        "after its last renewal)")
            try:
                generation = self._put(generation)
            except _precondition_failed():
                continue  # another run got there first: look again
            if reason is not None:
                _log(f"took over the lock {self.path} ({reason})")
            return generation
        raise LockError(f"{busy}: the lock {self.path} kept changing while this run tried to "
                        "take it; another run is starting on it")

    def _stale(self, previous: dict, updated: datetime.datetime | None) -> str | None:
        """Why a found lock record may be taken over, or None while its holder lives."""
        if not previous:
            return "its record was unreadable"
        holder = previous.get("holder", "a run")
        if previous.get("released"):
            return f"released by {holder}"
        lease = float(previous.get("lease_s", LEASE_S))
        if updated is not None and _age(updated) > lease:
            return f"{holder} did not renew it for {_age(updated):.0f} s"
        machine = previous.get("machine")
        if machine is not None and machine == _machine():
            pid = int(previous.get("pid", -1))
            start = _process_start(pid)
            if start is None or start != previous.get("pid_start"):
                return f"{holder} is gone"
        return None

    def _renew_loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.generation = self._put(self.generation)
                last = time.monotonic()
            except _precondition_failed():
                self._lost("another run took it over after this one did not renew it")
            except Exception as e:  # noqa: BLE001 - a network error: retried until the lease ends
                if time.monotonic() - last > 0.75 * self.lease_s:
                    self._lost(f"it could not be renewed for {time.monotonic() - last:.0f} s: "
                               f"{e}")

    def _lost(self, why: str) -> None:
        sys.stderr.write(f"error: this run lost its lock {self.path} ({why}); stopping at once "
                         "without writing anything more, so that two runs never write one "
                         "workdir. Rerun the same command to resume from the last "
                         "checkpoint.\n")
        sys.stderr.flush()
        os._exit(LOST_LEASE_EXIT)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._put(self.generation, released=True)
        except _precondition_failed():
            sys.stderr.write(f"warning: the lock {self.path} was taken over by another run "
                             "before this one released it\n")


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _age(updated: datetime.datetime) -> float:
    return (datetime.datetime.now(datetime.UTC) - updated).total_seconds()


# ---------------------------------------------------------------------------------------
# Logs that are appended to.
# ---------------------------------------------------------------------------------------


class SyncedObject:
    """A local file that stands for one GCS object: downloaded at open, uploaded whole.

    `local_path` is appended to like any local log; `sync()` uploads it when at least
    `interval_s` has passed since the last upload (`force=True`: now), each upload
    conditional on the generation this object last wrote or read (DESIGN in the module
    docstring). `close()` uploads what is left and deletes the local copy.
    """

    def __init__(self, path: str, *, interval_s: float = SYNC_INTERVAL_S):
        from google.api_core.exceptions import NotFound

        self.path, self.interval_s = os.fspath(path), interval_s
        self._dir = tempfile.mkdtemp(prefix="dmae_jax-log-")
        self.local_path = os.path.join(self._dir, os.path.basename(self.path))
        blob = _blob(self.path)
        try:
            data = blob.download_as_bytes(retry=_retry())
            self.generation = blob.generation
        except NotFound:
            data, self.generation = None, 0
        if data is not None:
            with open(self.local_path, "wb") as f:
                f.write(data)
        self._synced = data
        self._synced_at = time.monotonic()

    def sync(self, force: bool = False) -> None:
        """Uploads the local file if it changed, and `interval_s` has passed or `force`."""
        if not force and time.monotonic() - self._synced_at < self.interval_s:
            return
        with open(self.local_path, "rb") as f:
            data = f.read()
        if data == self._synced:
            return
        blob = _blob(self.path)
        try:
            blob.upload_from_string(data, if_generation_match=self.generation)
            self.generation = blob.generation
        except _precondition_failed():
            current = _blob(self.path)
            if current.download_as_bytes(retry=_retry()) != data:  # not our own retried upload
                raise LockError(
                    f"{self.path} was changed by another process while this run wrote it; "
                    "its rows here were not uploaded. Certify into another --workdir or "
                    "--config.log_name") from None
            self.generation = current.generation
        self._synced, self._synced_at = data, time.monotonic()

    def close(self) -> None:
        """Uploads what is not in the bucket yet and deletes the local copy."""
        try:
            if os.path.exists(self.local_path):
                self.sync(force=True)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


def png_bytes(image: Any) -> bytes:
    """A uint8 [H, W, C] image as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
