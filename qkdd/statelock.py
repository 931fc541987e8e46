"""One daemon per state directory: an exclusive lock held for the daemon's life.

Two daemons on one state directory would pre-empt each other's rounds and overwrite each other's status.
``qkdd run`` takes an exclusive ``flock`` on ``STATE_DIR/qkdd.lock`` before it opens anything else, and
writes its pid into the file once it holds the lock. The kernel drops the lock when the process ends,
however it ends (kill -9 included), so a stale lock file never keeps a daemon out.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from qkdd.errors import QkddError

LOCK_FILE = "qkdd.lock"


class StateDirLocked(QkddError):
    """Another process holds the state directory's lock."""


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Take the state directory's lock (creating the directory, 0700, if it is missing); keep the returned
    file open for as long as the lock is to be held.

    Raises:
        StateDirLocked: another qkdd holds it; nothing was written.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = (state_dir / LOCK_FILE).open("a+", encoding="ascii")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "unknown"
        lock.close()
        raise StateDirLocked(f"another qkdd (pid {pid}) runs on {state_dir}") from None
    except BaseException:
        lock.close()
        raise
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def holder(state_dir: Path) -> int | None:
    """The pid of the process that holds the state directory's lock, or ``None`` when none does (or
    the system does not say: this reads ``/proc/locks``, Linux). Looks only: never takes the lock,
    which would make a daemon starting at that moment fail."""
    path = state_dir / LOCK_FILE
    try:
        inode = path.stat().st_ino
        written = path.read_text(encoding="ascii").strip()
        table = Path("/proc/locks").read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1808 fe:00:2548739 0 EOF"; a waiter's line has "->" after the id
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[5].rsplit(":", 1)[-1] != str(inode):
            continue
        # the inode alone may match a file of another file system: the pid must match too (a pid
        # namespace may show 0 there; the lock file has the daemon's own view of its pid)
        if fields[4] == written or (fields[4] == "0" and written.isdigit()):
            return int(written)
    return None
