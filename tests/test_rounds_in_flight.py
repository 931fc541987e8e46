"""Several rounds in flight on one session (qkdp-v2.md §13, §16), engines joined in memory."""

from __future__ import annotations

from typing import Any

import pytest

from qkdd import engine, policy, rounds, wire
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


def test_alice_keeps_no_more_rounds_open_than_her_driver_allows_within_the_window() -> None:
    """A driver's limit (a short round trip: policy.rounds_to_open) lowers what Alice opens; it never
    raises it past the window, and Bob is not told (his window check is unchanged)."""
    pair = ConnectionPair(window=4, **SMALL)
    pair.connect()
    pair.alice.limit_open_rounds(2)
    assert pair.alice.open_limit == 2 and pair.bob.window == 4
    assert run_watching(pair, 6) == 2
    pair.alice.limit_open_rounds(9)
    assert pair.alice.open_limit == 4
    pair.alice.limit_open_rounds(0)
    assert pair.alice.open_limit == 1  # at least one round, whatever is asked
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}


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


def test_alice_opens_a_round_only_when_the_open_ones_are_past_sifting() -> None:
    assert policy.may_start_round([], 1, ended_one=False)
    assert not policy.may_start_round(["COMMITTING"], 3, ended_one=False)  # the first round runs alone
    assert policy.may_start_round([], 1)
    assert not policy.may_start_round(["RECONCILING"], 1)
    assert policy.may_start_round(["RECONCILING", "COMMITTING"], 3)
    assert policy.may_start_round(["RECONCILING", "ESTIMATING"], 3)
    assert not policy.may_start_round(["ESTIMATING", "SIFTING"], 3)
    assert not policy.may_start_round(["SIFTING"], 3)
    pair = ConnectionPair(window=2)
    pair.connect()
    pair.handle("alice", pair.alice.start_round())
    assert pair.alice.round_states == {0: engine.State.SIFTING} and not pair.alice.can_start_round
    with pytest.raises(LocalProtocolError, match="start_round is not allowed in state SIFTING"):
        pair.alice.start_round()


@pytest.mark.parametrize("sifter", ["alice", "bob"])
def test_a_round_s_sifting_is_work_its_frame_waits_for_while_the_other_rounds_go_on(sifter: str) -> None:
    """The heavy part of handling the peer's sifting frame is handed out as the frame arrives, and only
    that frame (and its round's later ones) waits for it: an earlier round commits meanwhile."""
    kind = "sift_announce" if sifter == "alice" else "sift_answer"
    pair = ConnectionPair(window=2)
    pair.connect()
    pair.round()  # a connection's first round runs alone
    pair.handle("alice", pair.alice.start_round())  # round 1
    while not pair.alice.can_start_round:
        assert pair.step()
    pair.defer = lambda role, action, number: (
        number == 2 and isinstance(action, engine.Compute) and action.kind == kind
    )
    pair.handle("alice", pair.alice.start_round())  # round 2, its sifting at the sifter held back
    pair.run()
    assert [(role, action.kind) for role, action in pair.deferred] == [(sifter, kind)]
    assert [message.type for _, message in pair.engine(sifter)._held] == [kind]
    assert pair.engine(sifter).round_states == {2: engine.State.SIFTING}
    # a frame held for work is released by its outcome only: another round's Cascade frame stays cheap
    cascade_frame = "cascade_ranges" if sifter == "alice" else "cascade_parities"
    assert pair.engine(sifter).cheap(wire.Message(cascade_frame, {"round": 3}))
    for store in (pair.alice_store, pair.bob_store):
        assert sorted(store.committed) == [0, 1]
    pair.release()
    pair.run()
    for store in (pair.alice_store, pair.bob_store):
        assert sorted(store.committed) == [0, 1, 2]
    assert pair.alice_store.key_map() == pair.bob_store.key_map()


def test_an_open_round_keeps_no_pulse_indices_once_sifted() -> None:
    """Memory per open round: nothing after sifting reads the pulse indices (8 bytes per sifted bit)."""
    pair = ConnectionPair()
    pair.connect()
    pair.handle("alice", pair.alice.start_round())
    while pair.bob.round_states != {0: engine.State.RECONCILING}:
        assert pair.step()
    for side in (pair.alice, pair.bob):
        sifted = side._rounds[0].sifted
        assert sifted is not None and sifted.bits.size > 0 and sifted.pulse_indices.size == 0
    pair.run()
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}


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


