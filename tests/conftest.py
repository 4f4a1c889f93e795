"""Test setup: several CPU devices in one process, so sharding code is exercised, and one
persistent compilation cache for the session."""

import atexit
import os
import shutil
import tempfile

# Must happen before JAX initialises its backend.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
# The test extra installs libtpu (for the compile-only tests); without this JAX would try to
# start a TPU backend first, print libtpu's warnings and only then fall back to the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent compilation cache for the whole session, shared with the processes the tests
# start (helpers.env copies this environment): many tests run the same small programs in
# several processes (a run, its kill and its resume; refused runs; two hosts), and compiling
# them is most of such a test's time. The cache only replaces a compilation by its stored
# result; a test that must compile afresh (test_gcs's bit-identical resume: a resumed run
# recompiles on a user's machine) sets JAX_ENABLE_COMPILATION_CACHE=false for its processes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dmae_jax-test-jit-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
