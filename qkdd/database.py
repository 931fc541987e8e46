"""What the key store, the key reserve and the delivery ledger share on their one SQLite database:
transactions and the ``meta`` table of named values."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, *, durable: bool = True) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK if the block raises (durable at COMMIT: ``synchronous``).

    ``durable=False``: COMMIT does not wait for the disk (``synchronous=NORMAL`` for this transaction
    alone; the database is in WAL mode). The transaction then survives a crash of the process but not
    of the machine — until the next durable commit, which writes it too, since the WAL keeps commit
    order. Only for what the peer repeats if it is lost (its log entries, §19)."""
    if not durable:
        db.execute("PRAGMA synchronous=NORMAL")
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        if not durable:
            db.execute("PRAGMA synchronous=FULL")


def get_meta(db: sqlite3.Connection, name: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(db: sqlite3.Connection, name: str, value: str) -> None:
    db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
