"""Host settings made once per process, before JAX starts (`main` and the benchmarks call
`configure` first).

Memory (glibc). XLA:CPU gives every execution of a compiled program one buffer for all its
temporaries: 129 MB for the digits pretraining step, 50-130 MB for the other digits steps.
glibc serves a request above 32 MB (its largest mmap threshold) with a fresh `mmap` and
gives it back with `munmap` when it is freed, so the kernel maps and zeroes about 30,000
new pages on every step; threads other than the main one allocate from arenas whose
heaps are unmapped as soon as they are empty, to the same effect. In the digits pipeline
that was 111 million page faults, a fifth of its CPU time spent in the kernel (256 s of
1,361 s). On a host that computes on its CPU (`SMALL_HOST_CORES` usable cores or fewer:
laptops and small VMs) `configure` keeps freed memory in the heap instead: one arena for
every thread, no mmap, no trimming. Memory then stays at its high-water mark, which is what
the next step needs anyway. Larger hosts (TPU VMs, GPU servers) keep glibc's defaults,
where one arena per thread avoids contention between many threads.

Threads. JAX's CPU client already sizes its intra-op pool to the usable cores; the input
pipeline of the digits configs runs in the training loop's own thread (no Grain threads,
see `dmae_jax.data.pipeline`), and OpenBLAS is idle (the host does no linear algebra), so
there is nothing to set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from absl import logging

# Hosts with at most this many usable cores are taken to compute on their CPU.
SMALL_HOST_CORES = 8
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def configure() -> None:
    """Applies the memory settings of the module docstring on a small glibc host."""
    if len(os.sched_getaffinity(0)) > SMALL_HOST_CORES:
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return  # not glibc (musl, macOS): its allocator has its own rules
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    failed = [param for param, value in settings if libc.mallopt(param, value) != 1]
    if failed:
        logging.warning("glibc refused mallopt parameters %s; freed memory may be returned "
                        "to the kernel on every step", failed)
