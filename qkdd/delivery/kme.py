"""The Key Management Entity of one site: ETSI GS QKD 014 semantics over the key channel (§19).

Theory of operation
-------------------
* :class:`KeyManager` serves the three calls of the API — status, enc_keys (a master SAE asks for new
  keys for one or more slave SAEs of the peer site) and dec_keys (a slave SAE fetches the keys its master
  got) — and speaks the key channel with the peer daemon. It knows nothing of HTTP or TLS.
* enc_keys allocates at this site, in one local transaction (:class:`~qkdd.delivery.ledger.KeyLedger`):
  at **Bob** from the head of the pool, at **Alice** from the range Bob leased her. It sends the new log
  entry (``key_notice``) to the peer, then answers the master without waiting: the peer applies
  notices in order, so by the time the slave asks there, the notice has arrived — or is a few
  microseconds from it, and dec_keys waits for it (the key ID says which entry it needs).
* **Batches**: when a master asks again for keys of the same size for the same slaves, enc_keys
  allocates ahead — the request's keys and up to ``batch_size`` bits more, doubling from one allocation
  to the next — and the extra keys wait in memory for that master's next requests, which then need no
  transaction and no notice. Keys waiting when the daemon stops are never handed out (their material is
  already erased; the peer's copies wait for IDs no slave will learn).
* dec_keys hands keys out in **group commits**: the requests that arrive while one hand-out waits for
  the disk share the next transaction, each still all or none, and none is answered before its
  hand-out is durable (so a crash never lets a key out twice).
* Alice asks Bob for a lease (``key_lease``) when hers is short, before allocating, and ahead of need in
  the background once it falls below half of ``lease_size``; Bob answers ``key_grant`` (an entry of his
  log) or ``key_refuse``. A lease request belongs to its connection: the connection's end answers it
  (503), and a request that waited through a reconnection asks again on the new one, never on the old.
* No key channel (the peer is down or does not offer it) → 503 at once, nothing consumed. No lease within
  the channel's answer timeout → 503. A notice that could not be sent (the connection broke) goes again
  with every entry the peer lacks when the next connection opens (``keys_hello`` carries what each side
  applied), so the slave's site gets every entry exactly once, in order.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from qkdd import spec, wire
from qkdd.config import Etsi014
from qkdd.delivery.channel import ANSWER_TIMEOUT, KeyChannel
from qkdd.delivery.ledger import (
    Assignment,
    DeliveryError,
    Diverged,
    Entry,
    Grant,
    KeyLedger,
    Unavailable,
    UnknownKey,
    key_origin,
)
from qkdd.errors import RemoteProtocolError

log = logging.getLogger("qkdd")
T = TypeVar("T")
StoreCall = Callable[..., Awaitable[Any]]
Send = Callable[[bytes], Awaitable[None]]


MAX_BATCHES = 1024  # (master, slaves, size) triples remembered for batches (those with keys waiting stay)
MAX_LEASE_BYTES = int(next(f.max for f in spec.load().messages["key_lease"].fields if f.name == "need"))


UNREACHABLE = "the peer KME became unreachable before it answered"
"""Why a lease request gets 503 when its connection ends before the answer."""


class BadRequest(DeliveryError):
    status = 400


@dataclass
class _Waiter:
    """One answer a request waits for."""

    event: trio.Event = field(default_factory=trio.Event)
    error: DeliveryError | None = None

    def resolve(self, error: DeliveryError | None = None) -> None:
        self.error = error
        self.event.set()


@dataclass
class _Take:
    """One dec_keys hand-out waiting for its group's transaction."""

    key_ids: list[str]
    caller: str
    master: str
    done: trio.Event = field(default_factory=trio.Event)
    result: list[bytes] | Exception | None = None  # the keys, or why not (a refusal, a failing store)
    abandoned: bool = False  # its request was cancelled (a stop): no answer could carry the keys


