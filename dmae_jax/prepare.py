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

import argparse
import os
import sys
from collections.abc import Sequence

DATASETS = ("digits", "cifar10", "imagenet2012")
NEEDS_TENSORFLOW = ("cifar10", "imagenet2012")


class PrepareError(RuntimeError):
    """A data set cannot be prepared as asked; the message says what to do."""


def _check_tensorflow(name: str) -> None:
    import importlib.util

    if name in NEEDS_TENSORFLOW and importlib.util.find_spec("tensorflow") is None:
        raise PrepareError(
            f"preparing {name!r} needs TensorFlow (TFDS's {name} builder uses it to encode "
            "and read images); install it with: pip install -e \".[prepare]\" "
            "(or pip install tensorflow-cpu); training and certification do not need it")


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
        import tensorflow  # noqa: F401
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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow_datasets as tfds

    if not progress:
        tfds.disable_progress_bar()
    if name == "digits":
        from dmae_jax.data import digits

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
    _import_tensorflow_quietly()
    from dmae_jax import storage

    if storage.is_gcs(data_dir):  # ArrayRecord cannot write gs://: prepared here, uploaded
        with storage.staged_upload(data_dir, last=storage.TFDS_COMMIT_FILES) as local:
            prepare(name, data_dir=local, manual_dir=manual_dir, progress=progress)
        return tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=False),
    )
    return builder


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dmae_jax.prepare",
        description="Prepare a data set in the ArrayRecord format dmae_jax reads.")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data directory (default: TFDS's, ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None,
                        help="imagenet2012: directory with ILSVRC2012_img_{train,val}.tar")
    parser.add_argument("--image_size", type=int, default=32, help="digits: side in pixels")
    parser.add_argument("--progress", action="store_true", help="show TFDS's progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; a problem is one line on stderr and exit status 1."""
    args = _parse_args(argv)
    from dmae_jax import quiet

    quiet.install()
    try:
        builder = prepare(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir,
                          image_size=args.image_size, progress=args.progress)
    except (PrepareError, OSError, ValueError, AssertionError) as e:
        sys.exit(f"dmae_jax.prepare: error: {' '.join(str(e).split())}")
    splits = ", ".join(f"{k} {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
    print(f"{args.dataset} prepared in {os.fspath(builder.data_dir)} ({splits})", flush=True)


if __name__ == "__main__":
    main()
