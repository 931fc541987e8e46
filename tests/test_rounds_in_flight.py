"""Several rounds in flight on one session (qkdp-v2.md §13, §16), engines joined in memory."""

from __future__ import annotations

from typing import Any

import pytest

from qkdd import engine, policy
from qkdd.errors import LocalProtocolError, RemoteProtocolError
from tests.helpers import ConnectionPair

SMALL = {"reserve_switch_bits": 1024, "reserve_bits_per_round": 1024, "reserve_target_bits": 8192}


def run_watching(pair: ConnectionPair, count: int) -> int:
    """Run ``count`` rounds as Alice's window allows; the most rounds open at once at either side."""
    most = 0
    step = pair.step

    def watched() -> bool:
        nonlocal most
        most = max(most, len(pair.alice.round_states), len(pair.bob.round_states))
        return step()

    pair.step = watched  # type: ignore[method-assign]
    pair.rounds(count)
    return most


@pytest.mark.parametrize("run_compute", ["now", "thread", "late"])
def test_rounds_in_flight_commit_in_order_with_equal_keys_and_no_pad_used_twice(
    run_compute: str, pads: list[tuple[int, int, str]]
) -> None:
    pair = ConnectionPair(window=3, **SMALL)
    pair.run_compute = run_compute
    pair.connect()
    assert pair.alice.window == pair.bob.window == 3
    most = run_watching(pair, 8)
    pair.join()
    assert most >= 2  # rounds did overlap
    for store in (pair.alice_store, pair.bob_store):
        assert list(store.committed) == sorted(store.committed) == list(range(8))  # stored in order
        assert not store.pending and not store.aborted
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}
    auths = [s.auth for s in pair.summaries["alice"]]
    assert auths[0] == "psk" and auths[-1] == "reserve"  # the reserve took over with rounds in flight
    assert [s.auth for s in pair.summaries["bob"]] == auths
    assert sum(what.endswith("tag") for *_, what in pads) == 3 * auths.count("reserve")


def test_the_session_window_is_the_smaller_sides_and_bob_refuses_a_round_beyond_it() -> None:
    pair = ConnectionPair(alice_window=4, bob_window=2)
    pair.connect()
    assert pair.alice.window == pair.bob.window == 2
    most = run_watching(pair, 5)
    assert most == 2
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}
    # an Alice that ignores the window: Bob refuses the third open round
    pair.alice._hs.window = 3
    pair.handle("alice", pair.alice.start_round())
    while not pair.alice.can_start_round:
        assert pair.step()
    pair.handle("alice", pair.alice.start_round())
    while not pair.alice.can_start_round:
        assert pair.step()
    pair.handle("alice", pair.alice.start_round())
    with pytest.raises(RemoteProtocolError, match="2 rounds are open already"):
        pair.run()


def test_alice_opens_a_round_only_when_the_open_ones_are_past_estimation() -> None:
    assert policy.may_start_round([], 1)
    assert not policy.may_start_round(["RECONCILING"], 1)
    assert policy.may_start_round(["RECONCILING", "COMMITTING"], 3)
    assert not policy.may_start_round(["RECONCILING", "ESTIMATING"], 3)
    assert not policy.may_start_round(["SIFTING"], 3)
    pair = ConnectionPair(window=2)
    pair.connect()
    pair.handle("alice", pair.alice.start_round())
    assert pair.alice.round_states == {0: engine.State.SIFTING} and not pair.alice.can_start_round
    with pytest.raises(LocalProtocolError, match="start_round is not allowed in state SIFTING"):
        pair.alice.start_round()


@pytest.mark.parametrize("aborter", ["alice", "bob"])
def test_an_aborted_round_among_rounds_in_flight_leaves_the_others_to_commit(aborter: str, pads: Any) -> None:
    pair = ConnectionPair(window=3, **SMALL)
    pair.connect()
    pair.rounds(4)  # into reserve rounds
    assert pair.alice.round_number is None and pair.alice._next_round == 4
    pair.handle("alice", pair.alice.start_round())
    while not pair.alice.can_start_round:
        assert pair.step()
    pair.handle("alice", pair.alice.start_round())  # rounds 4 and 5 open
    while len(pair.engine(aborter).round_states) < 2:
        assert pair.step()
    pair.handle(aborter, pair.engine(aborter).abort_round("operator request", 4))
    pair.run()
    for store in (pair.alice_store, pair.bob_store):
        assert 4 in store.aborted and 5 in store.committed
    pair.rounds(2)
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}
    assert pair.summaries["alice"][-1].auth == "reserve" and not pair.summaries["alice"][-1].aborted
