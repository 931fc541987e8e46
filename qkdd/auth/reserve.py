"""The key reserve: authentication key bits taken from QKD's own output (qkdp-v2.md §16–§17).

Theory of operation
-------------------
* Each committed round may move a few thousand bits of its final key into the reserve (``amplify`` says
  how many; the rest becomes key blocks). The reserve is a bit stream: the chunks of the committed rounds
  in round order. Alice and Bob hold the same committed rounds, so the same stream.
* Bits ``[0, 122)`` are the Wegman–Carter hash keys (reused); every later bit is one-time-pad material or
  part of a handshake key (256 bits, §17). ``consumed`` is the position of the first unused bit. It only
  moves forward, and it is written durably (SQLite, ``synchronous=FULL``) *before* any tag using the bits
  below it leaves the process.
* After a crash the two sides may disagree on ``consumed``; on the next connection both take the larger
  value from the peer's authenticated ``sync``, so no bit is used twice.
* The handshake keys this side holds (current and announced next, §17) are a row of ``meta``.
* The chunks live in the key store's database, in the same transaction as their round, so a round's key
  and its reserve contribution are committed (or dropped) together. A chunk gets its position in the
  stream when its round commits (Bob's pending rounds commit before any later round starts), so reading
  a few bits touches one or two rows, however long the link has run.
* Every consumption is also appended to ``reserve_use`` (from, to): an audit trail that shows no range
  was used twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass

import numpy as np

from qkdd.auth import wegman_carter as wc
from qkdd.database import get_meta, set_meta, transaction
from qkdd.errors import InputError
from qkdd.policy import HANDSHAKE_KEY_BITS, UPGRADE_KEY, HandshakeKeys

KEY_REGION_BITS = 128
"""Reserve bits [0, 128) hold the two 61-bit hash keys; one-time pads start here."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS reserve (
    round INTEGER PRIMARY KEY REFERENCES rounds (round),
    start INTEGER UNIQUE,  -- position in the stream; NULL while the round is pending
    bits INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS reserve_use (first INTEGER NOT NULL, past INTEGER NOT NULL, at REAL NOT NULL);
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

    @property
    def total_bits(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(start + bits), 0) FROM reserve").fetchone()
        return int(row[0])

    @property
    def consumed(self) -> int:
        value = get_meta(self._db, "reserve_consumed")
        return KEY_REGION_BITS if value is None else max(KEY_REGION_BITS, int(value))

    def status(self) -> ReserveStatus:
        return ReserveStatus(self.total_bits, self.consumed)

    def read(self, start: int, count: int) -> bytes:
        """Bits ``[start, start + count)`` of the stream, packed MSB-first."""
        total = self.total_bits
        if start < 0 or count < 0 or start + count > total:
            raise InputError(f"reserve holds {total} bits; bits [{start}, {start + count}) do not exist")
        rows = self._db.execute(
            "SELECT start, bits, data FROM reserve "
            "WHERE start IS NOT NULL AND start < ? AND start + bits > ? ORDER BY start",
            (start + count, start),
        ).fetchall()
        first = int(rows[0][0]) if rows else start
        bits = np.concatenate(
            [np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=int(n)) for _, n, data in rows]
            or [np.zeros(0, dtype=np.uint8)]
        )
        return np.packbits(bits[start - first : start - first + count]).tobytes()

    def hash_keys(self) -> list[int]:
        return wc.split_bits(self.read(0, wc.KEY_BITS), wc.HASHES)

    def pads(self, start: int) -> list[int]:
        if start < KEY_REGION_BITS:
            raise InputError("one-time pads start after the hash keys")
        return wc.split_bits(self.read(start, wc.OTP_BITS), wc.HASHES)

    def consume(self, upto: int) -> None:
        """Mark every bit below ``upto`` used, durably; never moves backwards."""
        if upto > self.consumed:
            with transaction(self._db):
                first = self.consumed
                set_meta(self._db, "reserve_consumed", str(upto))
                self._db.execute(
                    "INSERT INTO reserve_use (first, past, at) VALUES (?, ?, ?)", (first, upto, time.time())
                )

    def add(self, round_number: int, bits: bytes, count: int, *, committed: bool) -> None:
        """Record a round's contribution (inside the caller's transaction); it joins the stream when the
        round commits."""
        if count:
            self._db.execute(
                "INSERT INTO reserve (round, start, bits, data) VALUES (?, ?, ?, ?)",
                (round_number, self.total_bits if committed else None, count, bits),
            )

    def commit(self, round_number: int) -> None:
        """A pending round committed (inside the caller's transaction): append its chunk to the stream."""
        self._db.execute(
            "UPDATE reserve SET start = ? WHERE round = ? AND start IS NULL", (self.total_bits, round_number)
        )

    def used_ranges(self) -> list[tuple[int, int]]:
        """Every consumption, in order: the audit trail."""
        rows = self._db.execute("SELECT first, past FROM reserve_use ORDER BY rowid").fetchall()
        return [(int(a), int(b)) for a, b in rows]

    def handshake_keys(self) -> HandshakeKeys:
        """This side's handshake keys (§17). A store from qkdp/1 has none recorded: if its PSK was retired,
        its reserve handshakes continue under the key of :data:`UPGRADE_KEY`."""
        value = get_meta(self._db, "handshake_keys")
        if value is None:
            retired = get_meta(self._db, "psk_retired") == "1"
            # since 0: the first resolve replaces the upgrade key by one of its own
            return HandshakeKeys(UPGRADE_KEY if retired else None, None, 0)
        raw = json.loads(value)
        return HandshakeKeys(raw["current"], raw["next"], int(raw["since"]))

    def set_handshake_keys(self, keys: HandshakeKeys) -> None:
        """Record this side's handshake keys, durably."""
        value = json.dumps({"current": keys.current, "next": keys.next, "since": keys.since})
        with transaction(self._db):
            set_meta(self._db, "handshake_keys", value)

    def handshake_key(self, position: int) -> bytes:
        """The secret of the handshake key at ``position``: 256 reserve bits, or the 128 hash-key bits for
        :data:`UPGRADE_KEY`.

        Raises:
            InputError: the reserve does not hold those bits.
        """
        if position == UPGRADE_KEY:
            return self.read(0, KEY_REGION_BITS)
        if position < KEY_REGION_BITS:
            raise InputError(f"no handshake key at reserve bit {position}: the hash keys are there")
        return self.read(position, HANDSHAKE_KEY_BITS)