def test_a_round_start_waits_behind_a_held_frame_that_ends_a_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 1 yields no key: Alice sends an untagged amplify and drops it, which frees her window, while
    Bob's amplify of round 1 waits for his own work. Her next round_start waits behind it at Bob, so he
    counts the window after round 1 ended (found by review: he refused it as beyond the window)."""
    pair = ConnectionPair(window=2)
    pair.connect()
    secret_length = rounds.Round._secret_length

    def keyless_round_1(self: rounds.Round) -> int:
        if self.number == 1:
            self.length_reason = "no key, for the test"
            return 0
        return secret_length(self)

    monkeypatch.setattr(rounds.Round, "_secret_length", keyless_round_1)
    pair.defer = lambda role, action, number: (
        role == "bob" and number == 1 and getattr(action, "kind", "") == "amplification"
    )
    started = 0
    while True:
        if started < 4 and pair.alice.can_start_round:
            pair.handle("alice", pair.alice.start_round())
            started += 1
        elif not pair.step():
            if not pair.deferred:
                break
            assert any(message.type == "round_start" for _, message in pair.bob._held)  # it did wait
            # the round_start waits for a frame, not for work: a Cascade frame may release it, so none
            # is cheap (handled on the event loop) now
            assert not pair.bob.cheap(wire.Message("cascade_parities", {"round": 3}))
            pair.release()
    assert started == 4
    assert list(pair.alice_store.committed) == list(pair.bob_store.committed) == [0, 2, 3]
    assert 1 in pair.alice_store.aborted and 1 in pair.bob_store.aborted


def test_a_bound_just_over_one_block_yields_that_block_not_a_mismatch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alice's reserve share leaves a whole key block when the bound has room for one: the round yields
    it (found by review: she announced no output and Bob, expecting one block, closed the connection)."""
    assert policy.reserve_refill(276, 0, 1024, 8192, 256) == 20
    assert policy.output_bits(276, 20, 256) == 276
    assert policy.reserve_refill(200, 0, 1024, 8192, 256) == 50  # no block fits anyway
    pair = ConnectionPair(window=2)
    pair.connect()
    secret_length = rounds.Round._secret_length

    def one_block_and_a_bit(self: rounds.Round) -> int:
        if self.number == 1:
            self.length_reason = None
            return 256 + 20
        return secret_length(self)

    monkeypatch.setattr(rounds.Round, "_secret_length", one_block_and_a_bit)
    pair.rounds(3)
    assert list(pair.alice_store.committed) == list(pair.bob_store.committed) == [0, 1, 2]
    assert len(pair.alice_store.committed[1][1]) == 1
    assert pair.alice_store.key_map() == pair.bob_store.key_map()


def test_bob_gives_up_a_round_in_committing_by_closing_never_by_abort() -> None:
    """Alice may have committed it; an abort would let Bob commit later rounds around a pending one, and
    the reserves would then hold the rounds' bits in different orders (found by review)."""
    pair = ConnectionPair()
    pair.connect()
    pair.handle("alice", pair.alice.start_round())
    while pair.bob.state is not engine.State.COMMITTING:
        assert pair.step()
    with pytest.raises(LocalProtocolError, match="abort is not allowed in state COMMITTING"):
        pair.bob.abort_round("operator request")


def test_frames_held_for_earlier_rounds_are_bounded() -> None:
    """A peer that does not wait (authenticated: a man in the middle cannot pass the frame MACs) cannot
    make a session hold frames without end."""
    pair = ConnectionPair(window=2)
    pair.connect()
    pair.round()  # the connection's first round runs alone
    pair.handle("alice", pair.alice.start_round())
    while not pair.alice.can_start_round:
        assert pair.step()
    pair.handle("alice", pair.alice.start_round())
    while pair.alice.round_states.get(2) is not engine.State.RECONCILING:
        assert pair.step()
    pair.bob._send("confirm_result", round=2, matched=True)  # round 1 is not amplified yet: it waits
    for _ in range(engine.MAX_HELD):
        pair.bob._send("cascade_done", round=2, disclosed_bits=0, corrected_bits=0)
    frames = [action.frame for action in pair.bob._flush() if isinstance(action, engine.Send)]
    with pytest.raises(RemoteProtocolError, match=f"more than {engine.MAX_HELD} frames wait"):
        for frame in frames:
            (payload,) = wire.FrameDecoder().feed(frame)
            pair.alice.receive_frame(payload)
    assert pair.alice.state is engine.State.CLOSED


def test_the_peers_error_frame_closes_only_after_the_frames_it_sent_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alice ends a keyless round with an untagged amplify, then closes ("no more rounds"). Bob's amplify
    waits for his own work; the error frame behind it waits too, so the round ends at Bob as it did at
    Alice instead of being abandoned (a demo with --rounds 1 then never saw Bob stop)."""
    pair = ConnectionPair()
    pair.connect()

    def keyless(self: rounds.Round) -> int:
        self.length_reason = "no key, for the test"
        return 0

    monkeypatch.setattr(rounds.Round, "_secret_length", keyless)
    pair.defer = lambda role, action, number: role == "bob" and getattr(action, "kind", "") == "amplification"
    pair.handle("alice", pair.alice.start_round())
    pair.run()
    assert 0 in pair.alice_store.aborted and pair.deferred
    assert [message.type for _, message in pair.bob._held] == ["amplify"]
    closing = pair.alice.close("shutdown", "no more rounds")
    (payload,) = wire.FrameDecoder().feed(closing)
    assert pair.bob.receive_frame(payload) == []  # held behind the amplify, not yet closing
    assert pair.bob.holds_frames and pair.bob.round_states == {0: engine.State.AMPLIFYING}
    with pytest.raises(engine.PeerError, match="shutdown: no more rounds") as closed:
        pair.release()
    ended = [a for a in closed.value.actions if isinstance(a, engine.RoundEnded)]
    assert [(a.summary.round, a.disposition) for a in ended] == [(0, "aborted")]
    assert pair.bob.state is engine.State.CLOSED and not pair.bob.holds_frames


def test_the_peers_error_frame_with_nothing_held_closes_at_once() -> None:
    pair = ConnectionPair()
    pair.connect()
    (payload,) = wire.FrameDecoder().feed(pair.alice.close("shutdown", "no more rounds"))
    with pytest.raises(engine.PeerError, match="shutdown") as closed:
        pair.bob.receive_frame(payload)
    assert closed.value.actions == [] and pair.bob.state is engine.State.CLOSED
