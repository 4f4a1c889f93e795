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
    packages=find_packages(include=["dmae_jax", "dmae_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources>=6.0",  # imported by TFDS builders, no longer pulled in by etils
        # CLU's metric writers and TFDS's image encoding import TensorFlow; never used in
        # the jitted step (see DESIGN.md).
        "tensorflow-cpu>=2.21.0",
        "clu>=0.0.12",
        "tensorboard>=2.15",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "numpy>=2.0",
        "scipy>=1.14",
        "statsmodels>=0.14",
        "scikit-learn>=1.5",
        "pillow>=10.0",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch==2.13.0 installs a CPU build from a local file on our build machines.
        "test": ["pytest>=8.0", "portpicker>=1.6", "torch==2.13.0"],
        "convert": ["torch>=2.0"],
        "bench": ["torch==2.13.0"],
    },
)
