"""Background threads run at a lower priority than the rest of the daemon (qkdd.background)."""

from __future__ import annotations

import os
import threading

import pytest

from qkdd import background


def test_background_threads_alone_run_at_a_lower_priority() -> None:
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness()
    with background.executor("test-background") as pool:
        inside = pool.submit(niceness).result(timeout=10)
    assert inside == min(19, before + background.NICENESS)
    assert niceness() == before  # the calling thread (and the process) keep theirs
    with background.executor("test-urgent", lower=False) as pool:  # work the round is about to wait for
        assert pool.submit(niceness).result(timeout=10) == before


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux names threads in /proc")
def test_background_threads_carry_their_name_for_the_os() -> None:
    def comm() -> str:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()

    mine = comm()
    with background.executor("qkdd-test-naming-long") as pool:
        assert pool.submit(comm).result(timeout=10) == "qkdd-test-namin"  # 15 bytes: the kernel's limit
    assert comm() == mine
