"""Group commit for key hand-outs: commit at once without the disk wait, answer after one shared sync.

Theory of operation
-------------------
* A hand-out is a transaction that commits without waiting for the disk (``synchronous=NORMAL`` in WAL
  mode: its pages are in the ``-wal`` file, in the kernel's page cache, and every later transaction of
  this process sees them). Right after its commit the caller takes a *ticket* (:meth:`DiskSync.ticket`).
* Before anything of it leaves the daemon, the caller waits (:meth:`DiskSync.wait`) until one
  ``fdatasync`` of the ``-wal`` file that *began after* its commit has returned: then the transaction is
  on the disk, exactly as if it had committed with ``synchronous=FULL`` (which is that same sync, made by
  SQLite inside COMMIT). One sync covers every commit before it, so the hand-outs that commit while a
  sync runs share the next one: one disk wait for all of them, whatever their number.
* The syncs run on one thread of their own, one at a time; the event loop only hands it a number and is
  woken once per sync. The SQLite work itself stays on the event loop's thread: a hand-out is a few
  indexed statements, and a hop to a worker thread per request cost more CPU than the statements.
* What a crash costs: a process that dies (kill -9) loses nothing it committed — the kernel holds the
  pages and writes them — so a hand-out committed but not yet answered counts as delivered after the
  restart (the slave asking again hears "already delivered"), never as a key to give again. A machine
  that fails before the sync loses such hand-outs: none of them was answered, so each key is still
  there for its slave. No key leaves twice either way.
* A failed sync (an I/O error) fails every request waiting for it: their answers do not go out, and the
  error is logged, since those keys are then recorded as delivered to slaves that never got them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path

import trio

from qkdd.background import name_thread

log = logging.getLogger("qkdd")


class DiskSync:
    """Durability of this process's commits to the WAL database ``database`` that skipped the disk
    wait (see the module's docstring). Use from one trio run (the daemon's)."""

    def __init__(self, database: Path) -> None:
        self._wal = Path(f"{database}-wal")
        self._database = Path(database)
        self._committed = 0  # the last ticket handed out
        self._synced = 0  # every commit whose ticket is at most this is on the disk
        self._syncing = False  # a sync is under way on the thread
        self._done = trio.Event()  # set (and replaced) when a sync ends
        self._error: OSError | None = None  # why the last sync failed
        self._jobs: queue.SimpleQueue[tuple[int, trio.lowlevel.TrioToken]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.syncs = 0  # syncs done (for tests and statistics)

    def ticket(self) -> int:
        """The number of a commit that just returned (call it before any yield to the event loop)."""
        self._committed += 1
        return self._committed

    async def wait(self, ticket: int) -> None:
        """Until the commit of ``ticket`` is on the disk.

        Raises:
            OSError: the sync that was to make it durable failed.
        """
        while self._synced < ticket:
            done = self._done  # before the start: a sync may end at once
            if not self._syncing:
                self._start()
            await done.wait()
            if self._synced < ticket and self._error is not None:
                raise self._error

    def _start(self) -> None:
        self._syncing = True
        self._error = None
        self._begin(self._committed)

    def _begin(self, target: int) -> None:
        """Have the thread sync up to ticket ``target`` and report to :meth:`_finished`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qkdd-sync", daemon=True)
            self._thread.start()
        self._jobs.put((target, trio.lowlevel.current_trio_token()))

    def _run(self) -> None:
        name_thread("qkdd-sync")
        while True:
            target, token = self._jobs.get()
            error: OSError | None = None
            try:
                sync_file(self._wal, self._database)
            except OSError as failure:
                error = failure
            try:
                token.run_sync_soon(self._finished, target, error)
            except trio.RunFinishedError:
                return  # the daemon's event loop is gone: no one waits any more

    def _finished(self, target: int, error: OSError | None) -> None:
        """On the event loop: the sync up to ticket ``target`` ended (``error``: it failed)."""
        self._syncing = False
        self.syncs += 1
        if error is None:
            self._synced = max(self._synced, target)
        else:
            self._error = error
            log.critical(
                "key delivery: the disk sync of hand-outs failed (%s); keys recorded as handed out in "
                "the failed sync were not answered",
                error,
            )
        done, self._done = self._done, trio.Event()
        done.set()


def sync_file(wal: Path, database: Path) -> None:
    """``fdatasync`` the WAL file ``wal`` — or, if there is none (SQLite removes it only after copying it
    into the database and syncing that), ``database``. Opened anew each time, so that a WAL file SQLite
    replaced is never one we sync in its stead."""
    try:
        descriptor = os.open(wal, os.O_RDONLY)
    except FileNotFoundError:
        descriptor = os.open(database, os.O_RDONLY)
    try:
        os.fdatasync(descriptor)
    finally:
        os.close(descriptor)
