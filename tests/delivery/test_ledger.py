"""The ledger: each site allocates from its own stream (Bob's head, Alice's leases), the other applies the
entry and cuts the same bytes; erasure, leases, divergence, hand-out rules, key IDs."""

from __future__ import annotations

import dataclasses
import os
import random
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdd.delivery.ledger import (
    Diverged,
    Grant,
    KeyLedger,
    NotAuthorized,
    Unavailable,
    UnknownKey,
    key_origin,
    make_key_id,
    scan_available,
)
from qkdd.errors import InputError
from qkdd.records import RoundSummary, key_id
from qkdd.store import DATABASE, KeyStore

BLOCK = 32  # bytes per key block (key_block_bits = 256)


def summary(number: int) -> RoundSummary:
    return RoundSummary(number, number, 1000, 100, 80, 0.01, 0.02, 10, 8 * BLOCK, False, None, "psk")


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[KeyStore, KeyStore]]:
    alice, bob = KeyStore(tmp_path / "alice", "link"), KeyStore(tmp_path / "bob", "link")
    yield alice, bob
    alice.close()
    bob.close()


def commit_round(stores: tuple[KeyStore, KeyStore], number: int, blocks: int) -> bytes:
    material = os.urandom(blocks * BLOCK)
    rows = [(key_id("link", number, i), material[i * BLOCK : (i + 1) * BLOCK]) for i in range(blocks)]
    for store in stores:
        store.store_round(summary(number), rows, False, 1.0)
    return material


def ledgers(stores: tuple[KeyStore, KeyStore]) -> tuple[KeyLedger, KeyLedger]:
    return stores[0].ledger("alice"), stores[1].ledger("bob")


def same_pools(stores: tuple[KeyStore, KeyStore]) -> bool:
    return dict(stores[0].committed_keys()) == dict(stores[1].committed_keys())


def test_both_sides_cut_the_same_bytes_across_blocks_and_rounds(stores: tuple[KeyStore, KeyStore]) -> None:
    material = commit_round(stores, 0, 3) + commit_round(stores, 1, 2)
    alice, bob = ledgers(stores)
    assert alice.available_bytes() == bob.available_bytes() == 5 * BLOCK
    first, keys = bob.allocate(3, 136, "sae-b", ["sae-a"])  # 17-byte keys straddle blocks
    assert keys == [material[i * 17 : (i + 1) * 17] for i in range(3)]
    assert alice.apply(first) == keys
    assert same_pools(stores)
    second, more = bob.allocate(2, 256, "sae-b", ["sae-a"])
    assert second.start == (0, 1, 51 - BLOCK) and second.serial == 2
    assert more == [material[51:83], material[83:115]]
    assert alice.apply(second) == more
    assert alice.head == bob.head and same_pools(stores)
    assert alice.available_bytes() == bob.available_bytes() == 5 * BLOCK - 115
    with pytest.raises(Unavailable):
        bob.allocate(2, 256, "sae-b", ["sae-a"])  # 45 bytes left, 64 asked
    assert bob.serial("bob") == 2  # a refused allocation takes nothing


def test_keys_allocated_ahead_leave_others_their_share(stores: tuple[KeyStore, KeyStore]) -> None:
    material = commit_round(stores, 0, 16)
    alice, bob = ledgers(stores)
    # Bob: beyond the request, at most a quarter of what is left (15 blocks / 4: 3 keys)
    batch, keys = bob.allocate(1, 256, "sae-b", ["sae-a"], extra=100)
    assert batch.number == len(keys) == len(batch.key_ids) == 4 and keys[3] == material[96:128]
    assert alice.apply(batch) == keys and bob.available_bytes() == 12 * BLOCK
    assert bob.allocate(1, 256, "sae-b", ["sae-a"], extra=1)[0].number == 2  # no more than asked
    alice.apply(bob.entries_after(1)[0])
    # Alice: as far as her leases go
    alice.apply(bob.grant(3 * BLOCK, 3 * BLOCK))
    mine, _ = alice.allocate(1, 128, "sae-a", ["sae-b"], extra=100)
    assert mine.number == 6 and alice.lease_bytes() == 0
    bob.apply(mine)
    assert same_pools(stores)
    # never beyond the 16-bit index of a key ID
    commit_round(stores, 1, 8192)
    large, _ = bob.allocate(65000, 8, "sae-b", ["sae-a"], extra=10000)
    assert large.number == 1 << 16 and key_origin(large.key_ids[-1]) == ("bob", 4)  # 3: the grant
    assert uuid.UUID(large.key_ids[-1]).int & 0xFFFF == 0xFFFF
    assert len(set(large.key_ids)) == 1 << 16


