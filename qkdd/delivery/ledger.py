"""Key material for applications: the pool, the two sites' logs, leases, the keys waiting for their SAEs
(§19).

Theory of operation
-------------------
* **The pool** is the key material of the committed rounds: the key blocks of the ``keys`` table in
  (round, block) order, read as one byte string. A *pointer* (round, block, byte) is a position in it.
* **Bob owns the pool; Alice holds leases.** Bob cuts from the *head* of his pool, in order, for two
  things only: the keys of his own masters, and *leases* (grants) of a range to Alice. Alice's masters
  get their keys cut, in order, from her leases, which nobody else touches. So each site allocates on
  its own, with one local transaction, and no byte can go to both: every range has one owner.
* **Two logs.** Each site numbers what it writes — Bob: his assignments and grants; Alice: her
  assignments — with serials of its own log, and the other site *applies* every entry of that log in
  serial order, checking that it starts where its own copy of the stream (Bob's head, or Alice's lease
  cursor) says. Applying cuts the same bytes from the same place, so both sites' pools stay the same.
  Meta values hold each log's last serial at this site (its own: written; the peer's: applied), Bob's
  head and Alice's remaining leased ranges.
* **Erasure** follows the cut at once: whole blocks are deleted, a partly used block has its used bytes
  overwritten with zeros. Within a block, bytes are always used front to back (a grant ends at the end of
  a block), so a cut that reaches a block's end deletes it.
* **Keys** (``delivery_keys``): one row per key ID. At the master's site the key is handed to the master
  by enc_keys and the row keeps no key bytes; at the other site the row holds the bytes and the list of
  slave SAEs still to receive them; each named slave gets them once by dec_keys, and the bytes are
  erased when the last one has. A key is never handed out at a site twice, nor to an SAE not named.
* **Key IDs** are UUIDs of version 8 (RFC 9562 §5.8) that carry the writing site and its serial, so a
  site asked for a key of an entry it has not applied yet knows to wait for it (:func:`key_origin`).

Every method runs in one SQLite transaction (the key store's database, ``synchronous=FULL`` and
``secure_delete``), so a crash leaves either all of a step or none of it. Applying a peer's entry alone
commits without waiting for the disk: should the machine fail before the next durable commit, the entry
is lost here and the peer sends it again, since this site then reports a lower ``applied``; nothing of
it can have been handed out meanwhile, because a hand-out is a durable commit and writes it first.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass

from qkdd.database import get_meta, set_meta, transaction
from qkdd.errors import InputError, QkddError

SCHEMA = """
CREATE TABLE IF NOT EXISTS delivery_log (
    origin TEXT NOT NULL CHECK (origin IN ('alice', 'bob')),
    serial INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('keys', 'lease')),
    start TEXT NOT NULL, past TEXT NOT NULL,
    number INTEGER NOT NULL, size INTEGER NOT NULL,
    master TEXT NOT NULL, slaves TEXT NOT NULL,
    PRIMARY KEY (origin, serial)
);
CREATE TABLE IF NOT EXISTS delivery_keys (
    key_id TEXT PRIMARY KEY,
    origin TEXT NOT NULL,
    serial INTEGER NOT NULL,
    master TEXT NOT NULL,
    slaves TEXT NOT NULL,
    waiting TEXT NOT NULL,
    key BLOB,
    FOREIGN KEY (origin, serial) REFERENCES delivery_log (origin, serial)
);
"""

Pointer = tuple[int, int, int]
"""A position in the pool: (round, block index, byte within the block)."""
Lease = tuple[Pointer, Pointer, int]
"""What is left of one of Alice's leases: [start, past) and the number of pool bytes in it."""

START: Pointer = (0, 0, 0)
ROLES = ("alice", "bob")
_MAX_SERIAL = (1 << 48) - 1
_MAX_KEYS = 1 << 16  # keys in one entry: the 16-bit index of a key ID


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
    """The peer's log entry does not fit this site's pool: a store was restored or tampered with."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """``number`` keys of ``size`` bits cut in order from ``origin``'s stream starting at ``start``."""

    origin: str  # the site whose master asked, and whose log holds this entry
    serial: int
    start: Pointer
    number: int
    size: int  # bits per key
    key_ids: tuple[str, ...]
    master: str
    slaves: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return self.number * self.size // 8


