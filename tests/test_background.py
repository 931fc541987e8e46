"""Background threads run at a lower priority than the rest of the daemon (qkdd.background)."""

from __future__ import annotations

import os
import threading

from qkdd import background


def test_background_threads_alone_run_at_a_lower_priority() -> None:
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness()
    with background.executor("test-background") as pool:
        inside = pool.submit(niceness).result(timeout=10)
    assert inside == min(19, before + background.NICENESS)
    assert niceness() == before  # the calling thread (and the process) keep theirs
