"""Two KeyManagers over an in-memory key channel: the §19 protocol, lost messages, reconnects."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
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
from qkdd.delivery.ledger import NotAuthorized, Unavailable, UnknownKey
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
        lease_size=512,  # 64 bytes: two blocks of the test pool
    )


async def direct(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


@dataclass
class Wire:
    """The two directions of one connection's key channel; ``drop`` decides which messages vanish and
    ``hold`` which wait until ``release``."""

    managers: dict[str, KeyManager]
    drop: Callable[[str], bool] = lambda name: False
    hold: Callable[[str], bool] = lambda name: False
    channels: dict[str, KeyChannel] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    released: trio.Event = field(default_factory=trio.Event)
    closed: bool = False  # cut: writing fails, as on the daemon's closed stream

    async def connect(self, nursery: trio.Nursery) -> None:
        macs = {"alice": FrameMac(os.urandom(32)), "bob": FrameMac(os.urandom(32))}
        for role in ("alice", "bob"):
            self.channels[role] = KeyChannel(role, macs)
            send, receive = trio.open_memory_channel[bytes](100)
            nursery.start_soon(self._pump, "bob" if role == "alice" else "alice", receive)
            await self.managers[role].attach(self.channels[role], self._sender(send))

    def release(self) -> None:
        self.released.set()

    def _sender(self, send: trio.MemorySendChannel[bytes]) -> Callable[[bytes], Any]:
        async def write(frame: bytes) -> None:
            if self.closed:
                raise trio.ClosedResourceError
            envelope = wire.decode_envelope(frame[4:])
            if not self.drop(wire.decode_message(envelope.body).type):
                await send.send(frame)

        return write

    async def _pump(self, role: str, frames: trio.MemoryReceiveChannel[bytes]) -> None:
        async for frame in frames:
            envelope = wire.decode_envelope(frame[4:])
            message = self.channels[role].receive(envelope, wire.decode_message(envelope.body))
            if self.hold(message.type):
                await self.released.wait()
            try:
                await self.managers[role].receive(message)
            except RemoteProtocolError as error:
                self.errors.append(error)
                return

    def cut(self) -> None:
        self.closed = True
        for role, manager in self.managers.items():
            manager.detach(self.channels[role])


@dataclass
class Sites:
    stores: dict[str, KeyStore]
    managers: dict[str, KeyManager]
    running: bool = False

    async def connect(self, nursery: trio.Nursery, **faults: Callable[[str], bool]) -> Wire:
        """A fresh connection's key channel (the managers' background tasks run once, as in the daemon)."""
        if not self.running:
            self.running = True
            for manager in self.managers.values():
                nursery.start_soon(manager.run)
        wire_ = Wire(self.managers, **faults)
        await wire_.connect(nursery)
        for manager in self.managers.values():
            assert manager._link is not None  # attach() set it
            await manager._link.open.wait()
        return wire_

    def free(self) -> int:
        """Bytes still in Bob's pool, leased or not."""
        return self.stores["bob"].statistics().stored_key_bits // 8

    def same_pools(self) -> bool:
        return dict(self.stores["bob"].committed_keys()) == dict(self.stores["alice"].committed_keys())


@contextlib.contextmanager
def open_sites(folder: Path, blocks: int = 8, **options: Any) -> Iterator[Sites]:
    """Two sites whose pools hold ``blocks`` identical key blocks; ``options`` change the settings."""
    stores = {role: KeyStore(folder / role, "link") for role in ("alice", "bob")}
    rows = [(key_id("link", 0, i), os.urandom(BLOCK)) for i in range(blocks)]
    for store in stores.values():
        store.store_round(summary(0), rows, False, 1.0)
    managers = {
        role: KeyManager(role, replace(settings(role), **options), stores[role].ledger(role), direct)
        for role in ("alice", "bob")
    }
    try:
        yield Sites(stores, managers)
    finally:
        for store in stores.values():
            store.close()


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    with open_sites(tmp_path) as opened:
        yield opened