def test_material_is_erased_at_once_at_both_sites(stores: tuple[KeyStore, KeyStore]) -> None:
    commit_round(stores, 0, 2)
    alice, bob = ledgers(stores)
    assignment, _ = bob.allocate(1, 384, "sae-b", ["sae-a"])  # 48 bytes: block 0 and half of block 1
    assert stores[1].statistics().stored_keys == 1
    alice.apply(assignment)
    remaining = dict(stores[0].committed_keys())
    assert len(remaining) == 1 and next(iter(remaining.values()))[:16] == bytes(16)  # used half zeroed
    assert same_pools(stores)


def test_alice_allocates_from_her_leases_and_bob_never_cuts_them(stores: tuple[KeyStore, KeyStore]) -> None:
    material = commit_round(stores, 0, 8)
    alice, bob = ledgers(stores)
    with pytest.raises(Unavailable, match="no leased"):
        alice.allocate(1, 256, "sae-a", ["sae-b"])
    start, _ = bob.allocate(1, 64, "sae-b", ["sae-a"])  # the head is now mid-block
    alice.apply(start)
    grant = bob.grant(40, 40)  # 40 bytes from byte 8: rounded up to the end of block 1
    assert (grant.start, grant.past) == ((0, 0, 8), (0, 1, BLOCK))
    alice.apply(grant)
    assert alice.lease() == bob.lease() == [((0, 0, 8), (0, 1, BLOCK), 2 * BLOCK - 8)]
    assert alice.lease_bytes() == bob.lease_bytes() == 2 * BLOCK - 8
    own, keys = bob.allocate(1, 256, "sae-b", ["sae-a"])  # Bob goes on after the lease
    assert own.start == (0, 1, BLOCK) and keys == [material[64:96]]
    alice.apply(own)
    later = bob.grant(1, 1000)  # at most half of the 5 blocks left (80 bytes), to a block end
    assert later.past == (0, 5, BLOCK)
    alice.apply(later)
    # 80 bytes: the 56 of the first lease, then 24 of the second, skipping Bob's block 2
    assignment, got = alice.allocate(2, 320, "sae-a", ["sae-b"])
    assert got == [material[8:48], material[48:64] + material[96:120]]
    assert bob.apply(assignment) == got
    assert alice.lease() == bob.lease() == [((0, 3, 24), (0, 5, BLOCK), 3 * BLOCK - 24)]
    assert same_pools(stores) and alice.head == bob.head == (0, 5, BLOCK)
    assert {k for k, _ in stores[0].committed_keys()} == {key_id("link", 0, i) for i in (3, 4, 5, 6, 7)}
    with pytest.raises(Unavailable, match="leased"):
        alice.allocate(1, 640, "sae-a", ["sae-b"])  # 72 leased bytes left, 80 asked: nothing taken
    assert alice.serial("alice") == 1 and alice.lease_bytes() == 3 * BLOCK - 24
    with pytest.raises(Unavailable):
        bob.grant(BLOCK * 3, BLOCK * 3)  # only 2 blocks are Bob's to lease


