"""Reserve-based authentication in the engine (qkdp-v2.md §16-§17), through the in-memory ConnectionPair."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import msgpack
import pytest

from qkdd import engine, spec, wire
from qkdd.errors import RemoteProtocolError
from tests.helpers import ConnectionPair

SMALL = {"reserve_switch_bits": 1024, "reserve_bits_per_round": 1024, "reserve_target_bits": 8192}


def pair_with(**kwargs: Any) -> ConnectionPair:
    pair = ConnectionPair(**{**SMALL, **kwargs})
    pair.connect()
    return pair


def no_bit_used_twice(pair: ConnectionPair) -> None:
    for store in (pair.alice_store, pair.bob_store):
        used = sorted(store.reserve.used)
        assert all(a[1] <= b[0] for a, b in pairwise(used)), used


def test_rounds_switch_from_psk_to_the_reserve() -> None:
    pair = pair_with()
    for _ in range(4):
        pair.round()
    auths = [s.auth for s in pair.summaries["alice"]]
    assert auths[0] == "psk" and auths[-1] == "reserve"
    assert [s.auth for s in pair.summaries["bob"]] == auths
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}
    assert pair.alice_store.reserve.chunks == pair.bob_store.reserve.chunks
    assert pair.alice_store.reserve.consumed == pair.bob_store.reserve.consumed > 128
    no_bit_used_twice(pair)


@pytest.mark.parametrize("run_compute", ["now", "thread", "late"])
def test_transcripts_hashed_while_waiting_give_the_same_tags(run_compute: str) -> None:
    """In reserve rounds both sides hash their transcripts as they grow (Compute after frames that
    leave a chunk unhashed, done at once, on threads, or only when no frame can move): every tag
    still verifies."""
    pair = pair_with(sim={"pulses_per_frame": 1 << 21})
    pair.run_compute = run_compute
    for _ in range(4):
        pair.round()
    pair.join()
    assert [s.auth for s in pair.summaries["alice"]][-2:] == ["reserve", "reserve"]
    assert not any(s.aborted for s in pair.summaries["alice"])
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}
    hashing = {role for role, kind in pair.kinds if kind == "transcripts"}
    assert hashing == {"alice", "bob"}  # both had transcripts to hash
    no_bit_used_twice(pair)


def reconnect(pair: ConnectionPair, **kwargs: Any) -> ConnectionPair:
    again = ConnectionPair(alice_store=pair.alice_store, bob_store=pair.bob_store, **{**SMALL, **kwargs})
    again.connect()
    return again


def keyed_link() -> ConnectionPair:
    """A link past its bootstrap: rounds filled the reserve on the first connection, the second (still
    PSK-authenticated) announced a handshake key, the third used it and retired the PSK."""
    pair = pair_with()
    for _ in range(4):
        pair.round()
    pair = reconnect(reconnect(pair))
    assert pair.alice.auth == "reserve" and pair.alice_store.psk_retired and pair.bob_store.psk_retired
    return pair


def test_a_reserve_handshake_retires_the_psk() -> None:
    first = pair_with()
    for _ in range(4):
        first.round()
    # the next connection still uses the PSK (there is no handshake key yet) and announces one
    second = reconnect(first)
    assert second.alice.auth == "psk" and not first.alice_store.psk_retired
    announced = second.alice_store.reserve.keys
    assert announced == second.bob_store.reserve.keys and (announced.current, announced.next) == (
        None,
        announced.next,
    )
    assert announced.next is not None and announced.next >= 128
    # the one after authenticates with that key, so the PSK no longer matters, and retires it
    third = reconnect(second, bob_psk=bytes(32))
    assert third.alice.auth == third.bob.auth == "reserve"
    assert first.alice_store.psk_retired and first.bob_store.psk_retired
    third.round()
    assert third.summaries["alice"][-1].auth == "reserve" and not third.summaries["alice"][-1].aborted
    assert third.alice_store.key_map() == third.bob_store.key_map()
    no_bit_used_twice(third)
    keys = third.alice_store.reserve.keys
    assert keys == third.bob_store.reserve.keys and (keys.current, keys.next) == (announced.next, None)


def test_handshake_keys_rotate_once_per_refill_and_never_on_reconnects() -> None:
    """§17: a new key is announced only after the reserve grew; connections that run no round, or that
    are cut after the handshake, spend no reserve bit and change no key."""
    pair = keyed_link()
    pair.round()
    pair = reconnect(pair)  # announces the next key (the reserve grew)
    announced = pair.alice_store.reserve.keys.next
    assert announced is not None
    pair = reconnect(pair)  # uses it: the older one retires
    keys, consumed = pair.alice_store.reserve.keys, pair.alice_store.reserve.consumed
    assert (keys.current, keys.next) == (announced, None)
    for _ in range(5):
        pair = reconnect(pair)
        assert pair.alice.auth == "reserve"
    assert pair.alice_store.reserve.keys == pair.bob_store.reserve.keys == keys
    assert pair.alice_store.reserve.consumed == consumed
    no_bit_used_twice(pair)


def test_a_tampered_frame_with_a_valid_session_mac_fails_the_transcript_tag() -> None:
    """Even an attacker who knows the per-frame MAC key cannot get a changed round accepted."""
    pair = pair_with()
    for _ in range(3):
        pair.round()
    assert pair.summaries["alice"][-1].auth == "reserve"
    pair.handle("alice", pair.alice.start_round())
    while not any(m == "sift_answer" for _, m in pair.log[-1:]):
        pair.step()
    (payload,) = wire.FrameDecoder().feed(pair.queues["bob"].pop())
    envelope = wire.decode_envelope(payload)
    body = msgpack.unpackb(envelope.body, raw=False)
    body["intensities"] = bytes([body["intensities"][0] ^ 0x40]) + body["intensities"][1:]  # not key bits
    forged = msgpack.packb(body, use_bin_type=True)
    mac = pair.alice._macs["alice"].tag(envelope.seq, forged)
    pair.queues["bob"].append(wire.encode_frame(envelope.seq, forged, mac))
    with pytest.raises(RemoteProtocolError) as caught:
        pair.run()
    assert caught.value.code == "bad-mac" and "transcript tag" in str(caught.value)
    assert not pair.bob_store.pending and pair.bob.state is engine.State.CLOSED


def test_the_reserve_running_dry_pauses_the_link_or_falls_back() -> None:
    for fallback in (False, True):
        filled = pair_with(fallback_to_psk=fallback)
        for _ in range(3):
            filled.round()
        filled = reconnect(reconnect(filled, fallback_to_psk=fallback), fallback_to_psk=fallback)
        # Alice stops refilling: every reserve round now only consumes
        pair = ConnectionPair(
            alice_store=filled.alice_store,
            bob_store=filled.bob_store,
            **{**SMALL, "alice_reserve_bits_per_round": 0, "fallback_to_psk": fallback},
        )
        pair.connect()
        if not fallback:
            with pytest.raises(engine.ReserveExhausted, match="the link pauses"):
                for _ in range(60):
                    pair.round()
            assert pair.alice.state is engine.State.IDLE  # paused, not broken
            no_bit_used_twice(pair)
        else:
            for _ in range(30):
                pair.round()
            assert pair.summaries["alice"][-1].auth == "session"  # the frame MACs of a reserve handshake
            assert pair.alice_store.key_map() == pair.bob_store.key_map()


def test_a_restored_state_directory_is_refused_without_changing_anything() -> None:
    first = keyed_link()
    backup = first.alice_store.reserve.keys  # Alice's state directory is backed up here
    first.round()
    again = reconnect(first)  # announces a new key (the reserve grew)
    again.round()
    again = reconnect(again)  # and uses it: the backup's key is retired at both sides
    assert not set(backup.positions()) & set(again.bob_store.reserve.keys.positions())
    first.alice_store.reserve.keys = backup  # and restored
    bob_before = (again.bob_store.reserve.keys, again.bob_store.reserve.consumed)
    for _ in range(3):  # it stays refused: a restore is not healed by retrying
        stale = ConnectionPair(alice_store=first.alice_store, bob_store=first.bob_store, **SMALL)
        with pytest.raises(RemoteProtocolError) as caught:
            stale.connect()
        assert caught.value.code == "stale-state" and "restored from a backup" in str(caught.value)
        assert (again.bob_store.reserve.keys, again.bob_store.reserve.consumed) == bob_before


def test_a_crash_between_tags_never_reuses_a_pad() -> None:
    pair = pair_with()
    for _ in range(3):
        pair.round()
    pair.handle("alice", pair.alice.start_round())
    while not any(m == "amplify" for _, m in pair.log[-1:]):
        pair.step()
    # Alice consumed the pad of her amplify tag; the frame is lost with the connection
    assert pair.alice_store.reserve.consumed > pair.bob_store.reserve.consumed
    again = ConnectionPair(alice_store=pair.alice_store, bob_store=pair.bob_store, **SMALL)
    again.connect()
    again.round()
    assert again.summaries["alice"][-1].auth == "reserve" and not again.summaries["alice"][-1].aborted
    assert again.alice_store.key_map() == again.bob_store.key_map()
    for store in (again.alice_store, again.bob_store):
        spans = sorted(store.reserve.used)
        assert all(a[1] <= b[0] for a, b in pairwise(spans))


@pytest.mark.parametrize("flip", range(0, 115, 9))
def test_flipping_any_bit_of_any_frame_of_a_reserve_round_is_detected(flip: int) -> None:
    """Record the frames of a reserve round; flip one bit of the flip-th frame: the round is refused."""
    pair = pair_with()
    for _ in range(3):
        pair.round()
    assert pair.summaries["alice"][-1].auth == "reserve"
    keys_before = pair.alice_store.key_map()
    pair.handle("alice", pair.alice.start_round())
    delivered = 0
    while any(pair.queues.values()):
        role = "alice" if pair.queues["alice"] else "bob"
        frame = bytearray(pair.queues[role].pop(0))
        if delivered == flip:
            bit = (flip * 7919) % (8 * len(frame))
            frame[bit // 8] ^= 0x80 >> (bit % 8)
            try:
                (payload,) = wire.FrameDecoder().feed(bytes(frame))
            except (RemoteProtocolError, ValueError):
                return  # the length prefix broke: the framing layer refuses it and the connection closes
            with pytest.raises(RemoteProtocolError):
                pair.handle(role, pair.engine(role).receive_frame(payload))
            assert pair.engine(role).state is engine.State.CLOSED
            assert pair.alice_store.key_map() == keys_before or pair.bob_store.pending
            return
        (payload,) = wire.FrameDecoder().feed(bytes(frame))
        pair.handle(role, pair.engine(role).receive_frame(payload))
        delivered += 1
    pytest.skip(f"the round had only {delivered} frames")


def test_a_stranger_cannot_make_bob_spend_reserve_bits() -> None:
    first = keyed_link()
    consumed = first.bob_store.reserve.consumed
    # a stranger who knows nothing of the reserve sends a hello offering reserve authentication, then junk
    stranger = ConnectionPair(alice_store=first.alice_store, bob_store=first.bob_store, **SMALL)
    stranger.handle("bob", stranger.bob.initiate())
    stranger.handle("alice", stranger.alice.initiate())
    (hello,) = stranger.queues["bob"]
    (payload,) = wire.FrameDecoder().feed(hello)
    stranger.handle("bob", stranger.bob.receive_frame(payload))
    assert stranger.bob.auth == "reserve"
    forged = wire.encode_frame(1, wire.encode_message("auth", proof=bytes(16), certificate=b"", kex=b""))
    with pytest.raises(RemoteProtocolError) as caught:
        stranger.bob.receive_frame(wire.FrameDecoder().feed(forged)[0])
    assert caught.value.code == "auth-failed"
    assert first.bob_store.reserve.consumed == consumed


def test_fallback_to_psk_keeps_a_dry_link_running_on_session_authentication() -> None:
    second = first = keyed_link()
    assert first.alice_store.psk_retired and second.alice.auth == "reserve"
    # the reserve is gone (say, a long outage): the handshake key still authenticates the connection,
    # but no round can pay for its tags, so the link pauses...
    for store in (first.alice_store, first.bob_store):
        store.reserve.consume(store.reserve.total_bits)
    stuck = reconnect(second)
    assert stuck.alice.auth == "reserve"
    with pytest.raises(engine.ReserveExhausted):
        stuck.round()
    # ...unless both allow rounds authenticated by the session's frame MACs alone
    again = reconnect(stuck, fallback_to_psk=True)
    again.round()
    assert again.summaries["alice"][-1].auth == "session" and not again.summaries["alice"][-1].aborted
    assert again.alice_store.key_map() == again.bob_store.key_map()
    # a Bob that does not allow it refuses such a round
    for store in (first.alice_store, first.bob_store):
        store.reserve.consume(store.reserve.total_bits)
    refused = reconnect(again, alice_fallback_to_psk=True)
    refused.handle("alice", refused.alice.start_round())
    with pytest.raises(RemoteProtocolError, match="fallback_to_psk"):
        refused.run()


@pytest.mark.parametrize(
    ("aborter", "state"),
    [
        (role, s)
        for role in ("alice", "bob")
        for s in spec.load().states[role]
        if s in spec.load().round_states and spec.load().allowed(role, s, "abort")
    ],
)
def test_an_abort_in_any_state_of_a_reserve_round_keeps_both_pads_in_step(aborter: str, state: str) -> None:
    """A tagged frame the peer sent before it saw our abort is discarded; a tagged amplify takes its tag
    slot at both sides: the next reserve round's tags take the same pads at both sides and verify (found
    by `qkdd conform`, abort in COMMITTING)."""
    pair = pair_with()
    for _ in range(3):
        pair.round()
    assert pair.summaries["alice"][-1].auth == "reserve"
    pair.handle("alice", pair.alice.start_round())
    while pair.engine(aborter).state.value != state:
        assert pair.step(), f"{aborter} never reached {state}"
    pair.handle(aborter, pair.engine(aborter).abort_round("operator request"))
    pair.run()
    assert pair.alice.state is pair.bob.state is engine.State.IDLE
    assert pair.alice._pointer == pair.bob._pointer  # the next tag slot
    pair.round()
    assert pair.summaries["alice"][-1].auth == "reserve" and not pair.summaries["alice"][-1].aborted
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}
    no_bit_used_twice(pair)