@pytest.mark.trio
async def test_keys_asked_at_either_site_reach_the_slave_at_the_other(sites: Sites) -> None:
    alice, bob = sites.managers["alice"], sites.managers["bob"]
    async with trio.open_nursery() as nursery:
        await sites.connect(nursery)
        sent = await alice.enc_keys("sae-alice", ["sae-bob"], 2, 256)  # leases first, then allocates
        assert await bob.dec_keys("sae-bob", "sae-alice", [k for k, _ in sent]) == sent
        sent = await bob.enc_keys("sae-bob", ["sae-alice"], 1, 512)
        assert await alice.dec_keys("sae-alice", "sae-bob", [k for k, _ in sent]) == sent
        with pytest.raises(BadRequest, match="not an SAE of the peer"):
            await alice.enc_keys("sae-alice", ["sae-carol"], 1, 256)
        await trio.testing.wait_all_tasks_blocked()
        # both stores erased the same material: 4 of the 8 blocks are used
        assert sites.same_pools() and sites.stores["bob"].statistics().stored_keys == 8 - 4
        status = await alice.status("sae-alice", "sae-bob")
        assert status["target_KME_ID"] == "bob-kme" and status["stored_key_count"] == 8 - 4
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_alice_tops_her_lease_up_ahead_of_need(sites: Sites) -> None:
    alice = sites.managers["alice"]
    async with trio.open_nursery() as nursery:
        await sites.connect(nursery)
        await alice.enc_keys("sae-alice", ["sae-bob"], 2, 256)  # uses the whole first lease
        await trio.testing.wait_all_tasks_blocked()
        assert alice.ledger.lease_bytes() == 64  # the next lease came without a request waiting for it
        assert sites.managers["bob"].ledger.lease() == alice.ledger.lease()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_without_the_peer_enc_keys_is_503_at_once_and_takes_nothing(sites: Sites) -> None:
    before = sites.free()
    for role, slave in (("alice", "sae-bob"), ("bob", "sae-alice")):
        with pytest.raises(Unavailable, match="unreachable"):
            await sites.managers[role].enc_keys(f"sae-{role}", [slave], 1, 256)
    assert sites.free() == before