@dataclass(frozen=True, slots=True)
class Grant:
    """Bob leases the pool range [start, past) to Alice's masters (an entry of Bob's log)."""

    serial: int
    start: Pointer
    past: Pointer
    origin: str = "bob"


Entry = Assignment | Grant


def make_key_id(origin: str, serial: int, index: int) -> str:
    """A key ID: UUID version 8 whose 48 high bits are the serial, then the version, one bit for the
    origin (1: Bob) and 11 random bits, the variant, 46 random bits and the key's 16-bit index."""
    value = (
        serial << 80
        | 8 << 76
        | (origin == "bob") << 75
        | secrets.randbits(11) << 64
        | 0b10 << 62
        | secrets.randbits(46) << 16
        | index
    )
    return str(uuid.UUID(int=value))


def key_origin(key_id: str) -> tuple[str, int] | None:
    """(origin, serial) of a key ID made by :func:`make_key_id`, or ``None`` for any other UUID."""
    try:
        value = uuid.UUID(key_id)
    except ValueError:
        return None
    if value.version != 8 or value.variant != uuid.RFC_4122:
        return None
    return ("bob" if value.int >> 75 & 1 else "alice"), value.int >> 80


class KeyLedger:
    """The delivery view of one key store's database, for ``role``."""

    def __init__(self, db: sqlite3.Connection, role: str) -> None:
        self._db = db
        self.role = role
        self.peer = "bob" if role == "alice" else "alice"
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'delivery_assignments'").fetchone():
            raise InputError(
                "this state directory holds key-delivery records of the keys/1 channel, which this version "
                "replaced (keys/2); deliver or drop those keys with the older qkdd, or start a fresh store"
            )
        db.executescript(SCHEMA)

    # -- meta values

    @property
    def head(self) -> Pointer:
        """Bob's head: the first pool byte nothing has taken (at Alice: as far as she applied Bob's log)."""
        text = get_meta(self._db, "delivery_head")
        return START if text is None else _parse(text)

    def serial(self, origin: str) -> int:
        """The last serial of ``origin``'s log at this site: written (own log) or applied (the peer's)."""
        return int(get_meta(self._db, f"delivery_serial_{origin}") or 0)

    def lease(self) -> list[Lease]:
        """Alice's leased ranges not yet used, oldest first; the first one starts at her cursor."""
        text = get_meta(self._db, "delivery_lease")
        return [(_parse(a), _parse(b), int(n)) for a, b, n in json.loads(text or "[]")]

    def _set_lease(self, ranges: Sequence[Lease]) -> None:
        set_meta(self._db, "delivery_lease", json.dumps([[_format(a), _format(b), n] for a, b, n in ranges]))

    # -- counts

    def available_bytes(self) -> int:
        """Pool bytes from Bob's head on (committed rounds only): what Bob can still cut. O(1): the
        bytes of every round committed here minus the bytes the head has passed (:func:`count_committed`)."""
        return int(get_meta(self._db, POOL_BYTES) or 0) - int(get_meta(self._db, CUT_BYTES) or 0)

    def lease_bytes(self) -> int:
        """Bytes of Alice's leases not yet used."""
        return sum(n for _, _, n in self.lease())

    def assignments(self) -> int:
        """Assignments of both sites' logs held here."""
        return int(self._db.execute("SELECT COUNT(*) FROM delivery_log WHERE kind = 'keys'").fetchone()[0])

    def waiting_keys(self) -> int:
        """Keys at this site that some named slave has not fetched yet."""
        return int(self._db.execute("SELECT COUNT(*) FROM delivery_keys WHERE key IS NOT NULL").fetchone()[0])

    # -- writing this site's log

    def allocate(
        self, number: int, size: int, master: str, slaves: Sequence[str], extra: int = 0
    ) -> tuple[Assignment, list[bytes]]:
        """``number`` keys of ``size`` bits for ``master`` (of this site) and ``slaves``, cut from Bob's
        head (at Bob) or Alice's leases (at Alice): the new entry of this site's log and the keys.
        Raises :class:`Unavailable` if the stream is short (nothing is taken).

        ``extra``: up to that many keys more, for the same SAEs, as far as the stream has spare material —
        at Bob at most a quarter of what his pool holds beyond the request, so other masters keep theirs;
        at Alice all of her leases (they serve only her masters)."""
        with transaction(self._db):
            serial = self.serial(self.role) + 1
            start = self._position(self.role)
            if start is None:
                raise Unavailable("no leased key material left")
            if extra:
                need = number * size // 8
                if self.role == "alice":
                    spare = self.lease_bytes() - need
                else:
                    spare = (self.available_bytes() - need) // 4
                number += max(0, min(extra, spare // (size // 8), _MAX_KEYS - number))
            assignment = Assignment(
                self.role,
                serial,
                start,
                number,
                size,
                tuple(make_key_id(self.role, serial, i) for i in range(number)),
                master,
                tuple(slaves),
            )
            keys = self._assign(assignment)
        return assignment, keys

    def grant(self, need: int, want: int) -> Grant:
        """Bob: lease Alice ``need`` bytes from the head, or more — up to ``want`` but never beyond half
        of what is available, so Bob's own masters keep their share — rounded up to the end of the block
        where the lease ends. Raises :class:`Unavailable` if fewer than ``need`` are available."""
        if self.role != "bob":
            raise AssertionError("only Bob grants leases")
        with transaction(self._db):
            start = self.head
            available = self.available_bytes()
            if available < need or need < 1:
                raise Unavailable(f"{need * 8} bits asked for a lease, {available * 8} available")
            past, span = self._lease_end(start, max(need, min(want, available // 2)))
            entry = Grant(self.serial("bob") + 1, start, past)
            self._write(entry, span=span)
        return entry

    def entries_after(self, serial: int) -> list[Entry]:
        """This site's log entries above ``serial``, in order (to send again to a peer that lacks them)."""
        rows = self._db.execute(
            "SELECT serial, kind, start, past, number, size, master, slaves FROM delivery_log "
            "WHERE origin = ? AND serial > ? ORDER BY serial",
            (self.role, serial),
        ).fetchall()
        entries: list[Entry] = []
        for number, kind, start, past, count, size, master, slaves in rows:
            if kind == "lease":
                entries.append(Grant(int(number), _parse(start), _parse(past)))
                continue
            ids = [
                row[0]
                for row in self._db.execute(
                    "SELECT key_id FROM delivery_keys WHERE origin = ? AND serial = ?", (self.role, number)
                )
            ]
            ids.sort(key=lambda text: uuid.UUID(text).int & 0xFFFF)
            entries.append(
                Assignment(
                    self.role,
                    int(number),
                    _parse(start),
                    int(count),
                    int(size),
                    tuple(ids),
                    master,
                    tuple(json.loads(slaves)),
                )
            )
        return entries

    # -- applying the peer's log

    def apply(self, entry: Entry) -> list[bytes]:
        """The peer's next log entry: cut the same bytes from the same place. Returns the keys (none for
        a grant). Raises :class:`Diverged` if it does not fit (nothing is taken)."""
        if entry.origin != self.peer or (isinstance(entry, Grant) and self.role != "alice"):
            raise Diverged(f"a log entry of {entry.origin} cannot be applied at {self.role}'s site")
        # not durable at once (no fsync): an entry lost with the machine is sent again (keys_hello), and
        # the next durable commit here — any allocation, grant or hand-out — writes it first (WAL order)
        with transaction(self._db, durable=False):
            expected = self.serial(entry.origin) + 1
            if entry.serial != expected:
                raise Diverged(f"{entry.origin}'s entry {entry.serial} arrived; expected {expected}")
            position = self._position(entry.origin)
            if entry.start != position:
                raise Diverged(
                    f"{entry.origin}'s entry {entry.serial} starts at {entry.start}, not {position}"
                )
            if isinstance(entry, Grant):
                span = self._span(entry.start, entry.past) if entry.past > entry.start else 0
                if (
                    span < 1
                    or self.available_bytes() < span
                    or self._lease_end(entry.start, span)[0] != entry.past
                ):
                    raise Diverged(f"Bob's lease {entry.serial} up to {entry.past} does not fit this pool")
                self._write(entry, span=span)
                return []
            try:
                return self._assign(entry)
            except Unavailable:
                raise Diverged(
                    f"{entry.origin}'s entry {entry.serial} names key material this site lacks"
                ) from None

    # -- dec_keys

    def take(self, key_ids: Sequence[str], caller: str, master: str) -> list[bytes]:
        """Hand the keys ``key_ids`` to slave ``caller`` (of ``master``), all or none.
        Raises :class:`UnknownKey` or :class:`NotAuthorized`."""
        [taken] = self.take_many([(key_ids, caller, master)])
        if isinstance(taken, DeliveryError):
            raise taken
        return taken

    def take_many(
        self, requests: Sequence[tuple[Sequence[str], str, str]]
    ) -> list[list[bytes] | DeliveryError]:
        """Several slaves' :meth:`take` (key IDs, caller, master) in one durable transaction — a group
        commit: one wait for the disk however many requests — each all or none: what a request cannot
        have is its error, and it changed nothing. The next request sees what the earlier ones took."""
        results: list[list[bytes] | DeliveryError] = []
        with transaction(self._db):
            for key_ids, caller, master in requests:
                try:
                    results.append(self._take(key_ids, caller, master))
                except DeliveryError as error:
                    results.append(error)
        return results

    def _take(self, key_ids: Sequence[str], caller: str, master: str) -> list[bytes]:
        """:meth:`take` inside a transaction: every check passes before anything is written."""
        rows = []
        for key_id in key_ids:
            row = self._db.execute(
                "SELECT master, slaves, waiting, key, origin FROM delivery_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
            if row is None:
                raise UnknownKey(f"unknown key_ID {key_id}")
            owner, slaves, waiting, key, origin = row
            if owner != master or origin == self.role or caller not in json.loads(slaves):
                raise NotAuthorized(f"key_ID {key_id} is not for {caller} as a slave of {master}")
            waiting = json.loads(waiting)
            if caller not in waiting:
                raise UnknownKey(f"key_ID {key_id} was already delivered to {caller}")
            waiting.remove(caller)
            rows.append((key_id, waiting, bytes(key)))
        for key_id, waiting, _ in rows:
            self._db.execute(
                "UPDATE delivery_keys SET waiting = ?, key = CASE WHEN ? THEN key END WHERE key_id = ?",
                (json.dumps(waiting), bool(waiting), key_id),
            )
        return [key for _, _, key in rows]

    # -- internals

    def _position(self, origin: str) -> Pointer | None:
        """Where the next cut of ``origin``'s stream starts: Bob's head, or Alice's lease cursor."""
        if origin == "bob":
            return self.head
        ranges = self.lease()
        return ranges[0][0] if ranges else None

    def _assign(self, assignment: Assignment) -> list[bytes]:
        """Cut, record and erase one assignment (inside a transaction); returns its keys."""
        nbytes = assignment.nbytes
        if assignment.origin == "bob":
            material, past = self._read(self.head, nbytes)
            if len(material) < nbytes:
                raise Unavailable(f"{nbytes * 8} bits asked, {len(material) * 8} available")
            used = [(self.head, past)]
            self._advance_head(past, nbytes)
        else:
            ranges = self.lease()
            material, used = b"", []
            while ranges and len(material) < nbytes:
                start, end, left = ranges[0]
                piece, past = self._read(start, nbytes - len(material), end)
                material += piece
                used.append((start, past))
                if len(piece) >= left:
                    ranges.pop(0)
                else:
                    ranges[0] = (past, end, left - len(piece))
            if len(material) < nbytes:
                raise Unavailable(f"{nbytes * 8} bits asked, {len(material) * 8} leased")
            self._set_lease(ranges)
        self._write(assignment, used[-1][1], material)
        for start, past in used:
            self._erase(start, past)
        size = assignment.size // 8
        return [material[i * size : (i + 1) * size] for i in range(assignment.number)]

    def _write(self, entry: Entry, past: Pointer | None = None, material: bytes = b"", span: int = 0) -> None:
        """The log row of ``entry`` (and its key rows, or for a grant of ``span`` bytes the lease), and its
        origin's serial."""
        if entry.serial > _MAX_SERIAL:
            raise Diverged(f"serial {entry.serial} is beyond the 48 bits of a key ID")
        row: tuple[str, Pointer, Pointer, int, int, str, list[str]]
        if isinstance(entry, Grant):
            row = ("lease", entry.start, entry.past, 0, 0, "", [])
            self._set_lease([*self.lease(), (entry.start, entry.past, span)])
            self._advance_head(entry.past, span)
        else:
            assert past is not None
            row = ("keys", entry.start, past, entry.number, entry.size, entry.master, list(entry.slaves))
        kind, start, end, number, size, master, slaves = row
        self._db.execute(
            "INSERT INTO delivery_log (origin, serial, kind, start, past, number, size, master, slaves) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.origin,
                entry.serial,
                kind,
                _format(start),
                _format(end),
                number,
                size,
                master,
                json.dumps(slaves),
            ),
        )
        set_meta(self._db, f"delivery_serial_{entry.origin}", str(entry.serial))
        if isinstance(entry, Grant):
            return
        key_bytes = entry.size // 8
        master_site = entry.origin == self.role
        slaves_text = json.dumps(sorted(set(entry.slaves)))
        waiting = "[]" if master_site else slaves_text
        try:
            self._db.executemany(
                "INSERT INTO delivery_keys (key_id, origin, serial, master, slaves, waiting, key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        key_id,
                        entry.origin,
                        entry.serial,
                        entry.master,
                        slaves_text,
                        waiting,
                        None if master_site else material[i * key_bytes : (i + 1) * key_bytes],
                    )
                    for i, key_id in enumerate(entry.key_ids)
                ],
            )
        except sqlite3.IntegrityError:
            raise Diverged(f"{entry.origin}'s entry {entry.serial} repeats a key ID") from None

    def _advance_head(self, past: Pointer, nbytes: int) -> None:
        set_meta(self._db, "delivery_head", _format(past))
        set_meta(self._db, CUT_BYTES, str(int(get_meta(self._db, CUT_BYTES) or 0) + nbytes))

    def _block(self, round_number: int, index: int) -> bytes | None:
        row = self._db.execute(
            "SELECT k.key FROM keys k JOIN rounds r ON r.round = k.round "
            "WHERE r.state = 'committed' AND k.round = ? AND k.idx = ?",
            (round_number, index),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def _blocks(
        self, start: Pointer, end: Pointer | None = None
    ) -> Generator[tuple[int, int, bytes, int, int], None, None]:
        """The committed blocks from the one of ``start`` (to the one of ``end``), in pool order, each as
        (round, index, block, first, last): the bytes [first, last) of the block lie in [start, end)."""
        r, b, _ = start
        if end is None:
            cursor = self._db.execute(
                "SELECT k.round, k.idx, k.key FROM keys k JOIN rounds r ON r.round = k.round "
                "WHERE r.state = 'committed' AND (k.round, k.idx) >= (?, ?) ORDER BY k.round, k.idx",
                (r, b),
            )
        else:
            cursor = self._db.execute(
                "SELECT k.round, k.idx, k.key FROM keys k JOIN rounds r ON r.round = k.round "
                "WHERE r.state = 'committed' AND (k.round, k.idx) BETWEEN (?, ?) AND (?, ?) "
                "ORDER BY k.round, k.idx",
                (r, b, end[0], end[1]),
            )
        try:
            for round_number, index, block in cursor:
                first = start[2] if (round_number, index) == start[:2] else 0
                last = end[2] if end is not None and (round_number, index) == end[:2] else len(block)
                yield int(round_number), int(index), block, first, last
        finally:
            cursor.close()

    def _read(self, start: Pointer, nbytes: int, end: Pointer | None = None) -> tuple[bytes, Pointer]:
        """Up to ``nbytes`` pool bytes from ``start`` (not past ``end``) and the pointer past them."""
        parts: list[bytes] = []
        need = nbytes
        past = start
        with contextlib.closing(self._blocks(start, end)) as blocks:
            for round_number, index, block, first, last in blocks:
                if need == 0:
                    break
                piece = bytes(block[first : min(last, first + need)])
                parts.append(piece)
                need -= len(piece)
                past = (round_number, index, first + len(piece))
        return b"".join(parts), past

    def _span(self, start: Pointer, past: Pointer) -> int:
        """The number of pool bytes in [start, past)."""
        return sum(max(0, last - first) for _, _, _, first, last in self._blocks(start, past))

    def _lease_end(self, start: Pointer, nbytes: int) -> tuple[Pointer, int]:
        """The end of a lease of ``nbytes`` from ``start`` — the end of the block holding its last byte —
        and the number of pool bytes the lease then holds."""
        material, past = self._read(start, nbytes)
        block = self._block(past[0], past[1])
        if block is None:
            return past, len(material)
        return (past[0], past[1], len(block)), len(material) + len(block) - past[2]

    def _erase(self, start: Pointer, past: Pointer) -> None:
        """Erase [start, past): a block used up to its end is deleted (its front went before it), one used
        partly has the used bytes overwritten with zeros (``secure_delete`` zeroes freed pages too)."""
        for round_number, index, block, first, last in list(self._blocks(start, past)):
            if last <= first:
                continue
            if last >= len(block):
                self._db.execute("DELETE FROM keys WHERE round = ? AND idx = ?", (round_number, index))
            else:
                zeroed = bytes(block[:first]) + bytes(last - first) + bytes(block[last:])
                self._db.execute(
                    "UPDATE keys SET key = ? WHERE round = ? AND idx = ?", (zeroed, round_number, index)
                )


POOL_BYTES = "pool_bytes"
"""Meta: the key bytes of every round committed in this store since the counters started."""
CUT_BYTES = "delivery_cut_bytes"
"""Meta: the pool bytes Bob's head has passed since the counters started."""


def count_committed(db: sqlite3.Connection, round_number: int) -> None:
    """Add a round's key bytes to the pool count; the key store calls this inside the transaction that
    commits the round (rounds commit in order, after everything the head has passed)."""
    added = db.execute(
        "SELECT COALESCE(SUM(LENGTH(key)), 0) FROM keys WHERE round = ?", (round_number,)
    ).fetchone()[0]
    set_meta(db, POOL_BYTES, str(int(get_meta(db, POOL_BYTES) or 0) + int(added)))


def start_counters(db: sqlite3.Connection) -> None:
    """Start the pool counters of a store that has none yet (a new one, or one written by an older
    qkdd), from a count of its blocks."""
    if get_meta(db, POOL_BYTES) is not None:
        return
    with transaction(db):
        set_meta(db, POOL_BYTES, str(scan_available(db)))
        set_meta(db, CUT_BYTES, "0")


def scan_available(db: sqlite3.Connection) -> int:
    """Pool bytes from Bob's head on, counted block by block (O(blocks)): what the counters follow."""
    text = get_meta(db, "delivery_head")
    r, b, o = START if text is None else _parse(text)
    total, first = db.execute(
        "SELECT COALESCE(SUM(LENGTH(k.key)), 0), "
        "COALESCE(SUM(CASE WHEN k.round = ? AND k.idx = ? THEN LENGTH(k.key) END), 0) "
        "FROM keys k JOIN rounds r ON r.round = k.round "
        "WHERE r.state = 'committed' AND (k.round, k.idx) >= (?, ?)",
        (r, b, r, b),
    ).fetchone()
    return int(total) - min(o, int(first))


def _format(pointer: Pointer) -> str:
    return " ".join(str(v) for v in pointer)


def _parse(text: str) -> Pointer:
    r, b, o = (int(v) for v in text.split())
    return (r, b, o)
