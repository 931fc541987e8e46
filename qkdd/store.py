"""The key store: one SQLite database in the state directory (protocol/qkdp-v2.md §13–§14).

Theory of operation
-------------------
* ``meta`` holds the link ID the store belongs to and ``next_round``, which only grows: a round number is
  reserved (written) before the round starts, so no number is used twice, restarts included.
* ``rounds`` has one row per finished round: ``committed`` (its key blocks are in ``keys``), ``pending``
  (Bob only: stored, waiting for Alice's word that she committed) or ``aborted`` (figures only).
* ``keys`` holds the key blocks, stored in (round, index) order (a table without row IDs, keyed by round
  and index): a round's blocks are appended to a few pages, whatever the size of the store. Blocks are
  read and deleted by round and index only; their IDs are derived from both (§14).
* Only committed keys are ever read out. Bob resolves pending rounds when he reconnects: Alice lists which
  of them she committed; Bob commits those and deletes the rest.

The database runs in WAL mode with ``synchronous=FULL`` (a commit is on disk when it returns) and is
created with mode 0600, like its WAL and shared-memory files.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdd.auth.reserve import KeyReserve
from qkdd.database import get_meta, set_meta, transaction
from qkdd.delivery.ledger import KeyLedger, count_committed, start_counters
from qkdd.errors import InputError
from qkdd.records import RoundSummary

DATABASE = "keys.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('pending', 'committed', 'aborted')),
    frame INTEGER NOT NULL, pulses INTEGER NOT NULL, detections INTEGER NOT NULL,
    sifted_bits INTEGER NOT NULL, qber REAL, phase_error REAL, disclosed_bits INTEGER NOT NULL,
    secret_bits INTEGER NOT NULL, reason TEXT, auth TEXT NOT NULL, seconds REAL, finished_at REAL NOT NULL
);
"""
_KEYS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    round INTEGER NOT NULL REFERENCES rounds (round),
    idx INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (round, idx)
) WITHOUT ROWID;
"""

_KEYS_BY_ID = "key_id TEXT PRIMARY KEY"
"""How the keys table of a store written by an older qkdd begins: rows in insertion order, with a unique
index on the key ID (:func:`_cluster_keys` converts them)."""


def _cluster_keys(db: sqlite3.Connection) -> None:
    """Convert an older store's keys table to the current one, stored in (round, index) order.

    Key blocks are read and deleted by round and index only, never looked up by ID (a key ID is derived
    from the round and index, §14). The older table has a unique index on the IDs, which are hashes: each
    of a round's thousands of new blocks lands on its own page of that index, so a commit rewrites
    thousands of pages and takes longer the larger the store. Clustered by (round, index), a round's
    blocks are appended to a few pages, and a commit takes the same time at any store size."""
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'keys'").fetchone()
    if row is None or _KEYS_BY_ID not in row[0]:
        return
    with transaction(db):
        db.execute(_KEYS_TABLE.format(name="keys_clustered"))
        db.execute(
            "INSERT INTO keys_clustered (round, idx, key_id, key) SELECT round, idx, key_id, key FROM keys"
        )
        db.execute("DROP TABLE keys")  # its indexes go with it; secure_delete overwrites the freed pages
        db.execute("ALTER TABLE keys_clustered RENAME TO keys")


_ROUND_COLUMNS = (
    "round",
    "frame",
    "pulses",
    "detections",
    "sifted_bits",
    "qber",
    "phase_error",
    "disclosed_bits",
    "secret_bits",
    "reason",
    "auth",
)


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    rounds: int
    committed_rounds: int
    aborted_rounds: int
    pending_rounds: int
    stored_keys: int
    stored_key_bits: int
    last_round: dict[str, Any] | None


class KeyStore:
    """The key store of one daemon. Not thread-safe: one owner at a time."""

    def __init__(self, state_dir: Path, link_id: str | None, *, create: bool = True) -> None:
        self.path = Path(state_dir) / DATABASE
        if not self.path.exists():
            if not create:
                raise InputError(f"no key store at {self.path}")
            Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        old_umask = os.umask(0o077)  # the -wal and -shm files
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
        finally:
            os.umask(old_umask)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA secure_delete=ON")  # deleted key material is overwritten, not just unlinked
        _cluster_keys(self._db)
        self._db.executescript(_SCHEMA + _KEYS_TABLE.format(name="keys"))
        self.reserve = KeyReserve(self._db)
        self._ledger: KeyLedger | None = None
        start_counters(self._db)
        stored = self._meta("link_id")
        if link_id is None:
            if stored is None:
                raise InputError(f"{self.path} holds no link ID: not a qkdd key store")
            link_id = stored
        elif stored is None:
            self._set_meta("link_id", link_id)
        elif stored != link_id:
            raise InputError(f"link_id: the store in {state_dir} belongs to link {stored!r}, not {link_id!r}")
        self.link_id = link_id

    def close(self) -> None:
        self._db.close()

    def ledger(self, role: str) -> KeyLedger:
        """The key-delivery view of this store (ETSI GS QKD 014, §19)."""
        if self._ledger is None:
            self._ledger = KeyLedger(self._db, role)
        return self._ledger

    # -- meta

    def _meta(self, name: str) -> str | None:
        return get_meta(self._db, name)

    def _set_meta(self, name: str, value: str) -> None:
        set_meta(self._db, name, value)

    @property
    def next_round(self) -> int:
        value = self._meta("next_round")
        last = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()[0]
        return max(int(value or 0), 0 if last is None else int(last) + 1)

    def reserve_round(self, round_number: int) -> None:
        """Record that ``round_number`` is in use: ``next_round`` becomes at least round_number + 1."""
        if round_number < self.next_round:
            raise InputError(f"round {round_number} was already used (next is {self.next_round})")
        self._set_meta("next_round", str(round_number + 1))

    @property
    def epoch(self) -> int:
        """qkdp/1's restore detector, as a qkdp/1 store left it (qkdp/2 keeps it and never moves it)."""
        return int(self._meta("epoch") or 0)

    @property
    def psk_retired(self) -> bool:
        return self._meta("psk_retired") == "1"

    def retire_psk(self) -> None:
        self._set_meta("psk_retired", "1")

    # -- rounds

    def _insert_round(self, summary: RoundSummary, state: str, seconds: float | None) -> None:
        values = [getattr(summary, c) for c in _ROUND_COLUMNS]
        self._db.execute(
            f"INSERT OR REPLACE INTO rounds ({', '.join(_ROUND_COLUMNS)}, state, seconds, finished_at) "
            f"VALUES ({', '.join('?' * len(_ROUND_COLUMNS))}, ?, ?, ?)",
            (*values, state, seconds, time.time()),
        )

    def _state(self, round_number: int) -> str | None:
        row = self._db.execute("SELECT state FROM rounds WHERE round = ?", (round_number,)).fetchone()
        return None if row is None else str(row[0])

    def store_round(
        self,
        summary: RoundSummary,
        blocks: Iterable[tuple[str, bytes]],
        pending: bool,
        seconds: float | None,
        reserve: tuple[bytes, int] = (b"", 0),
    ) -> None:
        """Store a finished round, its key blocks and its reserve contribution (packed bits, count), as
        pending (Bob) or committed, atomically."""
        with transaction(self._db):
            if self._state(summary.round) is not None:
                raise InputError(f"round {summary.round} is already in the store")
            self._insert_round(summary, "pending" if pending else "committed", seconds)
            self._db.executemany(
                "INSERT INTO keys (key_id, round, idx, key) VALUES (?, ?, ?, ?)",
                [(key_id, summary.round, i, key) for i, (key_id, key) in enumerate(blocks)],
            )
            self.reserve.add(summary.round, *reserve, committed=not pending)
            if not pending:
                count_committed(self._db, summary.round)

    def record_aborted(self, summary: RoundSummary, seconds: float | None) -> None:
        """Record an aborted round's figures, dropping any pending keys; a committed round is left alone."""
        with transaction(self._db):
            state = self._state(summary.round)
            if state == "committed":
                return
            self._db.execute("DELETE FROM keys WHERE round = ?", (summary.round,))
            self._db.execute("DELETE FROM reserve WHERE round = ?", (summary.round,))
            self._insert_round(summary, "aborted", seconds)

    def commit_round(self, round_number: int) -> None:
        with transaction(self._db):
            if self._state(round_number) != "pending":
                raise InputError(f"round {round_number} is not pending")
            self._mark_committed(round_number)

    def _mark_committed(self, round_number: int) -> None:
        """Inside a transaction: the pending round becomes committed, with its reserve bits and its key
        material counted for delivery."""
        self._db.execute("UPDATE rounds SET state = 'committed' WHERE round = ?", (round_number,))
        self.reserve.commit(round_number)
        count_committed(self._db, round_number)

    def pending_rounds(self) -> list[int]:
        rows = self._db.execute("SELECT round FROM rounds WHERE state = 'pending' ORDER BY round").fetchall()
        return [int(r[0]) for r in rows]

    def committed_among(self, rounds: Iterable[int]) -> list[int]:
        wanted = sorted(set(rounds))
        found = []
        for r in wanted:
            if self._state(r) == "committed":
                found.append(r)
        return found

    def resolve(self, committed: Iterable[int]) -> tuple[list[int], list[int]]:
        """Commit the pending rounds listed, drop every other pending round; returns (committed, dropped)."""
        keep = set(committed)
        done, dropped = [], []
        with transaction(self._db):
            for r in self.pending_rounds():
                if r in keep:
                    self._mark_committed(r)
                    done.append(r)
                else:
                    self._db.execute("DELETE FROM keys WHERE round = ?", (r,))
                    self._db.execute("DELETE FROM reserve WHERE round = ?", (r,))
                    self._db.execute(
                        "UPDATE rounds SET state = 'aborted', reason = ?, secret_bits = 0 WHERE round = ?",
                        ("the peer did not commit this round (connection lost before its end)", r),
                    )
                    dropped.append(r)
        return done, dropped

    # -- reading

    def committed_keys(self) -> Iterator[tuple[str, bytes]]:
        """Every committed key block, in round and index order."""
        rows = self._db.execute(
            "SELECT k.key_id, k.key FROM keys k JOIN rounds r ON r.round = k.round "
            "WHERE r.state = 'committed' ORDER BY k.round, k.idx"
        )
        for key_id, key in rows:
            yield str(key_id), bytes(key)

    def rounds(self, limit: int | None = None) -> list[dict[str, Any]]:
        query = (
            f"SELECT {', '.join(_ROUND_COLUMNS)}, state, seconds, finished_at FROM rounds ORDER BY round DESC"
        )
        rows = self._db.execute(query + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
        names = [*_ROUND_COLUMNS, "state", "seconds", "finished_at"]
        return [dict(zip(names, row, strict=True)) for row in reversed(rows)]

    def statistics(self) -> StoreStatistics:
        counts = dict(self._db.execute("SELECT state, COUNT(*) FROM rounds GROUP BY state").fetchall())
        keys, total = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(k.key)), 0) FROM keys k JOIN rounds r ON r.round = k.round "
            "WHERE r.state = 'committed'"
        ).fetchone()
        last = self.rounds(1)
        return StoreStatistics(
            rounds=sum(counts.values()),
            committed_rounds=counts.get("committed", 0),
            aborted_rounds=counts.get("aborted", 0),
            pending_rounds=counts.get("pending", 0),
            stored_keys=int(keys),
            stored_key_bits=8 * int(total),
            last_round=last[0] if last else None,
        )


@contextlib.contextmanager
def read_only(state_dir: Path) -> Iterator[sqlite3.Connection]:
    """The key store of ``state_dir`` opened read-only, for tools beside a running daemon (status
    figures, plots, checks): they never write to it, nor create it."""
    with contextlib.closing(sqlite3.connect(f"file:{Path(state_dir) / DATABASE}?mode=ro", uri=True)) as db:
        yield db


def finished_rounds(state_dir: Path, after: int = -1) -> list[dict[str, Any]]:
    """The rounds numbered above ``after`` that have ended (committed or aborted), as
    :meth:`KeyStore.rounds` gives them, read from a running daemon's store without writing to it."""
    names = [*_ROUND_COLUMNS, "state", "seconds", "finished_at"]
    with read_only(state_dir) as db:
        rows = db.execute(
            f"SELECT {', '.join(names)} FROM rounds WHERE round > ? AND state != 'pending' ORDER BY round",
            (after,),
        ).fetchall()
    return [dict(zip(names, row, strict=True)) for row in rows]
