"""Threads for work that should only take the CPU the protocol leaves idle: the simulator's next frame,
and the round work a :class:`~qkdd.engine.Compute` action announces (Alice hashing her key early, either
side hashing its transcripts).

On a two-core machine that runs both daemons, such work competes with the round's critical path (the
side that the other one waits for). Its threads therefore run at a lower scheduling priority: Linux
keeps a nice value per thread, so ``setpriority`` on the thread's own ID lowers that thread alone. A
thread cannot raise its priority again without privileges, so these are pools of their own, never the
threads that run critical work. Work the round is about to wait for (``Compute(urgent=True)``: Bob
transforming his key during the confirmation) gets a pool of its own at the daemon's priority.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

NICENESS = 10
"""How much lower than the daemon's own priority background threads run."""


def lower_priority() -> None:
    """Lower the calling thread's scheduling priority by :data:`NICENESS` (where the OS allows it)."""
    with contextlib.suppress(AttributeError, OSError):
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + NICENESS))


def name_thread(name: str) -> None:
    """Give the calling thread ``name`` (15 bytes at most) where the OS shows it — ``top -H``, ``ps -L``,
    ``/proc/PID/task/TID/comm`` — so that an operator sees which thread takes the CPU."""
    with contextlib.suppress(OSError), open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
        comm.write(name[:15])


def executor(name: str, workers: int = 1, *, lower: bool = True) -> ThreadPoolExecutor:
    """A pool whose threads run at the lowered priority (unless ``lower`` is false: work the critical
    path is about to wait for), named ``name`` for the OS."""

    def start() -> None:
        name_thread(name)
        if lower:
            lower_priority()

    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=start)
