"""Threads for work that should only take the CPU the protocol leaves idle: the simulator's next frame,
and the round work a :class:`~qkdd.engine.Compute` action announces (Alice hashing her key early, either
side hashing its transcripts).

On a two-core machine that runs both daemons, such work competes with the round's critical path (the
side that the other one waits for). Its threads therefore run at a lower scheduling priority: Linux
keeps a nice value per thread, so ``setpriority`` on the thread's own ID lowers that thread alone. A
thread cannot raise its priority again without privileges, so these are pools of their own, never the
threads that run critical work. Work the round is about to wait for (``Compute(urgent=True)``: Bob
transforming his key during the confirmation) gets a pool of its own at the daemon's priority.

The key store's calls, one at a time anyway, run on a :class:`SerialThread` of their own at the daemon's
priority: handing a call to one long-lived thread costs less than ``trio.to_thread.run_sync`` does per
call (its capacity limiter, its thread cache, renaming the thread for each call).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

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


class SerialThread:
    """One thread, named ``name`` for the OS and started at the first call, that runs the calls handed to
    it one after the other, for tasks of the trio run that hands them over.

    :meth:`run` behaves as ``trio.to_thread.run_sync`` (without ``abandon_on_cancel``): a cancellation
    before the hand-over leaves the function unrun; once handed over, the function runs to its end and
    the task waits for it, cancelled or not."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], trio.lowlevel.TrioToken, trio.lowlevel.Task] | None
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the thread; its result, or its exception raised here."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put(
            (lambda: function(*args), trio.lowlevel.current_trio_token(), trio.lowlevel.current_task())
        )
        result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def close(self) -> None:
        """Let the thread end once the calls handed over so far are done (a later call starts a new one)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _work(self) -> None:
        name_thread(self.name)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            call, token, task = job
            result = outcome.capture(call)
            with contextlib.suppress(trio.RunFinishedError):  # the run ended: no task waits any more
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
