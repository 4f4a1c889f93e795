r"""Prepares a data set once, in the ArrayRecord format that training and certification read.

    python -m dmae_jax.prepare --dataset=digits [--image_size=16] [--data_dir=DIR]
    python -m dmae_jax.prepare --dataset=cifar10 [--data_dir=DIR]   # downloads about 160 MB
    python -m dmae_jax.prepare --dataset=imagenet2012 --manual_dir=DIR [--data_dir=DIR]

Calls `tfds.builder(name).download_and_prepare(file_format="array_record")` in this process,
which is what `tfds build --file_format=array_record` means to do; the `tfds` command line of
TFDS 4.9.10 imports Apache Beam for every build and fails without it. `digits` is built from
scikit-learn's copy and needs neither network nor TensorFlow (training prepares it by itself
on first use). The stock TFDS builders of `cifar10` (PNG-encodes numpy images) and
`imagenet2012` (reads the archives with `tf.io.gfile`) need TensorFlow:
`pip install -e ".[prepare]"`.

ImageNet cannot be downloaded by TFDS: put `ILSVRC2012_img_train.tar` and
`ILSVRC2012_img_val.tar` from https://image-net.org/ into `--manual_dir` (default
`<data_dir>/downloads/manual`); a missing one is skipped with a warning, at least one must
be there. Preparing ImageNet takes hours and about 150 GB in `data_dir`.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
from collections.abc import Sequence

from dmae_jax import errors, quiet, storage
from dmae_jax.data import datasets
from dmae_jax.errors import ConfigError, UserError

DATASETS = datasets.DATASETS
NEEDS_TENSORFLOW = ("cifar10", "imagenet2012")
# Where TFDS's builder downloads a data set from (host, port): it must answer before a
# download starts, since without a network TFDS waits on it for many minutes.
DOWNLOAD_HOSTS = {"cifar10": ("www.cs.toronto.edu", 443)}
NETWORK_TIMEOUT_S = 15.0


class PrepareError(UserError, RuntimeError):
    """A data set cannot be prepared as asked; the message says what to do."""


def _check_tensorflow(name: str) -> None:
    if name in NEEDS_TENSORFLOW and importlib.util.find_spec("tensorflow") is None:
        raise PrepareError(
            f"preparing {name!r} needs TensorFlow (TFDS's {name} builder uses it to encode "
            "and read images); install it with: pip install -e \".[prepare]\" "
            "(or pip install tensorflow-cpu); training and certification do not need it")


def _check_network(name: str) -> None:
    """PrepareError unless the host `name` downloads from answers within
    `NETWORK_TIMEOUT_S` seconds (name resolution included, which a socket timeout does not
    bound)."""
    if name not in DOWNLOAD_HOSTS:
        return
    timeout = NETWORK_TIMEOUT_S
    host, port = DOWNLOAD_HOSTS[name]
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    if not outcome or outcome[0] is not None:
        reason = f"{outcome[0]}" if outcome else f"no answer within {timeout:.0f} s"
        raise PrepareError(
            f"preparing {name!r} downloads it from {host}, which cannot be reached ({reason});"
            " run this on a machine with network access and copy its --data_dir here")


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow with file descriptor 2 sent to /dev/null: its C++ start-up lines
    (oneDNN, absl's pre-initialisation notice) bypass Python and TF_CPP_MIN_LOG_LEVEL."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401 - imported for TFDS's builders, silenced here
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def prepare(
    name: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    image_size: int = 32,
    progress: bool = False,
):
    """Prepares `name` as TFDS ArrayRecord in `data_dir`; returns the prepared builder.

    Already prepared data sets are left as they are. `image_size` selects the digits
    resolution; `manual_dir` is where imagenet2012's archives are; `progress` shows TFDS's
    progress bars (off by default: they are terminal escape codes).
    """
    if name not in DATASETS:
        raise PrepareError(f"--dataset must be one of {list(DATASETS)}, got {name!r}")
    if name == "digits":
        datasets.check_digits_size(image_size, "--image_size")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tfds = datasets.tfds()
    if not progress:
        tfds.disable_progress_bar()
    if name == "digits":
        from dmae_jax.data import digits  # a TFDS builder: imported with TFDS

        return digits.prepare(image_size, data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    if name == "imagenet2012":
        root = os.fspath(data_dir) if data_dir is not None else tfds.core.constants.DATA_DIR
        manual_dir = os.fspath(manual_dir or os.path.join(root, "downloads", "manual"))
        archives = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
        if not any(os.path.isfile(os.path.join(manual_dir, a)) for a in archives):
            raise PrepareError(
                f"--manual_dir {manual_dir!r} holds neither {archives[0]} nor {archives[1]}: "
                "download them from https://image-net.org/ (TFDS cannot download ImageNet)")
    _check_tensorflow(name)
    _check_network(name)
    _import_tensorflow_quietly()
    if storage.is_gcs(data_dir):  # ArrayRecord cannot write gs://: prepared here, uploaded
        with storage.staged_upload(data_dir, last=storage.TFDS_COMMIT_FILES) as local:
            prepare(name, data_dir=local, manual_dir=manual_dir, progress=progress)
        return tfds.builder(name, data_dir=data_dir)
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir, try_download_gcs=False),
        )
    except (OSError, ValueError, AssertionError) as e:  # downloads, archives, checksums
        if errors.one_line(e) is not None:
            raise  # a full disk says so itself
        raise PrepareError(f"preparing {name!r} in {os.fspath(builder.data_dir)} failed: "
                           f"{' '.join(str(e).split())[:500]}") from e
    return builder


def _parse_args(argv: Sequence[str] | None):
    parser = errors.ArgumentParser(
        prog="python -m dmae_jax.prepare",
        description="Prepare a data set in the ArrayRecord format dmae_jax reads.")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data directory (default: TFDS's, ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None,
                        help="imagenet2012: directory with ILSVRC2012_img_{train,val}.tar")
    parser.add_argument("--image_size", type=int, default=32, help="digits: side in pixels")
    parser.add_argument("--progress", action="store_true", help="show TFDS's progress bars")
    args = parser.parse_args(argv)
    if args.data_dir is not None and os.path.exists(args.data_dir) \
            and not os.path.isdir(args.data_dir):
        raise ConfigError(f"--data_dir={args.data_dir} is a file, not a directory")
    return args


@errors.reporting
def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; a problem is one `error:` line on stderr and exit status 2."""
    args = _parse_args(argv)
    quiet.install()
    builder = prepare(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir,
                      image_size=args.image_size, progress=args.progress)
    splits = ", ".join(f"{k} {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
    print(f"{args.dataset} prepared in {os.fspath(builder.data_dir)} ({splits})", flush=True)


if __name__ == "__main__":
    main()
