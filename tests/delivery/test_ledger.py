"""The ledger: Bob allocates, Alice applies, both cut the same bytes; rollback, erasure, hand-out rules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdd.delivery.ledger import Diverged, KeyLedger, NotAuthorized, Unavailable, UnknownKey
from qkdd.records import RoundSummary, key_id
from qkdd.store import KeyStore

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


def test_both_sides_cut_the_same_bytes_across_blocks_and_rounds(stores: tuple[KeyStore, KeyStore]) -> None:
    material = commit_round(stores, 0, 3) + commit_round(stores, 1, 2)
    alice, bob = ledgers(stores)
    assert alice.available_bytes() == bob.available_bytes() == 5 * BLOCK
    first, keys = bob.allocate("alice", 3, 136, "sae-a", ["sae-b"])  # 17-byte keys straddle blocks
    assert keys == [material[i * 17 : (i + 1) * 17] for i in range(3)]
    assert alice.apply(first) == keys
    bob.finalize(first.serial)
    second, more = bob.allocate("bob", 2, 256, "sae-b", ["sae-a"])
    assert second.start == (0, 1, 51 - BLOCK)
    assert more == [material[51:83], material[83:115]]
    assert alice.apply(second) == more
    assert alice.head == bob.head
    assert alice.available_bytes() == 5 * BLOCK - 115 == bob.available_bytes() + 0
    with pytest.raises(Unavailable):
        bob.allocate("bob", 2, 256, "sae-b", ["sae-a"])  # 45 bytes left, 64 asked
    assert bob.serial == 2  # a refused allocation takes nothing


def test_material_is_erased_once_final_and_not_before(stores: tuple[KeyStore, KeyStore]) -> None:
    commit_round(stores, 0, 2)
    alice, bob = ledgers(stores)
    assignment, _ = bob.allocate("alice", 1, 384, "sae-a", ["sae-b"])  # 48 bytes: block 0 and half of 1
    assert stores[1].statistics().stored_keys == 2  # offered: Bob keeps the material for a rollback
    alice.apply(assignment)
    assert stores[0].statistics().stored_keys == 1  # Alice erased block 0 at once
    remaining = dict(stores[0].committed_keys())
    assert next(iter(remaining.values()))[:16] == bytes(16)  # the used half of block 1 is zeroed
    bob.finalize(assignment.serial)
    assert dict(stores[1].committed_keys()) == remaining


def test_rollback_returns_unapplied_assignments_to_the_pool(stores: tuple[KeyStore, KeyStore]) -> None:
    material = commit_round(stores, 0, 4)
    alice, bob = ledgers(stores)
    first, _ = bob.allocate("alice", 1, 256, "a", ["b"])
    alice.apply(first)
    lost, _ = bob.allocate("bob", 2, 256, "b", ["a"])  # never reaches Alice
    assert bob.rollback(alice.serial) == [lost.serial]
    assert bob.serial == alice.serial == 1 and bob.head == alice.head
    assert bob.is_final(first.serial)
    with pytest.raises(UnknownKey):
        bob.take([lost.key_ids[0]], "a", "b")
    again, keys = bob.allocate("bob", 2, 256, "b", ["a"])
    assert keys == [material[32:64], material[64:96]]  # the same bytes, under new IDs, once
    assert set(again.key_ids).isdisjoint(lost.key_ids)
    assert alice.apply(again) == keys


def test_alice_refuses_an_assignment_that_does_not_fit_her_pool(stores: tuple[KeyStore, KeyStore]) -> None:
    commit_round(stores, 0, 2)
    alice, bob = ledgers(stores)
    first, _ = bob.allocate("alice", 1, 256, "a", ["b"])
    second, _ = bob.allocate("alice", 1, 256, "a", ["b"])
    with pytest.raises(Diverged, match="expected 1"):
        alice.apply(second)  # out of order
    alice.apply(first)
    with pytest.raises(Diverged, match="repeats a key ID"):
        alice.apply(type(second)(**{**_fields(second), "key_ids": first.key_ids}))
    with pytest.raises(Diverged, match="starts at"):
        alice.apply(type(second)(**{**_fields(second), "start": (0, 0, 0)}))
    with pytest.raises(Diverged, match="lacks"):
        alice.apply(type(second)(**{**_fields(second), "number": 5}))
    assert alice.serial == 1  # nothing of a refused assignment stays
    with pytest.raises(Diverged):
        bob.rollback(5)  # Alice claims more than Bob ever allocated: a restored store


def _fields(assignment: object) -> dict[str, object]:
    return {name: getattr(assignment, name) for name in assignment.__slots__}  # type: ignore[attr-defined]


def test_keys_go_to_the_named_slaves_once_each_and_to_nobody_else(stores: tuple[KeyStore, KeyStore]) -> None:
    commit_round(stores, 0, 4)
    alice, bob = ledgers(stores)
    assignment, keys = bob.allocate("bob", 2, 256, "sae-b", ["sae-a1", "sae-a2"])
    alice.apply(assignment)
    ids = list(assignment.key_ids)
    with pytest.raises(NotAuthorized):
        alice.take(ids, "sae-x", "sae-b")  # not named
    with pytest.raises(NotAuthorized):
        alice.take(ids, "sae-a1", "sae-other")  # named, but for another master
    with pytest.raises(UnknownKey):
        alice.take([*ids[:1], "00000000-0000-4000-8000-000000000000"], "sae-a1", "sae-b")
    assert alice.take(ids, "sae-a1", "sae-b") == (keys, [])
    with pytest.raises(UnknownKey, match="already delivered"):
        alice.take(ids[:1], "sae-a1", "sae-b")
    assert alice.waiting_keys() == 2
    assert alice.take(ids, "sae-a2", "sae-b") == (keys, [])
    assert alice.waiting_keys() == 0  # every named slave has them: the bytes are gone
    # at the master's site the keys went to the master; no slave can fetch them there
    with pytest.raises(NotAuthorized):
        bob.take(ids, "sae-a1", "sae-b")


def test_a_slave_waits_for_an_offered_assignment(stores: tuple[KeyStore, KeyStore]) -> None:
    commit_round(stores, 0, 2)
    alice, bob = ledgers(stores)
    assignment, keys = bob.allocate("alice", 1, 256, "sae-a", ["sae-b"])
    assert bob.take(list(assignment.key_ids), "sae-b", "sae-a") == ([], [assignment.serial])
    alice.apply(assignment)
    bob.finalize(assignment.serial)
    assert bob.take(list(assignment.key_ids), "sae-b", "sae-a") == (keys, [])


def test_pending_rounds_are_not_key_material(stores: tuple[KeyStore, KeyStore]) -> None:
    commit_round(stores, 0, 1)
    stores[1].store_round(summary(1), [(key_id("link", 1, 0), os.urandom(BLOCK))], True, 1.0)
    _, bob = ledgers(stores)
    assert bob.available_bytes() == BLOCK
    with pytest.raises(Unavailable):
        bob.allocate("bob", 2, 256, "b", ["a"])
