"""The key reserve: authentication key bits taken from QKD's own output (qkdp-v1.md §16–§17).

Theory of operation
-------------------
* Each committed round may move a few thousand bits of its final key into the reserve (``amplify`` says
  how many; the rest becomes key blocks). The reserve is a bit stream: the chunks of the committed rounds
  in round order. Alice and Bob hold the same committed rounds, so the same stream.
* Bits ``[0, 122)`` are the Wegman–Carter hash keys (reused); every later bit is one-time-pad material.
  ``consumed`` is the position of the first unused pad bit. It only moves forward, and it is written
  durably (SQLite, ``synchronous=FULL``) *before* any tag using the bits below it leaves the process.
* After a crash the two sides may disagree on ``consumed``; at the next handshake both take the larger
  value, so no bit is used twice.
* The chunks live in the key store's database, in the same transaction as their round, so a round's key
  and its reserve contribution are committed (or dropped) together.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import numpy as np

from qkdd.auth import wegman_carter as wc
from qkdd.errors import InputError

KEY_REGION_BITS = 128
"""Reserve bits [0, 128) hold the two 61-bit hash keys; one-time pads start here."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS reserve (
    round INTEGER PRIMARY KEY REFERENCES rounds (round),
    bits INTEGER NOT NULL,
    data BLOB NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class ReserveStatus:
    total_bits: int
    consumed: int

    @property
    def available_bits(self) -> int:
        return max(0, self.total_bits - max(self.consumed, KEY_REGION_BITS))


class KeyReserve:
    """The reserve view of one key store's database (committed rounds only)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._db.executescript(SCHEMA)
        self._cache: tuple[int, bytes] | None = None  # (total bits, packed stream)

    def _stream(self) -> tuple[int, bytes]:
        rows = self._db.execute(
            "SELECT r.bits, r.data FROM reserve r JOIN rounds d ON d.round = r.round "
            "WHERE d.state = 'committed' ORDER BY r.round"
        ).fetchall()
        total = sum(int(bits) for bits, _ in rows)
        if self._cache is not None and self._cache[0] == total:
            return self._cache
        bits = np.concatenate(
            [np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=int(count)) for count, data in rows]
            or [np.zeros(0, dtype=np.uint8)]
        )
        self._cache = (total, np.packbits(bits).tobytes())
        return self._cache

    @property
    def total_bits(self) -> int:
        row = self._db.execute(
            "SELECT COALESCE(SUM(r.bits), 0) FROM reserve r JOIN rounds d ON d.round = r.round "
            "WHERE d.state = 'committed'"
        ).fetchone()
        return int(row[0])

    @property
    def consumed(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'reserve_consumed'").fetchone()
        return KEY_REGION_BITS if row is None else max(KEY_REGION_BITS, int(row[0]))

    def status(self) -> ReserveStatus:
        return ReserveStatus(self.total_bits, self.consumed)

    def read(self, start: int, count: int) -> bytes:
        """Bits ``[start, start + count)`` of the stream, packed MSB-first."""
        total, packed = self._stream()
        if start < 0 or count < 0 or start + count > total:
            raise InputError(f"reserve holds {total} bits; bits [{start}, {start + count}) do not exist")
        bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=total)[start : start + count]
        return np.packbits(bits).tobytes()

    def hash_keys(self) -> list[int]:
        return wc.split_bits(self.read(0, wc.KEY_BITS), wc.HASHES)

    def pads(self, start: int) -> list[int]:
        if start < KEY_REGION_BITS:
            raise InputError("one-time pads start after the hash keys")
        return wc.split_bits(self.read(start, wc.OTP_BITS), wc.HASHES)

    def consume(self, upto: int) -> None:
        """Mark every bit below ``upto`` used, durably; never moves backwards."""
        if upto > self.consumed:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES ('reserve_consumed', ?)", (str(upto),)
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add(self, round_number: int, bits: bytes, count: int) -> None:
        """Record a round's contribution (inside the caller's transaction); counts once the round commits."""
        if count:
            self._db.execute(
                "INSERT INTO reserve (round, bits, data) VALUES (?, ?, ?)", (round_number, count, bits)
            )