@pytest.mark.trio
async def test_a_slave_waits_for_a_notice_on_its_way(sites: Sites) -> None:
    alice, bob = sites.managers["alice"], sites.managers["bob"]
    async with trio.open_nursery() as nursery:
        slow = await sites.connect(nursery, hold=lambda name: name == "key_notice")
        sent = await bob.enc_keys("sae-bob", ["sae-alice"], 1, 256)  # answered before Alice has it
        got: list[Any] = []

        async def slave() -> None:
            got.extend(await alice.dec_keys("sae-alice", "sae-bob", [sent[0][0]]))

        nursery.start_soon(slave)
        await trio.testing.wait_all_tasks_blocked()
        assert not got
        slow.release()
        await trio.testing.wait_all_tasks_blocked()
        assert got == sent
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_notices_lost_in_a_cut_arrive_with_the_next_connection(
    sites: Sites, autojump_clock: trio.abc.Clock
) -> None:
    alice, bob = sites.managers["alice"], sites.managers["bob"]
    async with trio.open_nursery() as nursery:
        lossy = await sites.connect(nursery, drop=lambda name: name == "key_notice")
        to_bob = await alice.enc_keys("sae-alice", ["sae-bob"], 1, 256)  # the masters have their keys
        to_alice = await bob.enc_keys("sae-bob", ["sae-alice"], 2, 256)
        with pytest.raises(Unavailable, match="not arrived"):
            await bob.dec_keys("sae-bob", "sae-alice", [to_bob[0][0]])
        lossy.cut()
        with pytest.raises(Unavailable, match="unreachable"):
            await alice.dec_keys("sae-alice", "sae-bob", [to_alice[0][0]])
        await sites.connect(nursery)  # each keys_hello says what its site lacks: it comes again
        assert await bob.dec_keys("sae-bob", "sae-alice", [to_bob[0][0]]) == to_bob
        assert await alice.dec_keys("sae-alice", "sae-bob", [k for k, _ in to_alice]) == to_alice
        await trio.testing.wait_all_tasks_blocked()
        assert sites.same_pools()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_lost_or_refused_lease_is_503_and_a_lost_grant_comes_again(
    sites: Sites, autojump_clock: trio.abc.Clock
) -> None:
    alice, bob = sites.managers["alice"], sites.managers["bob"]
    async with trio.open_nursery() as nursery:
        lossy = await sites.connect(nursery, drop=lambda name: name == "key_grant")
        with pytest.raises(Unavailable, match="did not answer"):
            await alice.enc_keys("sae-alice", ["sae-bob"], 1, 256)
        assert alice.ledger.lease_bytes() == 0 and bob.ledger.lease_bytes() == 64  # granted, lost
        lossy.cut()
        await sites.connect(nursery)
        assert alice.ledger.lease() == bob.ledger.lease()  # the grant came again
        sent = await alice.enc_keys("sae-alice", ["sae-bob"], 2, 256)
        assert await bob.dec_keys("sae-bob", "sae-alice", [k for k, _ in sent]) == sent
        for _ in range(3):
            await bob.enc_keys("sae-bob", ["sae-alice"], 1, 256)
        await trio.testing.wait_all_tasks_blocked()
        free = sites.free() - alice.ledger.lease_bytes()
        with pytest.raises(Unavailable, match="no key material to lease"):
            await alice.enc_keys("sae-alice", ["sae-bob"], 1, 8 * (free + alice.ledger.lease_bytes() + 1))
        assert sites.free() - alice.ledger.lease_bytes() == free  # nothing taken
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_master_whose_connection_was_replaced_asks_for_its_lease_on_the_new_one(
    sites: Sites, autojump_clock: trio.abc.Clock
) -> None:
    """Two of Alice's masters wait for one lease; the first takes all of it, and while the second
    re-reads her leases the connection is replaced (Bob restarted). The second asks again on the new
    connection. Before, she asked on the ended one: the write failed (503, internal error) and left a
    lease request pending that nothing would answer, so every lease request on the new connection waited
    for it and was 503 ("did not answer") for as long as that connection lasted."""
    alice, bob = sites.managers["alice"], sites.managers["bob"]
    loser: list[trio.lowlevel.Task] = []
    wires: list[Wire] = []
    outcomes: list[object] = []

    async def store_call(function: Callable[..., Any], *args: Any) -> Any:
        if loser and trio.lowlevel.current_task() is loser[0] and function == alice.ledger.lease_bytes:
            loser.clear()  # the connection ends and the next one opens while she reads how much is left
            wires[0].cut()
            wires.append(await sites.connect(nursery))
        try:
            return function(*args)
        except Unavailable:
            if function == alice._allocate and not loser and len(wires) == 1:
                loser.append(trio.lowlevel.current_task())  # the other master used the lease first
            raise

    async def master() -> None:
        try:
            outcomes.append(len(await alice.enc_keys("sae-alice", ["sae-bob"], 2, 256)))
        except Exception as error:  # what it was, for the assertion below
            outcomes.append(error)

    alice._store_call = store_call
    async with trio.open_nursery() as nursery:
        wires.append(await sites.connect(nursery))
        async with trio.open_nursery() as masters:
            masters.start_soon(master)
            masters.start_soon(master)
        assert len(wires) == 2  # the race and the reconnection happened
        assert outcomes == [2, 2]
        sent = await alice.enc_keys("sae-alice", ["sae-bob"], 2, 256)  # the new connection answers
        assert await bob.dec_keys("sae-bob", "sae-alice", [k for k, _ in sent]) == sent
        await trio.testing.wait_all_tasks_blocked()
        assert sites.same_pools()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_request_larger_than_any_lease_is_503_at_once(sites: Sites) -> None:
    alice = sites.managers["alice"]
    alice.settings = dataclasses.replace(alice.settings, max_key_per_request=65536, max_key_size=1 << 20)
    async with trio.open_nursery() as nursery:
        await sites.connect(nursery)
        with pytest.raises(Unavailable, match="more than a lease"):
            await alice.enc_keys("sae-alice", ["sae-bob"], 65536, 1 << 20)  # 8 GiB
        assert alice.ledger.lease_bytes() == 0
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_unknown_key_ids_and_stale_peers_are_refused_at_once(sites: Sites) -> None:
    bob = sites.managers["bob"]
    async with trio.open_nursery() as nursery:
        wire_ = await sites.connect(nursery)
        with pytest.raises(UnknownKey):
            await bob.dec_keys("sae-bob", "sae-alice", [str(uuid.uuid4())])  # not one of ours: no wait
        sent = await bob.enc_keys("sae-bob", ["sae-alice"], 1, 256)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(NotAuthorized):
            await bob.dec_keys("sae-bob", "sae-bob", [sent[0][0]])  # the master's own site
        wire_.cut()
        # a peer whose store went back in time: it claims to hold more of Bob's log than Bob wrote
        channel = KeyChannel("bob", {"alice": FrameMac(bytes(32)), "bob": FrameMac(bytes(32))})
        await bob.attach(channel, direct_send)
        hello = wire.Message("keys_hello", {"kme_id": "a", "saes": [], "serial": 0, "applied": 5})
        with pytest.raises(RemoteProtocolError) as stale:
            await bob.receive(hello)
        assert stale.value.code == "stale-state"
        nursery.cancel_scope.cancel()


