"""Rounds in flight under random aborts, slow work and cut connections (found sound by review; kept as a
net): no pad is used twice, the keys and the reserves agree, and no tag fails (qkdp-v2.md §13, §16)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from qkdd import engine
from qkdd.errors import RemoteProtocolError
from qkdd.loopback import MemoryStore
from tests.conftest import STRESS
from tests.helpers import ConnectionPair

SMALL = {"reserve_switch_bits": 1024, "reserve_bits_per_round": 1024, "reserve_target_bits": 8192}
SEEDS = range(40 if STRESS else 4)


def _drive(pair: ConnectionPair, rng: random.Random, rounds: int, steps: int) -> str | None:
    """Up to ``steps`` moves: open rounds as the window allows, abort an open round now and then (never
    Bob in COMMITTING), hand slow work back in any order, deliver frames. The protocol error, if any."""
    pair.defer = lambda role, action, number: isinstance(action, engine.Compute) and rng.random() < 0.3
    started = 0
    for _ in range(steps):
        try:
            if started < rounds and pair.alice.can_start_round:
                pair.handle("alice", pair.alice.start_round())
                started += 1
                continue
            if rng.random() < 0.003:
                role = rng.choice(["alice", "bob"])
                open_ = [
                    number
                    for number, state in pair.engine(role).round_states.items()
                    if not (role == "bob" and state is engine.State.COMMITTING)
                ]
                if open_:
                    pair.handle(role, pair.engine(role).abort_round("fuzz", rng.choice(open_)))
                    continue
            if pair.deferred and rng.random() < 0.2:
                role, action = pair.deferred.pop(rng.randrange(len(pair.deferred)))
                pair.complete(role, action, action.run(pair.links[role]))
                continue
            if not pair.step():
                if not pair.deferred:
                    return None
                pair.release()
        except RemoteProtocolError as error:
            return f"{error.code}: {error}"
    return None


@pytest.mark.parametrize("seed", SEEDS)
def test_random_aborts_and_slow_work_keep_tags_and_keys_in_step(seed: int, pads: Any) -> None:
    pair = ConnectionPair(window=3, **SMALL)
    pair.connect()
    pair.rounds(4)  # into reserve rounds
    assert _drive(pair, random.Random(seed), rounds=12, steps=200_000) is None
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}
    assert pair.alice_store.reserve.chunks == pair.bob_store.reserve.chunks


@pytest.mark.parametrize("seed", SEEDS)
def test_random_cuts_leave_equal_keys_and_reserves_and_the_link_goes_on(seed: int, pads: Any) -> None:
    rng = random.Random(1000 + seed)
    alice, bob = MemoryStore(), MemoryStore()
    for _ in range(6):  # each connection cut after a random number of moves: what was in flight is lost
        pair = ConnectionPair(window=3, alice_store=alice, bob_store=bob, **SMALL)
        pair.connect()
        error = _drive(pair, rng, rounds=6, steps=rng.randrange(20, 600))
        assert error is None or ("tag" not in error and "bad-mac" not in error), error
    final = ConnectionPair(window=3, alice_store=alice, bob_store=bob, **SMALL)
    final.connect()
    final.rounds(2)
    assert alice.key_map() == bob.key_map() != {}
    assert list(alice.reserve.chunks.items()) == list(bob.reserve.chunks.items())  # in the same order
    assert not bob.pending