@dataclass
class _Batch:
    """Keys allocated ahead for one (master, slaves, size), handed out by that master's next requests."""

    keys: collections.deque[tuple[str, bytes]] = field(default_factory=collections.deque)
    ahead: int = 0  # keys the next allocation for these SAEs takes beyond the request


@dataclass
class _Link:
    """The key channel of the connection that is up."""

    channel: KeyChannel
    send: Send
    open: trio.Event = field(default_factory=trio.Event)
    peer_kme_id: str = ""
    peer_saes: frozenset[str] = frozenset()
    # Alice: the lease request in flight on this connection and its number. It belongs to the connection:
    # its answer can only come on it, and its end answers it (503), so no later one inherits a stale wait
    lease: _Waiter | None = None
    lease_request: int = 0

    async def notify(self, entry: Entry, request: int = 0) -> None:
        """Send one log entry; a broken connection is no error (the next connection sends it again)."""
        start = {
            "serial": entry.serial,
            "round": entry.start[0],
            "block": entry.start[1],
            "byte": entry.start[2],
        }
        if isinstance(entry, Grant):
            frame = self.channel.encode(
                "key_grant",
                request=request,
                **start,
                past_round=entry.past[0],
                past_block=entry.past[1],
                past_byte=entry.past[2],
            )
        else:
            frame = self.channel.encode(
                "key_notice",
                **start,
                number=entry.number,
                size=entry.size,
                key_ids=b"".join(uuid.UUID(k).bytes for k in entry.key_ids),
                master=entry.master,
                slaves=list(entry.slaves),
            )
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send(frame)