async def direct_send(frame: bytes) -> None:
    pass


@pytest.mark.trio
async def test_concurrent_masters_at_both_sites_get_disjoint_keys(sites: Sites) -> None:
    got: list[tuple[str, bytes]] = []

    async def master(role: str, slave: str) -> None:
        with contextlib.suppress(Unavailable):  # the pool runs dry: whoever comes last gets 503
            for _ in range(8):
                got.extend(await sites.managers[role].enc_keys(f"sae-{role}", [slave], 1, 256))

    async with trio.open_nursery() as nursery:
        await sites.connect(nursery)
        async with trio.open_nursery() as masters:
            masters.start_soon(master, "alice", "sae-bob")
            masters.start_soon(master, "bob", "sae-alice")
        await trio.testing.wait_all_tasks_blocked()
        assert sites.same_pools()
        nursery.cancel_scope.cancel()
    assert len({key for _, key in got}) == len(got) and len({k for k, _ in got}) == len(got)
    ahead = sum(len(b.keys) for m in sites.managers.values() for b in m._batches.values())
    assert len(got) + ahead + sites.free() // BLOCK == 8  # each block: to one master, waiting, or left


@pytest.mark.trio
async def test_a_master_that_asks_again_gets_keys_allocated_ahead(tmp_path: Path) -> None:
    with open_sites(tmp_path, 64, batch_size=8 * 256) as sites:
        alice, bob = sites.managers["alice"], sites.managers["bob"]
        async with trio.open_nursery() as nursery:
            lossy = await sites.connect(nursery)
            sent = []
            for _ in range(12):
                sent += await bob.enc_keys("sae-bob", ["sae-alice"], 1, 256)
            # one entry for 1 key, then 1 + 1, 1 + 2, 1 + 4 and 1 + 8 (``batch_size``): 8 keys wait
            assert bob.ledger.serial("bob") == 5 and bob.batched_keys("sae-bob", ["sae-alice"], 256) == 8
            assert len({k for k, _ in sent}) == len({key for _, key in sent}) == 12
            status = await bob.status("sae-bob", "sae-alice")
            assert status["stored_key_count"] == 64 - 12  # counts the keys waiting for these SAEs
            assert await alice.dec_keys("sae-alice", "sae-bob", [k for k, _ in sent]) == sent
            lossy.cut()
            with pytest.raises(Unavailable, match="unreachable"):  # no peer: 503, even with keys waiting
                await bob.enc_keys("sae-bob", ["sae-alice"], 1, 256)
            assert bob.batched_keys("sae-bob", ["sae-alice"], 256) == 8
            # a restart: what waited in memory is gone, never handed out; the peer holds it, unasked
            bob = sites.managers["bob"] = KeyManager("bob", bob.settings, bob.ledger, direct)
            nursery.start_soon(bob.run)
            await sites.connect(nursery)
            again = await bob.enc_keys("sae-bob", ["sae-alice"], 1, 256)
            assert bob.ledger.serial("bob") == 6 and again[0] not in sent
            assert again[0][1] not in {key for _, key in sent}
            await trio.testing.wait_all_tasks_blocked()
            assert alice.ledger.waiting_keys() == 8 + 1 and sites.same_pools()
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_without_batches_every_request_is_an_entry(tmp_path: Path) -> None:
    with open_sites(tmp_path, 64, batch_size=0) as sites:
        async with trio.open_nursery() as nursery:
            await sites.connect(nursery)
            for _ in range(4):
                await sites.managers["alice"].enc_keys("sae-alice", ["sae-bob"], 1, 256)
            assert sites.managers["alice"].ledger.serial("alice") == 4
            assert sites.managers["alice"].batched_keys("sae-alice", ["sae-bob"], 256) == 0
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_the_key_channel_refuses_replays_forgeries_and_misplaced_messages(sites: Sites) -> None:
    macs = {"alice": FrameMac(os.urandom(32)), "bob": FrameMac(os.urandom(32))}
    alice, bob = KeyChannel("alice", macs), KeyChannel("bob", macs)
    frame = alice.encode("key_lease", request=1, need=1, want=1)
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
    reflected = bob.encode("keys_hello", kme_id="b", saes=[], serial=0, applied=0)
    reflected_envelope = wire.decode_envelope(reflected[4:])
    with pytest.raises(RemoteProtocolError) as reflection:
        # Bob's own frame, played back to a Bob that expects it next
        KeyChannel("bob", macs).receive(reflected_envelope, wire.decode_message(reflected_envelope.body))
    assert reflection.value.code == "bad-mac"
    with pytest.raises(RemoteProtocolError, match="may not send"):
        alice.receive(envelope, message)  # key_lease comes from Alice only
    # a key-channel message before the channel is open, or a second keys_hello
    with pytest.raises(RemoteProtocolError, match="outside an open key channel"):
        await sites.managers["bob"].receive(message)


