"""Two KeyManagers over an in-memory key channel: the §19 protocol, lost messages, reconnects."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qkdd import wire
from qkdd.auth.psk import FrameMac
from qkdd.config import Address, Etsi014, SaeIdentity
from qkdd.delivery import kme as kme_mod
from qkdd.delivery.channel import KeyChannel
from qkdd.delivery.kme import BadRequest, KeyManager
from qkdd.delivery.ledger import Unavailable
from qkdd.errors import RemoteProtocolError
from qkdd.records import key_id
from qkdd.store import KeyStore
from tests.delivery.test_ledger import BLOCK, summary


def settings(role: str) -> Etsi014:
    return Etsi014(
        listen=Address("127.0.0.1", 0),
        certificate=Path("unused"),
        key=Path("unused"),
        ca=Path("unused"),
        saes=(SaeIdentity(f"sae-{role}", common_name=f"sae-{role}"),),
        kme_id=f"{role}-kme",
    )


async def direct(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


@dataclass
class Wire:
    """The two directions of one connection's key channel; ``drop`` decides which messages vanish."""

    managers: dict[str, KeyManager]
    drop: Callable[[str], bool] = lambda name: False
    channels: dict[str, KeyChannel] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)

    async def connect(self, nursery: trio.Nursery) -> None:
        macs = {"alice": FrameMac(os.urandom(32)), "bob": FrameMac(os.urandom(32))}
        for role in ("alice", "bob"):
            self.channels[role] = KeyChannel(role, macs)
            send, receive = trio.open_memory_channel[bytes](100)
            nursery.start_soon(self._pump, "bob" if role == "alice" else "alice", receive)
            await self.managers[role].attach(self.channels[role], self._sender(send))

    def _sender(self, send: trio.MemorySendChannel[bytes]) -> Callable[[bytes], Any]:
        async def write(frame: bytes) -> None:
            envelope = wire.decode_envelope(frame[4:])
            if not self.drop(wire.decode_message(envelope.body).type):
                await send.send(frame)

        return write

    async def _pump(self, role: str, frames: trio.MemoryReceiveChannel[bytes]) -> None:
        async for frame in frames:
            envelope = wire.decode_envelope(frame[4:])
            message = self.channels[role].receive(envelope, wire.decode_message(envelope.body))
            try:
                await self.managers[role].receive(message)
            except RemoteProtocolError as error:
                self.errors.append(error)
                return

    def cut(self) -> None:
        for role, manager in self.managers.items():
            manager.detach(self.channels[role])


@dataclass
class Sites:
    stores: dict[str, KeyStore]
    managers: dict[str, KeyManager]
    finalizing: bool = False

    async def connect(self, nursery: trio.Nursery, drop: Callable[[str], bool] = lambda name: False) -> Wire:
        """A fresh connection's key channel (Bob's finalizer runs once, as in the daemon)."""
        if not self.finalizing:
            self.finalizing = True
            nursery.start_soon(self.managers["bob"].finalizer)
        wire_ = Wire(self.managers, drop)
        await wire_.connect(nursery)
        await wait_open(self)
        return wire_

    def available(self) -> int:
        return int(self.stores["bob"].ledger("bob").available_bytes())


@pytest.fixture
async def sites(tmp_path: Path) -> AsyncIterator[Sites]:
    stores = {role: KeyStore(tmp_path / role, "link") for role in ("alice", "bob")}
    blocks = [(key_id("link", 0, i), os.urandom(BLOCK)) for i in range(8)]
    for store in stores.values():
        store.store_round(summary(0), blocks, False, 1.0)
    managers = {
        role: KeyManager(role, settings(role), stores[role].ledger(role), direct) for role in ("alice", "bob")
    }
    yield Sites(stores, managers)
    for store in stores.values():
        store.close()


async def wait_open(sites: Sites) -> None:
    for manager in sites.managers.values():
        assert manager._link is not None  # attach() set it
        await manager._link.open.wait()


@pytest.mark.trio
async def test_keys_asked_at_either_site_reach_the_slave_at_the_other(sites: Sites) -> None:
    alice, bob = sites.managers["alice"], sites.managers["bob"]
    async with trio.open_nursery() as nursery:
        await sites.connect(nursery)
        sent = await alice.enc_keys("sae-alice", ["sae-bob"], 2, 256)
        assert await bob.dec_keys("sae-bob", "sae-alice", [k for k, _ in sent]) == sent
        sent = await bob.enc_keys("sae-bob", ["sae-alice"], 1, 512)
        assert await alice.dec_keys("sae-alice", "sae-bob", [k for k, _ in sent]) == sent
        with pytest.raises(BadRequest, match="not an SAE of the peer"):
            await alice.enc_keys("sae-alice", ["sae-carol"], 1, 256)
        await trio.testing.wait_all_tasks_blocked()
        # Bob's finalizer erased what Alice acknowledged: both stores keep the same material
        assert dict(sites.stores["bob"].committed_keys()) == dict(sites.stores["alice"].committed_keys())
        assert sites.stores["bob"].statistics().stored_keys == 8 - 4
        status = await alice.status("sae-alice", "sae-bob")
        assert status["target_KME_ID"] == "bob-kme" and status["stored_key_count"] == 8 - 2 - 2
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_without_the_peer_enc_keys_is_503_at_once_and_takes_nothing(sites: Sites) -> None:
    before = sites.available()
    for role, slave in (("alice", "sae-bob"), ("bob", "sae-alice")):
        with pytest.raises(Unavailable, match="unreachable"):
            await sites.managers[role].enc_keys(f"sae-{role}", [slave], 1, 256)
    assert sites.available() == before