def test_an_entry_that_does_not_fit_is_refused_and_changes_nothing(stores: tuple[KeyStore, KeyStore]) -> None:
    commit_round(stores, 0, 4)
    alice, bob = ledgers(stores)
    first, _ = bob.allocate(1, 256, "b", ["a"])
    second, _ = bob.allocate(1, 256, "b", ["a"])
    with pytest.raises(Diverged, match="expected 1"):
        alice.apply(second)  # out of order
    alice.apply(first)
    with pytest.raises(Diverged, match="repeats a key ID"):
        alice.apply(dataclasses.replace(second, key_ids=first.key_ids))
    with pytest.raises(Diverged, match="starts at"):
        alice.apply(dataclasses.replace(second, start=(0, 0, 0)))
    with pytest.raises(Diverged, match="lacks"):
        alice.apply(dataclasses.replace(second, number=5))
    with pytest.raises(Diverged, match="cannot be applied"):
        bob.apply(second)  # Bob's own entry
    assert alice.serial("bob") == 1 and same_pools((stores[0], stores[0]))  # nothing of it stays
    alice.apply(second)
    grant = bob.grant(BLOCK, BLOCK)
    with pytest.raises(Diverged, match="does not fit"):
        alice.apply(Grant(grant.serial, grant.start, (0, 2, 16)))  # not at a block's end
    with pytest.raises(Diverged, match="does not fit"):
        alice.apply(Grant(grant.serial, grant.start, (0, 9, BLOCK)))  # beyond the pool
    alice.apply(grant)
    taken, _ = alice.allocate(1, 256, "a", ["b"])
    with pytest.raises(Diverged, match="starts at"):
        bob.apply(dataclasses.replace(taken, start=(0, 3, 0)))
    bob.apply(taken)
    assert same_pools(stores)


def test_entries_are_rebuilt_exactly_for_a_peer_that_lacks_them(stores: tuple[KeyStore, KeyStore]) -> None:
    commit_round(stores, 0, 8)
    alice, bob = ledgers(stores)
    written = [
        bob.allocate(3, 256, "b", ["a1", "a2"])[0],
        bob.grant(64, 64),
        bob.allocate(1, 128, "b", ["a"])[0],
    ]
    assert bob.entries_after(0) == written and bob.entries_after(2) == written[2:]
    for entry in bob.entries_after(0):
        alice.apply(entry)
    mine = alice.allocate(2, 256, "a", ["b"])[0]
    assert alice.entries_after(0) == [mine] and alice.entries_after(1) == []
    bob.apply(alice.entries_after(0)[0])
    assert same_pools(stores)


def test_key_ids_name_their_entry(stores: tuple[KeyStore, KeyStore]) -> None:
    for origin in ("alice", "bob"):
        text = make_key_id(origin, (1 << 48) - 1, 65535)
        assert uuid.UUID(text).version == 8 and key_origin(text) == (origin, (1 << 48) - 1)
    assert key_origin(str(uuid.uuid4())) is None
    assert key_origin("not a uuid") is None
    commit_round(stores, 0, 4)
    _, bob = ledgers(stores)
    assignment, _ = bob.allocate(3, 256, "b", ["a"])
    assert {key_origin(k) for k in assignment.key_ids} == {("bob", 1)} and len(set(assignment.key_ids)) == 3


def test_keys_go_to_the_named_slaves_once_each_and_to_nobody_else(stores: tuple[KeyStore, KeyStore]) -> None:
    commit_round(stores, 0, 4)
    alice, bob = ledgers(stores)
    assignment, keys = bob.allocate(2, 256, "sae-b", ["sae-a1", "sae-a2"])
    alice.apply(assignment)
    ids = list(assignment.key_ids)
    with pytest.raises(NotAuthorized):
        alice.take(ids, "sae-x", "sae-b")  # not named
    with pytest.raises(NotAuthorized):
        alice.take(ids, "sae-a1", "sae-other")  # named, but for another master
    with pytest.raises(UnknownKey):
        alice.take([*ids[:1], make_key_id("bob", 7, 0)], "sae-a1", "sae-b")
    assert alice.take(ids, "sae-a1", "sae-b") == keys
    with pytest.raises(UnknownKey, match="already delivered"):
        alice.take(ids[:1], "sae-a1", "sae-b")
    assert alice.waiting_keys() == 2
    assert alice.take(ids, "sae-a2", "sae-b") == keys
    assert alice.waiting_keys() == 0  # every named slave has them: the bytes are gone
    # at the master's site the keys went to the master; no slave can fetch them there
    with pytest.raises(NotAuthorized):
        bob.take(ids, "sae-a1", "sae-b")