def test_the_answer_timeout_is_the_specs() -> None:
    assert kme_mod.ANSWER_TIMEOUT == 5.0


def _store_waiting_for(disk: trio.Event) -> Callable[..., Any]:
    """A KME's store call whose every transaction waits for ``disk`` (a slow disk, under the test's
    control)."""

    async def slow_store(function: Callable[..., Any], *args: Any) -> Any:
        await disk.wait()
        return function(*args)

    return slow_store


@pytest.mark.trio
async def test_slaves_fetching_at_once_share_a_transaction_and_a_refusal_stays_their_own(
    sites: Sites, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dec_keys requests that arrive while a hand-out waits for the disk go together in the next
    transaction (a group commit); each is still all or none: one refused leaves the others whole."""
    alice, bob = sites.managers["alice"], sites.managers["bob"]
    groups: list[int] = []
    take_many = bob.ledger.take_many

    def counting(requests: list[tuple[list[str], str, str]]) -> list[Any]:
        groups.append(len(requests))
        return take_many(requests)

    disk = trio.Event()  # the first transaction waits for the disk until the others have arrived
    slow_store = _store_waiting_for(disk)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await sites.connect(nursery)
            sent = await alice.enc_keys("sae-alice", ["sae-bob"], 4, 256)
            await trio.testing.wait_all_tasks_blocked()
            monkeypatch.setattr(bob.ledger, "take_many", counting)
            monkeypatch.setattr(bob, "_store_call", slow_store)
            results: dict[str, Any] = {}

            async def fetch(name: str, ids: list[str]) -> None:
                try:
                    results[name] = await bob.dec_keys("sae-bob", "sae-alice", ids)
                except UnknownKey as error:
                    results[name] = error

            async with trio.open_nursery() as fetches:
                fetches.start_soon(fetch, "first", [sent[0][0]])
                await trio.testing.wait_all_tasks_blocked()
                fetches.start_soon(fetch, "two", [sent[1][0], sent[2][0]])
                fetches.start_soon(fetch, "again", [sent[0][0], sent[3][0]])  # the first's key once more
                fetches.start_soon(fetch, "last", [sent[3][0]])
                await trio.testing.wait_all_tasks_blocked()
                disk.set()
            assert results["first"] == [sent[0]] and results["two"] == sent[1:3]
            assert results["last"] == [sent[3]]
            assert "already delivered" in str(results["again"])  # and it took nothing: "last" got its key
            assert groups == [1, 3]
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_dec_keys_request_cancelled_while_it_waits_for_its_group_hands_nothing_out(
    sites: Sites, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request cancelled (the daemon stopping) before its group's transaction began takes nothing:
    no answer could carry its keys, so the slave gets them when it asks again."""
    alice, bob = sites.managers["alice"], sites.managers["bob"]
    disk = trio.Event()
    slow_store = _store_waiting_for(disk)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await sites.connect(nursery)
            sent = await alice.enc_keys("sae-alice", ["sae-bob"], 2, 256)
            await trio.testing.wait_all_tasks_blocked()
            monkeypatch.setattr(bob, "_store_call", slow_store)
            stop = trio.CancelScope()

            async def stopped_request() -> None:
                with stop:
                    await bob.dec_keys("sae-bob", "sae-alice", [sent[1][0]])
                    raise AssertionError("the request was not cancelled")

            async with trio.open_nursery() as fetches:
                fetches.start_soon(bob.dec_keys, "sae-bob", "sae-alice", [sent[0][0]])
                await trio.testing.wait_all_tasks_blocked()  # its transaction waits for the disk
                fetches.start_soon(stopped_request)
                await trio.testing.wait_all_tasks_blocked()  # it waits for the next group
                stop.cancel()
                await trio.testing.wait_all_tasks_blocked()
                disk.set()
            assert stop.cancelled_caught
            assert await bob.dec_keys("sae-bob", "sae-alice", [sent[1][0]]) == [sent[1]]
            nursery.cancel_scope.cancel()