@pytest.mark.trio
async def test_an_assignment_lost_in_a_cut_returns_to_the_pool(
    sites: Sites, autojump_clock: trio.abc.Clock
) -> None:
    before = sites.available()
    alice, bob = sites.managers["alice"], sites.managers["bob"]
    async with trio.open_nursery() as nursery:
        lossy = await sites.connect(nursery, drop=lambda name: name == "key_assign")
        with pytest.raises(Unavailable, match="did not answer"):
            await alice.enc_keys("sae-alice", ["sae-bob"], 3, 256)
        with pytest.raises(Unavailable):
            await bob.enc_keys("sae-bob", ["sae-alice"], 1, 256)  # no acknowledgement either
        assert sites.available() == before - 4 * 32  # offered at Bob, unknown to Alice
        lossy.cut()
        # the next connection's keys_hello tells Bob what Alice holds: nothing
        await sites.connect(nursery)
        assert sites.available() == before
        sent = await alice.enc_keys("sae-alice", ["sae-bob"], 1, 256)
        assert await bob.dec_keys("sae-bob", "sae-alice", [sent[0][0]]) == sent
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_lost_acknowledgement_keeps_the_keys_assigned_at_both_sites(
    sites: Sites, autojump_clock: trio.abc.Clock
) -> None:
    before = sites.available()
    alice, bob = sites.managers["alice"], sites.managers["bob"]
    async with trio.open_nursery() as nursery:
        lossy = await sites.connect(nursery, drop=lambda name: name == "key_ack")
        sent = await alice.enc_keys("sae-alice", ["sae-bob"], 1, 256)  # Alice applied it: her master has it
        with pytest.raises(Unavailable, match="not confirmed"):
            await bob.dec_keys("sae-bob", "sae-alice", [sent[0][0]])  # Bob waits for the acknowledgement
        lossy.cut()
        await sites.connect(nursery)
        # Alice's keys_hello says she applied it: Bob keeps it, and his slave gets it
        assert await bob.dec_keys("sae-bob", "sae-alice", [sent[0][0]]) == sent
        assert sites.available() == before - 32
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_concurrent_masters_at_both_sites_get_disjoint_keys(sites: Sites) -> None:
    got: list[tuple[str, bytes]] = []

    async def master(role: str, slave: str) -> None:
        for _ in range(4):
            got.extend(await sites.managers[role].enc_keys(f"sae-{role}", [slave], 1, 256))

    async with trio.open_nursery() as nursery:
        await sites.connect(nursery)
        async with trio.open_nursery() as masters:
            masters.start_soon(master, "alice", "sae-bob")
            masters.start_soon(master, "bob", "sae-alice")
        nursery.cancel_scope.cancel()
    assert len(got) == 8 and len({key for _, key in got}) == 8 and sites.available() == 0


@pytest.mark.trio
async def test_the_key_channel_refuses_replays_forgeries_and_misplaced_messages(sites: Sites) -> None:
    macs = {"alice": FrameMac(os.urandom(32)), "bob": FrameMac(os.urandom(32))}
    alice, bob = KeyChannel("alice", macs), KeyChannel("bob", macs)
    frame = alice.encode("key_ack", serial=1)
    envelope = wire.decode_envelope(frame[4:])
    message = wire.decode_message(envelope.body)
    bob.receive(envelope, message)
    with pytest.raises(RemoteProtocolError, match="sequence number") as replay:
        bob.receive(envelope, message)
    assert replay.value.code == "bad-seq"
    forged = wire.Envelope(1, envelope.body, bytes(32))
    with pytest.raises(RemoteProtocolError) as bad:
        bob.receive(forged, message)
    assert bad.value.code == "bad-mac"
    reflected = bob.encode("keys_hello", kme_id="b", saes=[], serial=0)
    reflected_envelope = wire.decode_envelope(reflected[4:])
    with pytest.raises(RemoteProtocolError) as reflection:
        # Bob's own frame, played back to a Bob that expects it next
        KeyChannel("bob", macs).receive(reflected_envelope, wire.decode_message(reflected_envelope.body))
    assert reflection.value.code == "bad-mac"
    with pytest.raises(RemoteProtocolError, match="may not send"):
        alice.receive(envelope, message)  # key_ack comes from Alice only
    # a key-channel message before the channel is open, or a second keys_hello
    with pytest.raises(RemoteProtocolError, match="outside an open key channel"):
        await sites.managers["bob"].receive(message)


def test_the_answer_timeout_is_the_specs() -> None:
    assert kme_mod.ANSWER_TIMEOUT == 5.0
