"""The allocator settings of :mod:`qkdd.memory`: freed buffers stay in the process for the next round."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys, threading
import numpy as np
from qkdd.memory import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
faults = []
def work():
    # what a round's worker thread does: far more than one 64 MiB heap of arrays, freed at once
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        # 768 MiB in arrays of 16 MiB, each below the mmap threshold
        arrays = [np.ones(1 << 21) for _ in range(48)]
        del arrays
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(faults[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_worker_threads_freed_arrays_are_reused_without_faulting_pages_in_again() -> None:
    def faults(setting: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", PROGRAM, setting], capture_output=True, text=True, timeout=60, check=True
        )
        return int(run.stdout)

    pages = 48 * (1 << 21) * 8 // 4096
    # glibc's defaults fault the pages in again each time (fewer faults than pages where the kernel
    # backs them with transparent huge pages); with the settings, next to none
    off, on = faults("off"), faults("on")
    assert off > pages // 20
    assert on < pages // 200
