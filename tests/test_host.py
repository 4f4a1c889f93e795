"""Host settings: XLA's per-execution temporaries are reused, not mapped afresh each call."""

from __future__ import annotations

import subprocess
import sys

from tests import helpers

# A compiled program with a 64 MB temporary (above glibc's largest mmap threshold), called
# seven times; prints the temporary's size and the median of the minor page faults per call
# (the heap may still grow once while it reaches its high-water mark). The process runs on
# one core, so it is a "small host" whatever machine runs the test.
FAULTS_PER_CALL = """
import os, resource, sys
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
if sys.argv[1] == "configured":
    from dmae_jax import host
    host.configure()
import jax, jax.numpy as jnp

@jax.jit
def f(x):
    return (jax.lax.optimization_barrier(jnp.sin(x)) * 2.0).sum()

x = jnp.ones((4096, 4096), jnp.float32)
print(f.lower(x).compile().memory_analysis().temp_size_in_bytes)
f(x).block_until_ready()
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[3])
"""


def _temp_and_faults(mode: str) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL, mode], cwd=helpers.REPO,
                         env=helpers.env(), capture_output=True, text=True, check=True,
                         timeout=300).stdout.split()
    return int(out[-2]), float(out[-1])


def test_configured_small_host_reuses_xlas_temporaries_instead_of_faulting_them_in():
    temp, faults = _temp_and_faults("glibc defaults")
    assert temp >= 64 * 2**20
    # The control: glibc maps the temporary afresh on every call, one fault per 4 KiB page.
    assert faults > 0.5 * temp / 4096, faults
    _, configured = _temp_and_faults("configured")
    assert configured < 0.01 * temp / 4096, configured