class KeyManager:
    """The KME of this site (``role``), over the key store's ledger and a store-call runner."""

    def __init__(self, role: str, settings: Etsi014, ledger: KeyLedger, store_call: StoreCall) -> None:
        self.role = role
        self.peer = "bob" if role == "alice" else "alice"
        self.settings = settings
        self.ledger = ledger
        self._store_call = store_call
        self._link: _Link | None = None
        self._writing = trio.Lock()  # this site's log entries are written and sent in serial order
        self._next_request = 1  # Alice: the number of her next lease request
        self._refill = trio.Event()  # Alice: set when the lease fell below half
        # this site's new log entries, in serial order, for run() to send
        self._outbox_in, self._outbox_out = trio.open_memory_channel[tuple[_Link, Entry, int]](1024)
        self._applied = trio.Event()  # set (and replaced) whenever a peer's entry is applied
        self.peer_serial = 0  # the last entry of the peer's log applied here
        self._leased = 0  # Alice: bytes left in her leases (as of her last allocation or grant)
        self.local_saes = frozenset(s.id for s in settings.saes)
        # keys of this site's entries allocated ahead for their master, in memory only (§19: batches)
        self._batches: dict[tuple[str, tuple[str, ...], int], _Batch] = {}
        self.batched_bytes = 0  # the bytes of every key waiting in a batch
        self._takes: list[_Take] = []  # dec_keys hand-outs for the next group commit
        self._taking = False  # a request is running group commits

    # -- the key channel

    async def attach(self, channel: KeyChannel, send: Send) -> None:
        """A connection is up and both sides offer the key channel: open it."""
        self.detach()
        self._link = _Link(channel, send)
        own, applied, self._leased = await self._store_call(
            lambda: (self.ledger.serial(self.role), self.ledger.serial(self.peer), self.ledger.lease_bytes())
        )
        self.peer_serial = applied
        await send(
            channel.encode(
                "keys_hello",
                kme_id=self.settings.kme_id,
                saes=sorted(self.local_saes),
                serial=own,
                applied=applied,
            )
        )

    def detach(self, channel: KeyChannel | None = None) -> None:
        """The connection of ``channel`` (any, if ``None``) ended: what waits for the peer gets 503."""
        if self._link is None or (channel is not None and self._link.channel is not channel):
            return
        link, self._link = self._link, None
        if link.lease is not None:
            link.lease.resolve(Unavailable(UNREACHABLE))
            link.lease = None
        self._wake_readers()

    async def receive(self, message: wire.Message) -> None:
        """One checked key-channel message from the peer (in order)."""
        link = self._link
        if link is None:
            raise RemoteProtocolError("a key-channel message outside an open key channel", code="bad-state")
        if message.type == "keys_hello":
            if link.open.is_set():
                raise RemoteProtocolError("a second keys_hello", code="bad-state")
            await self._on_keys_hello(link, message)
            return
        if not link.open.is_set():
            raise RemoteProtocolError(f"{message.type} before keys_hello", code="bad-state")
        try:
            await getattr(self, f"_on_{message.type}")(link, message)
        except Diverged as error:
            log.critical("key delivery: %s; the two key stores disagree", error)
            raise RemoteProtocolError(f"key ledgers diverge: {error}", code="bad-message") from None

    async def _on_keys_hello(self, link: _Link, message: wire.Message) -> None:
        own = await self._store_call(self.ledger.serial, self.role)
        if message["applied"] > own or message["serial"] < self.peer_serial:
            raise RemoteProtocolError(
                f"the peer holds {self.role}'s log up to {message['applied']} and its own up to "
                f"{message['serial']}; this site wrote {own} and applied {self.peer_serial}",
                code="stale-state",
            )
        async with self._writing:
            missing = await self._store_call(self.ledger.entries_after, message["applied"])
            for entry in missing:
                await link.notify(entry)
            link.peer_kme_id = message["kme_id"]
            link.peer_saes = frozenset(message["saes"])
            link.open.set()
        if missing:
            log.info("key delivery: sent %d log entries again that the peer lacked", len(missing))
        log.info("key delivery: key channel open with KME %s", link.peer_kme_id)

    async def _apply(self, entry: Entry) -> None:
        await self._store_call(self.ledger.apply, entry)
        self.peer_serial = entry.serial
        self._wake_readers()

    def _wake_readers(self) -> None:
        self._applied.set()
        self._applied = trio.Event()

    async def _on_key_notice(self, link: _Link, message: wire.Message) -> None:
        """The peer's master got keys: apply the entry (its slaves may now fetch them here)."""
        ids, serial = message["key_ids"], message["serial"]
        if len(ids) != 16 * message["number"] or message["size"] % 8:
            raise RemoteProtocolError("key_notice: key_ids or size do not fit number")
        key_ids = tuple(str(uuid.UUID(bytes=ids[i : i + 16])) for i in range(0, len(ids), 16))
        if any(key_origin(k) != (self.peer, serial) for k in key_ids):
            raise RemoteProtocolError(
                f"key_notice {serial}: a key ID does not name {self.peer}'s entry {serial}"
            )
        await self._apply(
            Assignment(
                self.peer,
                serial,
                (message["round"], message["block"], message["byte"]),
                message["number"],
                message["size"],
                key_ids,
                message["master"],
                tuple(message["slaves"]),
            )
        )

    async def _on_key_lease(self, link: _Link, message: wire.Message) -> None:
        """Bob: lease Alice key material for her masters."""
        try:
            async with self._writing:
                grant = await self._store_call(self.ledger.grant, message["need"], message["want"])
                await self._post(grant, message["request"])
        except Unavailable as error:
            await link.send(
                link.channel.encode("key_refuse", request=message["request"], message=str(error)[:256])
            )

    async def _on_key_grant(self, link: _Link, message: wire.Message) -> None:
        """Alice: Bob leased her a range."""
        start = (message["round"], message["block"], message["byte"])
        past = (message["past_round"], message["past_block"], message["past_byte"])
        await self._apply(Grant(message["serial"], start, past))
        self._leased = await self._store_call(self.ledger.lease_bytes)
        if link.lease is not None and message["request"] == link.lease_request:
            link.lease.resolve()
            link.lease = None

    async def _on_key_refuse(self, link: _Link, message: wire.Message) -> None:
        if link.lease is not None and message["request"] == link.lease_request:
            refused = f"the peer KME has no key material to lease: {message['message']}"
            link.lease.resolve(Unavailable(refused))
            link.lease = None

    async def _ask_lease(self, link: _Link, need: int) -> _Waiter:
        """Alice: the lease request in flight on ``link`` (the open one), sending one for at least ``need``
        bytes if none is."""
        if link is not self._link or not link.open.is_set():  # an answer could never come
            raise Unavailable(UNREACHABLE)
        if link.lease is not None:
            return link.lease
        # the answer may come (and clear link.lease) while the request is being written: keep the waiter
        waiter = link.lease = _Waiter()
        link.lease_request = self._next_request
        self._next_request += 1
        want = max(need, self.settings.lease_size // 8)
        try:
            frame = link.channel.encode("key_lease", request=link.lease_request, need=need, want=want)
            await link.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # the connection broke under the request: nothing can answer it (its detach may be done)
            waiter.resolve(Unavailable(UNREACHABLE))
            if link.lease is waiter:
                link.lease = None
        return waiter

    async def _post(self, entry: Entry, request: int = 0) -> None:
        """Queue a new entry of this site's log for the peer (call with ``_writing`` held, right after
        writing it). The queue keeps serial order; if the channel is not open, the entry goes with the
        other missing ones when it opens (``_on_keys_hello``)."""
        link = self._link
        if link is not None and link.open.is_set():
            await self._outbox_in.send((link, entry, request))

    async def run(self) -> None:
        """Run for the daemon's lifetime: sends this site's log entries; at Alice, also tops the lease
        up ahead of need."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refiller)
            async for link, entry, request in self._outbox_out:
                if link is self._link:  # a closed connection's entries go again on the next one
                    await link.notify(entry, request)

    async def _refiller(self) -> None:
        while True:
            await self._refill.wait()
            self._refill = trio.Event()
            link = self._link
            if link is None or not link.open.is_set():
                continue
            with contextlib.suppress(Unavailable):
                waiter = await self._ask_lease(link, 1)
                with trio.move_on_after(ANSWER_TIMEOUT):
                    await waiter.event.wait()

    # -- the API

    def _open_link(self) -> _Link:
        link = self._link
        if link is None or not link.open.is_set():
            raise Unavailable("the peer KME is unreachable: no key can be agreed on now")
        return link

    def _check_request(self, number: int, size: int, slaves: Sequence[str]) -> None:
        s = self.settings
        if not 1 <= number <= s.max_key_per_request:
            raise BadRequest(f"number must be in 1..{s.max_key_per_request}, got {number}")
        if size % 8 or not s.min_key_size <= size <= s.max_key_size:
            raise BadRequest(
                f"size must be a multiple of 8 in {s.min_key_size}..{s.max_key_size}, got {size}"
            )
        if len(slaves) > 1 + s.max_sae_id_count or len(set(slaves)) != len(slaves):
            raise BadRequest(f"at most {s.max_sae_id_count} distinct additional slave SAE IDs")
        unknown = [sae for sae in slaves if sae not in self._open_link().peer_saes]
        if unknown:
            raise BadRequest(f"{unknown[0]!r} is not an SAE of the peer KME")

    async def enc_keys(
        self, master: str, slaves: Sequence[str], number: int, size: int
    ) -> list[tuple[str, bytes]]:
        """New keys for ``master`` (an SAE of this site) and ``slaves`` (SAEs of the peer site)."""
        self._open_link()  # no peer: 503 at once, even for keys allocated ahead
        self._check_request(number, size, slaves)
        batch = self._batch(master, slaves, size)
        if len(batch.keys) >= number:
            self.batched_bytes -= number * size // 8
            return [batch.keys.popleft() for _ in range(number)]
        nbytes = number * size // 8
        if self.role == "alice" and nbytes > MAX_LEASE_BYTES:
            raise Unavailable(f"{nbytes * 8} bits in one request is more than a lease can carry")
        deadline = trio.current_time() + ANSWER_TIMEOUT
        while True:
            if self.role == "alice":
                await self._await_lease(nbytes, deadline)
            try:
                async with self._writing:
                    assignment, keys, self._leased = await self._store_call(
                        self._allocate, number, size, master, slaves, batch.ahead
                    )
                    await self._post(assignment)
                    # the entry is written and queued before any key of it leaves, so the rest can wait
                    batch.keys.extend(zip(assignment.key_ids[number:], keys[number:], strict=True))
                    self.batched_bytes += (assignment.number - number) * size // 8
                break
            except Unavailable:
                if self.role == "bob" or trio.current_time() >= deadline:
                    raise
                self._leased = await self._store_call(self.ledger.lease_bytes)  # another master was first
        # these SAEs asked again: allocate more ahead next time, doubling up to ``batch_size`` bits
        batch.ahead = min(self.settings.batch_size // size, max(number, 2 * batch.ahead))
        if self.role == "alice" and self._leased < self.settings.lease_size // 16:
            self._refill.set()
        return list(zip(assignment.key_ids[:number], keys[:number], strict=True))

    def _batch(self, master: str, slaves: Sequence[str], size: int) -> _Batch:
        """The keys allocated ahead for ``master``, ``slaves`` and ``size`` (none yet: a new batch)."""
        name = (master, tuple(sorted(slaves)), size)
        batch = self._batches.get(name)
        if batch is None:
            if len(self._batches) >= MAX_BATCHES:  # forget the SAEs that have no key waiting
                self._batches = {k: b for k, b in self._batches.items() if b.keys}
            batch = self._batches[name] = _Batch()
        return batch

    def batched_keys(self, master: str, slaves: Sequence[str], size: int) -> int:
        """Keys allocated ahead for ``master``, ``slaves`` and ``size``, waiting in memory."""
        batch = self._batches.get((master, tuple(sorted(slaves)), size))
        return 0 if batch is None else len(batch.keys)

    def _allocate(
        self, number: int, size: int, master: str, slaves: Sequence[str], extra: int
    ) -> tuple[Assignment, list[bytes], int]:
        assignment, keys = self.ledger.allocate(number, size, master, slaves, extra)
        return assignment, keys, self.ledger.lease_bytes() if self.role == "alice" else 0

    async def _await_lease(self, nbytes: int, deadline: float) -> None:
        """Alice: wait until her leases hold ``nbytes``, asking Bob for more if they do not (on the
        connection up now: the one the request started on may have ended while it waited)."""
        while self._leased < nbytes:
            waiter = await self._ask_lease(self._open_link(), nbytes - self._leased)
            with trio.move_on_at(deadline):
                await waiter.event.wait()
            if not waiter.event.is_set():
                raise Unavailable("the peer KME did not answer in time")
            if waiter.error is not None:
                raise waiter.error

    async def dec_keys(self, caller: str, master: str, key_ids: Sequence[str]) -> list[tuple[str, bytes]]:
        """The keys ``key_ids`` that ``master`` got for slave ``caller`` (an SAE of this site)."""
        if len(set(key_ids)) != len(key_ids):
            raise BadRequest("a key_ID is listed twice")
        needed = 0
        for key_id in key_ids:
            origin = key_origin(key_id)
            if origin is None:
                raise UnknownKey(f"unknown key_ID {key_id}")
            if origin[0] == self.peer:
                needed = max(needed, origin[1])
        deadline = trio.current_time() + ANSWER_TIMEOUT
        while self.peer_serial < needed:
            # the peer wrote the entry; its notice is on the way (or comes with the next connection)
            applied = self._applied
            if self._link is None:
                raise Unavailable("the peer KME is unreachable and has not sent these keys yet; ask again")
            with trio.move_on_at(deadline):
                await applied.wait()
            if trio.current_time() >= deadline:
                raise Unavailable("these keys have not arrived from the peer KME yet; ask again")
        keys = await self._take(_Take(list(key_ids), caller, master))
        return list(zip(key_ids, keys, strict=True))

    async def _take(self, take: _Take) -> list[bytes]:
        """Hand out ``take``'s keys in a group commit: the requests that arrive while one transaction
        waits for the disk share the next one, so slaves fetching at once pay one disk wait between
        them, and none is answered before its hand-out is durable. The first request finding no
        transaction under way runs them until none is left, shielded, so that each is answered."""
        self._takes.append(take)
        if not self._taking:
            self._taking = True
            try:
                with trio.CancelScope(shield=True):
                    while self._takes:
                        group = [t for t in self._takes if not t.abandoned]
                        self._takes = []
                        results: Sequence[list[bytes] | Exception]
                        try:
                            results = await self._store_call(
                                self.ledger.take_many, [(t.key_ids, t.caller, t.master) for t in group]
                            )
                        except Exception as error:  # the store failed: each request of the group says so
                            results = [error] * len(group)
                        for each, result in zip(group, results, strict=True):
                            each.result = result
                            each.done.set()
            finally:
                self._taking = False
        try:
            await take.done.wait()
        except trio.Cancelled:
            take.abandoned = True  # not handed out, unless its transaction is under way already
            raise
        if isinstance(take.result, Exception):
            raise take.result
        assert take.result is not None
        return take.result

    def held_keys(self) -> int:
        """Keys of ``key_size`` the link holds for masters and has handed to none, as this site knows it:
        Bob's free pool, Alice's unused leases (Bob tracks them too) and the keys this site allocated
        ahead. Only a hand-out lowers it — at this site at once, at the peer's when its notice arrives
        (its keys allocated ahead count as handed out there) — and a grant moves bytes from the free pool
        to the leases, changing nothing. Call on the store's thread."""
        held = self.ledger.available_bytes() + self.ledger.lease_bytes() + self.batched_bytes
        return held // (self.settings.key_size // 8)

    def stored_keys(self) -> int:
        """``stored_key_count`` of the Status: :meth:`held_keys`, never above ``max_key_count`` (a first
        round, or one larger than any before, may bring more than the room Alice saw before it)."""
        return min(self.held_keys(), self.settings.max_key_count)

    def store_full(self, coming_bits: int = 0) -> bool:
        """Whether the room left under ``max_key_count`` cannot take ``coming_bits`` more key bits (the
        rounds open and the next one, at the largest round so far): Alice then starts no round until
        applications take keys (the daemon checks before each round)."""
        stored, most = self.held_keys(), self.settings.max_key_count
        return stored >= most or stored + -(-coming_bits // self.settings.key_size) > most

    async def status(self, master: str, slave: str) -> dict[str, Any]:
        link = self._open_link()
        self._check_request(1, self.settings.key_size, [slave])
        stored = await self._store_call(self.stored_keys)
        s = self.settings
        return {
            "source_KME_ID": s.kme_id,
            "target_KME_ID": link.peer_kme_id,
            "master_SAE_ID": master,
            "slave_SAE_ID": slave,
            "key_size": s.key_size,
            "stored_key_count": stored,
            "max_key_count": s.max_key_count,
            "max_key_per_request": s.max_key_per_request,
            "max_key_size": s.max_key_size,
            "min_key_size": s.min_key_size,
            "max_SAE_ID_count": s.max_sae_id_count,
        }


def encode_keys(keys: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    """The Key container of ETSI GS QKD 014 §6.3."""
    return {"keys": [{"key_ID": key_id, "key": base64.b64encode(key).decode()} for key_id, key in keys]}
