"""Key material for applications: the pool, the assignments, the keys waiting for their SAEs (§19).

Theory of operation
-------------------
* **The pool** is the key material of the committed rounds: the key blocks of the ``keys`` table in
  (round, block) order, read as one byte string. A *pointer* (round, block, byte) is a position in it.
  ``head`` is the first byte no assignment has taken; everything before ``erased`` is gone from disk.
* **Bob allocates, always.** Every ETSI 014 key, whichever site's master asked for it, is cut by Bob from
  the head of his pool; Alice's requests travel to him over the key channel. One allocator serialises
  every allocation, so no byte can be assigned twice, even with masters at both sites asking at once.
  Bob cuts only from rounds *he* committed, and Alice commits every round before Bob does (§13), so the
  material Bob names is always committed at Alice, at the same position.
* An **assignment** (serial, start, number × size bits, key IDs, master, slaves) is ``offered`` at Bob
  until Alice acknowledges that she holds it durably, then ``final``. Alice *applies* it — checking that
  it is the next serial and starts at her own head — and it is final for her at once. Material is erased
  (rows deleted, a partly used block's used prefix overwritten) only once final, so Bob can roll back
  assignments Alice never received (the next ``keys_hello`` tells him the last serial she applied):
  a cut mid-request consumes nothing.
* **Keys** (``delivery_keys``): one row per key ID. At the master's site the key is handed to the master
  by enc_keys and the row keeps no key bytes; at the other site the row holds the bytes and the list of
  slave SAEs still to receive them; each named slave gets them once by dec_keys, and the bytes are
  erased when the last one has. A key is never handed out at a site twice, nor to an SAE not named.

Every method runs in one SQLite transaction (the key store's database, ``synchronous=FULL`` and
``secure_delete``), so a crash leaves either all of a step or none of it.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from qkdd.database import get_meta, set_meta, transaction
from qkdd.errors import QkddError

SCHEMA = """
CREATE TABLE IF NOT EXISTS delivery_assignments (
    serial INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('offered', 'final')),
    origin TEXT NOT NULL CHECK (origin IN ('alice', 'bob')),
    start TEXT NOT NULL, past TEXT NOT NULL,
    number INTEGER NOT NULL, size INTEGER NOT NULL,
    master TEXT NOT NULL, slaves TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS delivery_keys (
    key_id TEXT PRIMARY KEY,
    serial INTEGER NOT NULL REFERENCES delivery_assignments (serial),
    master TEXT NOT NULL,
    waiting TEXT NOT NULL,
    key BLOB
);
CREATE INDEX IF NOT EXISTS delivery_keys_serial ON delivery_keys (serial);
CREATE INDEX IF NOT EXISTS keys_position ON keys (round, idx);
"""

Pointer = tuple[int, int, int]
"""A position in the pool: (round, block index, byte within the block)."""

START: Pointer = (0, 0, 0)


class DeliveryError(QkddError):
    """An ETSI 014 request that cannot be served; ``status`` is the HTTP status it maps to."""

    status = 400


class UnknownKey(DeliveryError):
    status = 400


class NotAuthorized(DeliveryError):
    status = 401


class Unavailable(DeliveryError):
    status = 503


class Diverged(QkddError):
    """Alice's pool does not match Bob's assignment: a store was restored or tampered with."""


@dataclass(frozen=True, slots=True)
class Assignment:
    serial: int
    origin: str  # the role whose master SAE asked
    start: Pointer
    number: int
    size: int  # bits per key
    key_ids: tuple[str, ...]
    master: str
    slaves: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return self.number * self.size // 8


class KeyLedger:
    """The delivery view of one key store's database, for ``role``."""

    def __init__(self, db: sqlite3.Connection, role: str) -> None:
        self._db = db
        self.role = role
        db.executescript(SCHEMA)

    # -- pointers and counters (the key store's meta table)

    @property
    def head(self) -> Pointer:
        text = get_meta(self._db, "delivery_head")
        return START if text is None else _parse(text)

    @property
    def serial(self) -> int:
        """Bob: the last serial allocated; Alice: the last serial applied."""
        return int(get_meta(self._db, "delivery_serial") or 0)

    def available_bytes(self) -> int:
        """Pool bytes no assignment has taken (committed rounds only)."""
        r, b, o = self.head
        total = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(k.key)), 0) FROM keys k JOIN rounds r ON r.round = k.round "
            "WHERE r.state = 'committed' AND (k.round, k.idx) >= (?, ?)",
            (r, b),
        ).fetchone()[0]
        first = self._db.execute(
            "SELECT LENGTH(k.key) FROM keys k JOIN rounds r ON r.round = k.round "
            "WHERE r.state = 'committed' AND k.round = ? AND k.idx = ?",
            (r, b),
        ).fetchone()
        return int(total) - (min(o, int(first[0])) if first else 0)

    def waiting_keys(self) -> int:
        """Keys at this site that some named slave has not fetched yet."""
        return int(self._db.execute("SELECT COUNT(*) FROM delivery_keys WHERE key IS NOT NULL").fetchone()[0])

    # -- the allocator (Bob) and its mirror (Alice)

    def allocate(
        self, origin: str, number: int, size: int, master: str, slaves: Sequence[str]
    ) -> tuple[Assignment, list[bytes]]:
        """Bob: cut ``number`` keys of ``size`` bits from the head of the pool; returns the offered
        assignment and the keys. Raises :class:`Unavailable` if the pool is short (nothing is taken)."""
        if self.role != "bob":
            raise AssertionError("only Bob allocates")
        with transaction(self._db):
            start = self.head
            material, past = self._cut(start, number * size // 8)
            assignment = Assignment(
                self.serial + 1,
                origin,
                start,
                number,
                size,
                tuple(str(uuid.uuid4()) for _ in range(number)),
                master,
                tuple(slaves),
            )
            keys = self._record(assignment, past, material, "offered")
        return assignment, keys

    def apply(self, assignment: Assignment) -> list[bytes]:
        """Alice: take Bob's assignment; it must be the next serial and start at her head."""
        if self.role != "alice":
            raise AssertionError("only Alice applies assignments")
        with transaction(self._db):
            if assignment.serial != self.serial + 1:
                raise Diverged(f"assignment {assignment.serial} arrived; expected {self.serial + 1}")
            if assignment.start != self.head:
                raise Diverged(
                    f"assignment {assignment.serial} starts at {assignment.start}, not {self.head}"
                )
            try:
                material, past = self._cut(assignment.start, assignment.nbytes)
            except Unavailable:
                raise Diverged(f"assignment {assignment.serial} names key material this site lacks") from None
            keys = self._record(assignment, past, material, "final")
            self._erase_upto(past)
        return keys

    def finalize(self, serial: int) -> None:
        """Bob: Alice holds every assignment up to ``serial``; erase their material."""
        with transaction(self._db):
            rows = self._db.execute(
                "SELECT past FROM delivery_assignments WHERE state = 'offered' AND serial <= ? "
                "ORDER BY serial",
                (serial,),
            ).fetchall()
            if not rows:
                return
            self._db.execute(
                "UPDATE delivery_assignments SET state = 'final' WHERE state = 'offered' AND serial <= ?",
                (serial,),
            )
            self._erase_upto(_parse(rows[-1][0]))

    def rollback(self, applied: int) -> list[int]:
        """Bob: drop the assignments Alice never applied (serial above ``applied``); their material
        returns to the pool. Returns the serials dropped."""
        with transaction(self._db):
            if applied > self.serial:
                raise Diverged(f"the peer applied assignment {applied}; this site allocated {self.serial}")
            rows = self._db.execute(
                "SELECT serial, state, start FROM delivery_assignments WHERE serial > ? ORDER BY serial",
                (applied,),
            ).fetchall()
            if any(state != "offered" for _, state, _ in rows):
                raise Diverged("a final assignment is missing at the peer")
            if rows:
                self._db.execute("DELETE FROM delivery_keys WHERE serial > ?", (applied,))
                self._db.execute("DELETE FROM delivery_assignments WHERE serial > ?", (applied,))
                set_meta(self._db, "delivery_head", rows[0][2])
                set_meta(self._db, "delivery_serial", str(applied))
        self.finalize(applied)
        return [int(r[0]) for r in rows]

    def is_final(self, serial: int) -> bool:
        row = self._db.execute(
            "SELECT state FROM delivery_assignments WHERE serial = ?", (serial,)
        ).fetchone()
        return row is not None and row[0] == "final"

    # -- dec_keys

    def take(
        self, key_ids: Sequence[str], caller: str, master: str, confirmed: int = 0
    ) -> tuple[list[bytes], list[int]]:
        """Hand the keys ``key_ids`` to slave ``caller`` (of ``master``), all or none; assignments up to
        serial ``confirmed`` count as final (Alice acknowledged them; the disk may lag).

        Returns the keys, or ([], serials) when some key's assignment is not final yet (the caller waits
        for Alice's acknowledgement and asks again). Raises :class:`UnknownKey` or :class:`NotAuthorized`.
        """
        with transaction(self._db):
            rows = []
            for key_id in key_ids:
                row = self._db.execute(
                    "SELECT k.serial, k.master, k.waiting, k.key, a.state, a.slaves, a.origin "
                    "FROM delivery_keys k JOIN delivery_assignments a ON a.serial = k.serial "
                    "WHERE k.key_id = ?",
                    (key_id,),
                ).fetchone()
                if row is None:
                    raise UnknownKey(f"unknown key_ID {key_id}")
                serial, owner, waiting, key, state, slaves, origin = row
                waiting = json.loads(waiting)
                if owner != master or origin == self.role or caller not in json.loads(slaves):
                    raise NotAuthorized(f"key_ID {key_id} is not for {caller} as a slave of {master}")
                if caller not in waiting:
                    raise UnknownKey(f"key_ID {key_id} was already delivered to {caller}")
                rows.append((key_id, int(serial), waiting, bytes(key), state))
            unconfirmed = sorted(
                {serial for _, serial, _, _, state in rows if state != "final" and serial > confirmed}
            )
            if unconfirmed:
                return [], unconfirmed
            for key_id, _, waiting, _, _ in rows:
                waiting.remove(caller)
                self._db.execute(
                    "UPDATE delivery_keys SET waiting = ?, key = CASE WHEN ? THEN key END WHERE key_id = ?",
                    (json.dumps(waiting), bool(waiting), key_id),
                )
        return [key for _, _, _, key, _ in rows], []

    # -- internals

    def _cut(self, start: Pointer, nbytes: int) -> tuple[bytes, Pointer]:
        """The ``nbytes`` pool bytes from ``start`` and the pointer past them; reads, changes nothing."""
        r, b, o = start
        parts: list[bytes] = []
        need = nbytes
        past = start
        cursor = self._db.execute(
            "SELECT k.round, k.idx, k.key FROM keys k JOIN rounds r ON r.round = k.round "
            "WHERE r.state = 'committed' AND (k.round, k.idx) >= (?, ?) ORDER BY k.round, k.idx",
            (r, b),
        )
        for round_number, index, block in cursor:
            if need == 0:
                break
            first = o if (round_number, index) == (r, b) else 0
            piece = bytes(block[first : first + need])
            parts.append(piece)
            need -= len(piece)
            past = (int(round_number), int(index), first + len(piece))
        cursor.close()
        if need:
            raise Unavailable(f"{nbytes * 8} bits asked, {(nbytes - need) * 8} available")
        return b"".join(parts), past

    def _record(self, assignment: Assignment, past: Pointer, material: bytes, state: str) -> list[bytes]:
        size = assignment.size // 8
        keys = [material[i * size : (i + 1) * size] for i in range(assignment.number)]
        master_site = assignment.origin == self.role
        self._db.execute(
            "INSERT INTO delivery_assignments (serial, state, origin, start, past, number, size, master, "
            "slaves) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                assignment.serial,
                state,
                assignment.origin,
                _format(assignment.start),
                _format(past),
                assignment.number,
                assignment.size,
                assignment.master,
                json.dumps(list(assignment.slaves)),
            ),
        )
        waiting = json.dumps([] if master_site else sorted(set(assignment.slaves)))
        try:
            self._db.executemany(
                "INSERT INTO delivery_keys (key_id, serial, master, waiting, key) VALUES (?, ?, ?, ?, ?)",
                [
                    (key_id, assignment.serial, assignment.master, waiting, None if master_site else key)
                    for key_id, key in zip(assignment.key_ids, keys, strict=True)
                ],
            )
        except sqlite3.IntegrityError:
            raise Diverged(f"assignment {assignment.serial} repeats a key ID") from None
        set_meta(self._db, "delivery_head", _format(past))
        set_meta(self._db, "delivery_serial", str(assignment.serial))
        return keys

    def _erase_upto(self, pointer: Pointer) -> None:
        """Erase the pool before ``pointer``: whole blocks are deleted, a partly used one is overwritten
        with zeros up to the pointer (``secure_delete`` zeroes freed database pages too)."""
        r, b, o = pointer
        self._db.execute("DELETE FROM keys WHERE (round, idx) < (?, ?)", (r, b))
        row = self._db.execute("SELECT key FROM keys WHERE round = ? AND idx = ?", (r, b)).fetchone()
        if row is not None and o:
            block = bytes(row[0])
            if o >= len(block):
                self._db.execute("DELETE FROM keys WHERE round = ? AND idx = ?", (r, b))
            else:
                self._db.execute(
                    "UPDATE keys SET key = ? WHERE round = ? AND idx = ?", (bytes(o) + block[o:], r, b)
                )
        set_meta(self._db, "delivery_erased", _format(pointer))


def _format(pointer: Pointer) -> str:
    return " ".join(str(v) for v in pointer)


def _parse(text: str) -> Pointer:
    r, b, o = (int(v) for v in text.split())
    return (r, b, o)
