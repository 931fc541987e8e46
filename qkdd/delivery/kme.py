"""The Key Management Entity of one site: ETSI GS QKD 014 semantics over the key channel (§19).

Theory of operation
-------------------
* :class:`KeyManager` serves the three calls of the API — status, enc_keys (a master SAE asks for new
  keys for one or more slave SAEs of the peer site) and dec_keys (a slave SAE fetches the keys its master
  got) — and speaks the key channel with the peer daemon. It knows nothing of HTTP or TLS.
* enc_keys at **Bob**: allocate from the pool (:class:`~qkdd.delivery.ledger.KeyLedger`), send
  ``key_assign``, wait for Alice's ``key_ack`` (she then holds the keys durably, so her slaves can fetch
  them), answer. enc_keys at **Alice**: send ``key_request``, Bob allocates and answers ``key_assign``,
  Alice applies it durably, acknowledges, answers. Either way the slave's site knows the key IDs before
  the master has them.
* No key channel (the peer is down or does not offer it) → 503 at once, nothing consumed. No answer
  within the channel's answer timeout → 503; what Alice never applied returns to the pool at the next
  ``keys_hello`` (Bob rolls it back), what she did apply stays assigned but undelivered at the master's
  site (never handed out twice, at worst never handed out).
* dec_keys of a key whose assignment Alice has not acknowledged yet waits for that acknowledgement (it is
  on its way: Alice acknowledges before her master can hand the IDs on) up to the same timeout.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from qkdd import wire
from qkdd.config import Etsi014
from qkdd.delivery.channel import ANSWER_TIMEOUT, KeyChannel
from qkdd.delivery.ledger import Assignment, DeliveryError, Diverged, KeyLedger, Unavailable
from qkdd.errors import RemoteProtocolError

log = logging.getLogger("qkdd")
T = TypeVar("T")
StoreCall = Callable[..., Awaitable[Any]]
Send = Callable[[bytes], Awaitable[None]]


class BadRequest(DeliveryError):
    status = 400


@dataclass
class _Waiter:
    """One answer a request waits for."""

    event: trio.Event = field(default_factory=trio.Event)
    keys: list[bytes] | None = None
    assignment: Assignment | None = None
    error: DeliveryError | None = None

    def resolve(
        self,
        keys: list[bytes] | None = None,
        assignment: Assignment | None = None,
        error: DeliveryError | None = None,
    ) -> None:
        self.keys, self.assignment, self.error = keys, assignment, error
        self.event.set()


@dataclass
class _Link:
    """The key channel of the connection that is up."""

    channel: KeyChannel
    send: Send
    open: trio.Event = field(default_factory=trio.Event)
    peer_kme_id: str = ""
    peer_saes: frozenset[str] = frozenset()


class KeyManager:
    """The KME of this site (``role``), over the key store's ledger and a store-call runner."""

    def __init__(self, role: str, settings: Etsi014, ledger: KeyLedger, store_call: StoreCall) -> None:
        self.role = role
        self.settings = settings
        self.ledger = ledger
        self._store_call = store_call
        self._link: _Link | None = None
        self._requests: dict[int, _Waiter] = {}  # Alice: request ID -> answer
        self._acks: dict[int, _Waiter] = {}  # Bob: serial -> Alice's acknowledgement
        self._next_request = 1
        self._allocating = trio.Lock()  # Bob: allocation and its key_assign leave in serial order
        self._acked = trio.Event()  # Bob: set (and replaced) on every acknowledgement
        self.confirmed = 0  # Bob: the last serial Alice acknowledged (on this run)
        self._allocated = 0  # Bob: the last serial allocated
        self.local_saes = frozenset(s.id for s in settings.saes)

    # -- the key channel

    async def attach(self, channel: KeyChannel, send: Send) -> None:
        """A connection is up and both sides offer the key channel: open it."""
        self.detach()
        self._link = _Link(channel, send)
        serial = await self._store_call(lambda: self.ledger.serial)
        self._allocated = serial
        await send(
            channel.encode(
                "keys_hello", kme_id=self.settings.kme_id, saes=sorted(self.local_saes), serial=serial
            )
        )

    def detach(self, channel: KeyChannel | None = None) -> None:
        """The connection of ``channel`` (any, if ``None``) ended: what waits for the peer gets 503."""
        if self._link is None or (channel is not None and self._link.channel is not channel):
            return
        self._link = None
        gone = Unavailable("the peer KME became unreachable before it answered")
        for waiter in (*self._requests.values(), *self._acks.values()):
            waiter.resolve(error=gone)
        self._requests.clear()
        self._acks.clear()

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
        if self.role == "bob":
            try:
                dropped = await self._store_call(self.ledger.rollback, message["serial"])
            except Diverged as error:
                raise RemoteProtocolError(f"key ledgers diverge: {error}", code="stale-state") from None
            if dropped:
                log.info(
                    "key delivery: assignments %s never reached Alice; their keys return to the pool", dropped
                )
        else:
            serial = await self._store_call(lambda: self.ledger.serial)
            if message["serial"] < serial:
                raise RemoteProtocolError(
                    f"Bob allocated up to assignment {message['serial']}, this site applied {serial}",
                    code="stale-state",
                )
        link.peer_kme_id = message["kme_id"]
        link.peer_saes = frozenset(message["saes"])
        link.open.set()
        log.info("key delivery: key channel open with KME %s", link.peer_kme_id)

    async def _on_key_request(self, link: _Link, message: wire.Message) -> None:
        """Bob: allocate for one of Alice's masters."""
        request = message["request"]
        try:
            self._check_request(message["number"], message["size"], message["slaves"], local=True)
            async with self._allocating:
                assignment, _ = await self._allocate(
                    "alice",
                    message["number"],
                    message["size"],
                    message["master"],
                    message["slaves"],
                )
                await self._send_assign(link, assignment, request)
        except DeliveryError as error:
            reason = "insufficient" if isinstance(error, Unavailable) else "bad-request"
            await link.send(
                link.channel.encode("key_refuse", request=request, reason=reason, message=str(error)[:256])
            )

    async def _on_key_assign(self, link: _Link, message: wire.Message) -> None:
        """Alice: apply Bob's assignment, acknowledge it, hand it to the request that waits."""
        ids = message["key_ids"]
        if len(ids) != 16 * message["number"] or message["size"] % 8:
            raise RemoteProtocolError("key_assign: key_ids or size do not fit number")
        request = message["request"]
        assignment = Assignment(
            serial=message["serial"],
            origin="alice" if request else "bob",
            start=(message["round"], message["block"], message["byte"]),
            number=message["number"],
            size=message["size"],
            key_ids=tuple(str(uuid.UUID(bytes=ids[i : i + 16])) for i in range(0, len(ids), 16)),
            master=message["master"],
            slaves=tuple(message["slaves"]),
        )
        keys = await self._store_call(self.ledger.apply, assignment)
        await link.send(link.channel.encode("key_ack", serial=assignment.serial))
        waiter = self._requests.pop(request, None)
        if waiter is not None:
            waiter.resolve(keys=keys, assignment=assignment)

    async def _on_key_refuse(self, link: _Link, message: wire.Message) -> None:
        waiter = self._requests.pop(message["request"], None)
        if waiter is not None:
            kind = Unavailable if message["reason"] == "insufficient" else BadRequest
            waiter.resolve(error=kind(f"the peer KME refused: {message['message']}"))

    async def _on_key_ack(self, link: _Link, message: wire.Message) -> None:
        """Bob: Alice holds everything up to ``serial``. The waiting master answers at once; making the
        assignments final on disk (and erasing their material) is the finalizer's job, off this path:
        should Bob crash first, Alice's next keys_hello finalizes them."""
        serial = message["serial"]
        if serial > self._allocated:
            raise RemoteProtocolError(f"key_ack of assignment {serial}, which was never sent")
        self.confirmed = max(self.confirmed, serial)
        for waiting in [s for s in self._acks if s <= serial]:
            self._acks.pop(waiting).resolve()
        self._acked.set()
        self._acked = trio.Event()

    async def finalizer(self) -> None:
        """Bob: run for the daemon's lifetime; makes acknowledged assignments final in batches."""
        done = 0
        while True:
            await self._acked.wait()
            target = self.confirmed
            if target > done:
                await self._store_call(self.ledger.finalize, target)
                done = target

    async def _allocate(self, *args: Any) -> tuple[Assignment, list[bytes]]:
        assignment, keys = await self._store_call(self.ledger.allocate, *args)
        self._allocated = assignment.serial
        return assignment, keys

    async def _send_assign(self, link: _Link, assignment: Assignment, request: int) -> None:
        await link.send(
            link.channel.encode(
                "key_assign",
                request=request,
                serial=assignment.serial,
                round=assignment.start[0],
                block=assignment.start[1],
                byte=assignment.start[2],
                number=assignment.number,
                size=assignment.size,
                key_ids=b"".join(uuid.UUID(k).bytes for k in assignment.key_ids),
                master=assignment.master,
                slaves=list(assignment.slaves),
            )
        )

    # -- the API

    def _open_link(self) -> _Link:
        link = self._link
        if link is None or not link.open.is_set():
            raise Unavailable("the peer KME is unreachable: no key can be agreed on now")
        return link

    def _check_request(self, number: int, size: int, slaves: Sequence[str], *, local: bool) -> None:
        s = self.settings
        if not 1 <= number <= s.max_key_per_request:
            raise BadRequest(f"number must be in 1..{s.max_key_per_request}, got {number}")
        if size % 8 or not s.min_key_size <= size <= s.max_key_size:
            raise BadRequest(
                f"size must be a multiple of 8 in {s.min_key_size}..{s.max_key_size}, got {size}"
            )
        if len(slaves) > 1 + s.max_sae_id_count or len(set(slaves)) != len(slaves):
            raise BadRequest(f"at most {s.max_sae_id_count} distinct additional slave SAE IDs")
        known = self.local_saes if local else self._open_link().peer_saes
        unknown = [sae for sae in slaves if sae not in known]
        if unknown:
            raise BadRequest(f"{unknown[0]!r} is not an SAE of the {'this' if local else 'peer'} KME")

    async def enc_keys(
        self, master: str, slaves: Sequence[str], number: int, size: int
    ) -> list[tuple[str, bytes]]:
        """New keys for ``master`` (an SAE of this site) and ``slaves`` (SAEs of the peer site)."""
        link = self._open_link()
        self._check_request(number, size, slaves, local=False)
        waiters: dict[int, _Waiter]
        if self.role == "bob":
            async with self._allocating:
                assignment, keys = await self._allocate("bob", number, size, master, list(slaves))
                waiters, key = self._acks, assignment.serial
                waiter = waiters[key] = _Waiter()
                await self._send_assign(link, assignment, 0)
        else:
            waiters, key = self._requests, self._next_request
            self._next_request += 1
            waiter = waiters[key] = _Waiter()
            await link.send(
                link.channel.encode(
                    "key_request", request=key, master=master, slaves=list(slaves), number=number, size=size
                )
            )
        with trio.move_on_after(ANSWER_TIMEOUT):
            await waiter.event.wait()
        if not waiter.event.is_set():
            waiters.pop(key, None)
            raise Unavailable("the peer KME did not answer in time")
        if waiter.error is not None:
            raise waiter.error
        if self.role == "alice":
            assert waiter.keys is not None and waiter.assignment is not None
            keys, assignment = waiter.keys, waiter.assignment
        return list(zip(assignment.key_ids, keys, strict=True))

    async def dec_keys(self, caller: str, master: str, key_ids: Sequence[str]) -> list[tuple[str, bytes]]:
        """The keys ``key_ids`` that ``master`` got for slave ``caller`` (an SAE of this site)."""
        if len(set(key_ids)) != len(key_ids):
            raise BadRequest("a key_ID is listed twice")
        deadline = trio.current_time() + ANSWER_TIMEOUT
        while True:
            acked = self._acked
            keys, unconfirmed = await self._store_call(
                self.ledger.take, list(key_ids), caller, master, self.confirmed
            )
            if not unconfirmed:
                return list(zip(key_ids, keys, strict=True))
            with trio.move_on_at(deadline):
                await acked.wait()
            if trio.current_time() >= deadline:
                raise Unavailable("the peer KME has not confirmed these keys yet; ask again")

    async def status(self, master: str, slave: str) -> dict[str, Any]:
        link = self._open_link()
        self._check_request(1, self.settings.key_size, [slave], local=False)
        available = await self._store_call(self.ledger.available_bytes)
        s = self.settings
        return {
            "source_KME_ID": s.kme_id,
            "target_KME_ID": link.peer_kme_id,
            "master_SAE_ID": master,
            "slave_SAE_ID": slave,
            "key_size": s.key_size,
            "stored_key_count": available // (s.key_size // 8),
            "max_key_count": s.max_key_count,
            "max_key_per_request": s.max_key_per_request,
            "max_key_size": s.max_key_size,
            "min_key_size": s.min_key_size,
            "max_SAE_ID_count": s.max_sae_id_count,
        }


def encode_keys(keys: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    """The Key container of ETSI GS QKD 014 §6.3."""
    return {"keys": [{"key_ID": key_id, "key": base64.b64encode(key).decode()} for key_id, key in keys]}
