"""Test setup: several CPU devices in one process, so sharding code is exercised."""

import os

# Must happen before JAX initialises its backend.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
# The test extra installs libtpu (for the compile-only tests); without this JAX would try to
# start a TPU backend first, print libtpu's warnings and only then fall back to the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