def test_the_pool_count_follows_every_commit_and_cut(stores: tuple[KeyStore, KeyStore]) -> None:
    """available_bytes is kept as counters (O(1)); after every kind of step it equals a count of the
    blocks, at both sites, and a store written before the counters starts them from such a count."""
    alice, bob = ledgers(stores)
    rng = random.Random(7)

    def check() -> None:
        for store, ledger in zip(stores, (alice, bob), strict=True):
            assert ledger.available_bytes() == scan_available(store._db)

    check()
    for number in range(6):
        blocks = rng.randint(0, 5)
        rows = [(key_id("link", number, i), os.urandom(BLOCK)) for i in range(blocks)]
        stores[0].store_round(summary(number), rows, False, 1.0)  # Alice commits at once
        stores[1].store_round(summary(number), rows, True, 1.0)  # Bob holds it pending first
        check()
        if number % 2:
            stores[1].commit_round(number)
        else:
            stores[1].resolve([number])
        check()
        for _ in range(3):
            step = rng.choice(["bob", "grant", "alice"])
            try:
                if step == "bob":
                    entry, _ = bob.allocate(1, 8 * rng.randint(1, 40), "b", ["a"])
                elif step == "grant":
                    entry = bob.grant(rng.randint(1, 50), rng.randint(1, 80))
                else:
                    entry, _ = alice.allocate(1, 8 * rng.randint(1, 20), "a", ["b"])
            except Unavailable:
                continue
            (alice if entry.origin == "bob" else bob).apply(entry)
            check()
    stores[1]._db.execute("DELETE FROM meta WHERE name IN ('pool_bytes', 'delivery_cut_bytes')")
    reopened = KeyStore(stores[1].path.parent, "link")
    try:
        assert (
            reopened.ledger("bob").available_bytes() == bob.available_bytes() == scan_available(reopened._db)
        )
    finally:
        reopened.close()


def test_pending_rounds_are_not_key_material(stores: tuple[KeyStore, KeyStore]) -> None:
    commit_round(stores, 0, 1)
    stores[1].store_round(summary(1), [(key_id("link", 1, 0), os.urandom(BLOCK))], True, 1.0)
    _, bob = ledgers(stores)
    assert bob.available_bytes() == BLOCK
    with pytest.raises(Unavailable):
        bob.allocate(2, 256, "b", ["a"])
    with pytest.raises(Unavailable):
        bob.grant(BLOCK + 1, BLOCK + 1)


def test_a_store_with_the_records_of_the_old_key_channel_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.sqlite3")
    db.execute("CREATE TABLE delivery_assignments (serial INTEGER PRIMARY KEY)")
    with pytest.raises(InputError, match="keys/1"):
        KeyLedger(db, "bob")
    db.close()


def test_an_application_lost_with_the_machine_is_made_good_by_the_peer(
    stores: tuple[KeyStore, KeyStore], tmp_path: Path
) -> None:
    """Alice applies Bob's entries without waiting for the disk. The state a machine failure could leave
    — the database as it was before an application — reports a lower ``applied``, Bob's log has the
    entry again, and applying it gives the same pools."""
    commit_round(stores, 0, 4)
    alice, bob = ledgers(stores)
    first = bob.allocate(1, 256, "b", ["a"])[0]
    alice.apply(first)
    before = tmp_path / "before.db"
    stores[0]._db.execute("VACUUM INTO ?", (str(before),))  # what the disk held before the next apply
    second = bob.allocate(2, 256, "b", ["a"])[0]
    alice.apply(second)
    stores[0].close()
    db_path = tmp_path / "alice" / DATABASE
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    before.rename(db_path)
    restarted = KeyStore(tmp_path / "alice", "link")
    ledger = restarted.ledger("alice")
    assert ledger.serial("bob") == 1  # what the restarted site reports as applied in keys_hello
    for entry in bob.entries_after(ledger.serial("bob")):
        ledger.apply(entry)
    assert ledger.serial("bob") == 2
    assert same_pools((restarted, stores[1]))
    restarted.close()
