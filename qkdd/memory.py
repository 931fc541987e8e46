"""Keep freed buffers in the process (glibc ``mallopt``), so each round reuses warm pages.

Every round allocates and frees arrays of megabytes. glibc serves those with ``mmap`` and gives them back
with ``munmap`` on free, so the next round faults every page in again — and where the host reclaims
freed guest memory (virtual machines with free-page reporting), each such fault is far costlier than
the work on the page. Raising the mmap threshold to its maximum (32 MiB) and disabling heap trimming
makes the allocator keep and reuse that memory.

That alone covers the main thread only. Every other thread allocates from an arena of its own, made of
64 MiB heaps that glibc unmaps as soon as one is empty — and a round's worker threads (sifting, the
simulator, the FFTs) free far more than 64 MiB at a time, so their pages would be faulted in afresh
every round all the same, each zeroed by the kernel. One arena for all threads (``M_ARENA_MAX``) keeps
that memory too, and the steady-state faults drop about tenfold. Large arrays are few and their
allocations short, so threads rarely wait on the arena's lock. Without glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems


def keep_freed_memory() -> bool:
    """Apply the settings; returns whether glibc accepted them."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, 1 << 30), (M_ARENA_MAX, 1))
    return all([bool(mallopt(option, value)) for option, value in settings])  # a list: every one applied
