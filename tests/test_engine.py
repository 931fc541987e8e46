"""The protocol engine of both roles, through an in-memory ConnectionPair (qkdp-v2.md §9–§14)."""

from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdd import engine, rounds, spec, wire
from qkdd.errors import LocalProtocolError, RemoteProtocolError
from qkdd.stages import amplify, confirm
from tests.helpers import ConnectionPair, make_engine

ROLES = ("alice", "bob")


def other(role: str) -> str:
    return "bob" if role == "alice" else "alice"


def forge(pair: ConnectionPair, sender: str, name: str, **fields: Any) -> bytes:
    """A frame ``sender`` could have sent: right sequence number and MAC."""
    source = pair.engine(sender)
    source._send(name, **fields)
    (action,) = source._flush()
    assert isinstance(action, engine.Send)
    return action.frame


def deliver(pair: ConnectionPair, role: str, frame: bytes) -> list[engine.Action]:
    (payload,) = wire.FrameDecoder().feed(frame)
    return pair.engine(role).receive_frame(payload)


def error_of(frame: bytes | None) -> dict[str, Any]:
    assert frame is not None
    (payload,) = wire.FrameDecoder().feed(frame)
    message = wire.decode_message(wire.decode_envelope(payload).body)
    assert message.type == "error"
    return dict(message.fields)


def test_honest_rounds_store_identical_keys_and_ids() -> None:
    pair = ConnectionPair()
    pair.connect()
    assert pair.alice.state is engine.State.IDLE and pair.bob.state is engine.State.IDLE
    assert pair.alice.version == pair.bob.version == 2
    for _ in range(3):
        pair.round()
    alice_keys, bob_keys = pair.alice_store.key_map(), pair.bob_store.key_map()
    assert alice_keys == bob_keys and len(alice_keys) > 10
    assert all(len(key) == 32 for key in alice_keys.values())
    assert sorted(pair.alice_store.committed) == sorted(pair.bob_store.committed) == [0, 1, 2]
    assert not pair.bob_store.pending
    summary = pair.summaries["alice"][-1]
    assert summary.secret_bits == 256 * len(pair.alice_store.committed[2][1]) > 0
    assert summary == pair.summaries["bob"][-1]
    assert summary.auth in ("psk", "reserve") and 0 < summary.qber < 0.03


@pytest.mark.parametrize("run_compute", ["now", "thread", "late"])
def test_work_goes_out_after_the_frames_it_overlaps_and_either_way_the_keys_agree(run_compute: str) -> None:
    """Each side's sifting goes out (urgent) as the peer's sifting frame arrives, before its handling;
    Alice's early hash and key IDs go out with her estimate answer (while Bob reconciles) and the
    cutting of her blocks with "amplify" (while Bob hashes his); Bob's range parities of the passes he
    starts (urgent) and his key IDs with his first Cascade flight, his key transform (urgent) with
    "cascade_done" (while the confirmation runs). Done at once, on threads, or only once no frame can
    move (frames then wait for it): the same keys."""
    pair = ConnectionPair()
    pair.run_compute = run_compute
    pair.connect()
    pair.round()
    pair.round()
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {} and not pair.later
    expected: list[tuple[str, int, bool]] = []
    for i, entry in enumerate(pair.log):
        if entry in (("bob", "sift_announce"), ("alice", "sift_answer")):
            expected.append(("alice" if entry[0] == "bob" else "bob", i + 1, True))
        elif entry == ("alice", "estimate_answer"):  # Bob's first flight follows it, then his work
            end = i + 1
            while pair.log[end][0] == "bob":
                end += 1
            expected += [("alice", i + 1, False)] * 2 + [("bob", end, True), ("bob", end, False)]
        elif entry == ("alice", "amplify"):
            expected.append(("alice", i + 1, False))
        elif entry == ("bob", "cascade_done"):
            expected.append(("bob", i + 1, True))
    assert len(expected) == 16
    if run_compute == "now":
        assert pair.computes == sorted(expected, key=lambda entry: entry[1])
    else:  # the same work; Alice's blocks go out once her hash is back, which may be after more frames
        assert sorted((role, urgent) for role, _, urgent in pair.computes) == sorted(
            (role, urgent) for role, _, urgent in expected
        )


def test_a_frame_waits_for_the_work_its_handling_needs_and_later_frames_wait_behind_it() -> None:
    pair = ConnectionPair()
    pair.run_compute = "late"
    pair.connect()
    pair.handle("alice", pair.alice.start_round())
    assert pair.bob.state is engine.State.IDLE and not pair.queues["bob"]  # Alice waits for her link
    while pair.bob.state is not engine.State.RECONCILING:
        assert pair.step()
    assert any(job.kind == "parities" for job in pair.bob._jobs.values())
    while not pair.bob._held:  # Alice's answers come (work is done only once no frame can move)
        assert pair.step()
    assert pair.bob._held[0][1].type == "cascade_parities"
    while pair.queues["bob"]:
        assert pair.step()
    assert len(pair.bob._held) > 1  # the answers after it wait behind it
    pair.run()
    assert not pair.bob._held
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}


def test_alice_hashes_afresh_when_her_early_bound_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alice hashes early to the §8 bound with nothing disclosed, which no output can exceed. Should an
    output exceed it anyway, she hashes again to the right length: the keys still agree."""
    bound = rounds._length_bound

    def short_when_early(*args: Any) -> Any:
        length = bound(*args)
        if args[-1] == confirm.TAG_BITS:  # the early call
            return dataclasses.replace(length, secret_bits=length.secret_bits // 2)
        return length

    monkeypatch.setattr(rounds, "_length_bound", short_when_early)
    pair = ConnectionPair()
    pair.connect()
    pair.round()
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}


def test_a_failure_in_early_work_surfaces_where_its_result_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # Alice's hashing, on a Compute thread, fails; Bob's, on the main thread, does not
    hash_on_main_thread = amplify.toeplitz_hash

    def failing(key: Any, seed: Any, output_bits: int, **options: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            return hash_on_main_thread(key, seed, output_bits, **options)
        raise LocalProtocolError("Toeplitz FFT rounding error too large; refusing to produce a key")

    pair = ConnectionPair()
    pair.run_compute = "thread"
    pair.connect()
    monkeypatch.setattr(amplify, "toeplitz_hash", failing)
    with pytest.raises(LocalProtocolError, match="rounding error"):
        pair.round()
    pair.join()
    # Alice commits nothing; Bob holds the round only as pending, which the next handshake drops (§13)
    assert not pair.alice_store.committed and not pair.bob_store.committed


def test_bob_hashes_from_the_key_transform_he_prepared_during_the_confirmation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prepared: list[amplify.PreparedKey] = []
    used: list[amplify.PreparedKey | None] = []
    prepare, hash_prepared = amplify.prepare_key, amplify.hash_prepared

    def recording_prepare(key: Any, most: int, **options: Any) -> amplify.PreparedKey:
        prepared.append(prepare(key, most, **options))
        return prepared[-1]

    def recording_hash(key: amplify.PreparedKey, seed: Any, output_bits: int, **options: Any) -> Any:
        used.append(key)
        return hash_prepared(key, seed, output_bits, **options)

    monkeypatch.setattr(amplify, "prepare_key", recording_prepare)
    monkeypatch.setattr(amplify, "hash_prepared", recording_hash)
    pair = ConnectionPair()
    pair.run_compute = "thread"
    pair.connect()
    pair.round()
    pair.join()
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}
    (summary,) = pair.summaries["bob"]
    assert used == prepared and len(prepared) == 1  # Bob's hash: from his transform, once
    assert summary.secret_bits <= prepared[0].max_output_bits <= prepared[0].input_bits < summary.sifted_bits


def test_a_failure_in_bobs_early_transform_stops_the_round_where_he_hashes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing(key: Any, most: int, **options: Any) -> Any:
        raise LocalProtocolError("Toeplitz FFT rounding error too large; refusing to produce a key")

    monkeypatch.setattr(amplify, "prepare_key", failing)
    pair = ConnectionPair()
    pair.run_compute = "thread"
    pair.connect()
    with pytest.raises(LocalProtocolError, match="rounding error"):
        pair.round()
    pair.join()
    assert not pair.alice_store.committed and not pair.bob_store.committed


def test_key_blocks_and_ids_are_deterministic_per_link_round_and_index() -> None:
    first, second = ConnectionPair(), ConnectionPair(link_id="other-link")
    for pair in (first, second):
        pair.connect()
        pair.round()
    assert not set(first.alice_store.key_map()) & set(second.alice_store.key_map())


def test_eavesdropper_on_every_pulse_aborts_and_stores_nothing() -> None:
    pair = ConnectionPair(sim={"eve_fraction": 1.0})
    pair.connect()
    pair.round()
    assert not pair.alice_store.key_map() and not pair.bob_store.key_map()
    (summary,) = pair.summaries["alice"]
    assert summary.aborted and "exceeds threshold" in (summary.reason or "")
    assert pair.alice.state is pair.bob.state is engine.State.IDLE


@pytest.mark.parametrize("aborter", ROLES)
def test_abort_in_every_round_state_drops_the_round_on_both_sides(aborter: str) -> None:
    for steps in range(0, 14):
        pair = ConnectionPair()
        pair.connect()
        pair.handle("alice", pair.alice.start_round())
        for _ in range(steps):  # deliver a few frames, then abort
            pair.step()
        if pair.engine(aborter).state.value in spec.load().round_states:
            pair.handle(aborter, pair.engine(aborter).abort_round("operator request"))
        pair.run()
        assert pair.alice.state is pair.bob.state is engine.State.IDLE
        assert pair.alice_store.key_map() == pair.bob_store.key_map()
        assert not pair.bob_store.pending
        pair.round()  # and the link goes on
        assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}


def test_version_negotiation_picks_the_highest_common_version() -> None:
    alice, _ = make_engine("alice", versions=(1, 2, 3))
    bob, _ = make_engine("bob", versions=(1, 3))
    for e in (alice, bob):
        e.initiate()
    hello_alice = wire.encode_frame(0, alice._hs.hellos["alice"])
    bob.receive_frame(wire.FrameDecoder().feed(hello_alice)[0])
    assert bob.version == 3


def test_no_common_version_sends_an_error_listing_ours() -> None:
    alice, _ = make_engine("alice", versions=(7,))
    bob, _ = make_engine("bob")
    alice.initiate()
    bob.initiate()
    with pytest.raises(RemoteProtocolError) as caught:
        bob.receive_frame(wire.FrameDecoder().feed(wire.encode_frame(0, alice._hs.hellos["alice"]))[0])
    assert caught.value.code == "version-mismatch"
    assert error_of(caught.value.frame)["versions"] == [2]
    assert bob.state is engine.State.CLOSED


def test_the_engine_says_what_became_of_the_round_a_connection_ends_in() -> None:
    """Bob's round stored pending stays pending when the connection ends (the driver logs it so, not as
    'nothing stored'); Alice's, not yet committed, is abandoned."""
    pair = ConnectionPair()
    pair.connect()
    assert pair.alice.unfinished_round is None
    pair.handle("alice", pair.alice.start_round())
    while not any(m == "commit" for _, m in pair.log):
        pair.step()
    number = pair.alice.round_number
    assert number is not None and pair.bob_store.pending
    pair.bob.close("shutdown", "test")
    pair.alice.close("shutdown", "test")
    assert pair.bob.unfinished_round == (number, True)
    assert pair.alice.unfinished_round == (number, False)


@pytest.mark.parametrize("field", ["certificate", "kex"])
def test_a_psk_auth_carrying_pki_fields_is_refused(field: str) -> None:
    """§18: certificate and kex belong to PKI proofs; no PSK (or handshake-key) proof covers them."""
    pair = ConnectionPair()
    pair.handle("alice", pair.alice.initiate())
    pair.handle("bob", pair.bob.initiate())
    pair.step()  # Alice's hello to Bob: he answers with his PSK proof
    pair.step()  # Bob's hello to Alice: she proves too
    (auth,) = [f for f in pair.queues["bob"] if b"auth" in f]
    pair.queues["bob"] = [rewrite_body(auth, **{field: b"x" * 16})]
    with pytest.raises(RemoteProtocolError, match="certificate or a key exchange") as caught:
        pair.run()
    assert caught.value.code == "bad-message"


def rewrite_body(frame: bytes, **fields: Any) -> bytes:
    (payload,) = wire.FrameDecoder().feed(frame)
    envelope = wire.decode_envelope(payload)
    body = msgpack.unpackb(envelope.body, raw=False)
    body.update(fields)
    return wire.encode_frame(envelope.seq, msgpack.packb(body, use_bin_type=True), envelope.mac)


def test_a_qkdp1_hello_gets_a_clean_version_mismatch() -> None:
    """§10: the versions are checked before the fields, which differ between versions."""
    bob, _ = make_engine("bob")
    bob.initiate()
    v1_hello = msgpack.packb(
        {
            "type": "hello",
            "versions": [1],
            "capabilities": ["psk", "keepalive"],
            "role": "alice",
            "link_id": "test-link",
            "nonce": bytes(32),
            "reserve_total": 4096,
            "reserve_consumed": 128,
        },
        use_bin_type=True,
    )
    with pytest.raises(RemoteProtocolError) as caught:
        bob.receive_frame(wire.FrameDecoder().feed(wire.encode_frame(0, v1_hello))[0])
    assert caught.value.code == "version-mismatch"
    assert error_of(caught.value.frame)["versions"] == [2]
    # a malformed hello of our own version is still a plain bad-message
    bob, _ = make_engine("bob")
    bob.initiate()
    with pytest.raises(RemoteProtocolError) as caught:
        bob.receive_frame(
            wire.FrameDecoder().feed(wire.encode_frame(0, v1_hello.replace(b"\x91\x01", b"\x91\x02")))[0]
        )
    assert caught.value.code == "bad-message"


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"bob_psk": bytes(32)}, "auth-failed"),
        ({"bob_link_id": "another"}, "wrong-peer"),
        ({"bob_qber_threshold": 0.1}, "config-mismatch"),
        ({"bob_key_block_bits": 128}, "config-mismatch"),
    ],
)
def test_handshake_refusals(kwargs: dict[str, Any], code: str) -> None:
    pair = ConnectionPair(**kwargs)
    with pytest.raises(RemoteProtocolError) as caught:
        pair.connect()
    assert caught.value.code == code
    assert error_of(caught.value.frame)["code"] == code


def test_same_role_on_both_ends_is_refused() -> None:
    one, _ = make_engine("alice")
    two, _ = make_engine("alice", seed=5)
    one.initiate()
    two.initiate()
    with pytest.raises(RemoteProtocolError) as caught:
        one.receive_frame(wire.FrameDecoder().feed(wire.encode_frame(0, two._hs.hellos["alice"]))[0])
    assert caught.value.code == "wrong-peer"


def _connected() -> ConnectionPair:
    pair = ConnectionPair()
    pair.connect()
    return pair


def test_tampered_frame_fails_its_mac() -> None:
    pair = _connected()
    pair.handle("alice", pair.alice.start_round())
    frame = bytearray(pair.queues["bob"].pop())
    frame[-40] ^= 1  # inside the body or the MAC
    with pytest.raises(RemoteProtocolError) as caught:
        deliver(pair, "bob", bytes(frame))
    assert caught.value.code in {"bad-mac", "bad-frame", "bad-message"}
    assert pair.bob.state is engine.State.CLOSED and not pair.bob_store.key_map()


def test_a_frame_without_mac_after_the_handshake_is_refused() -> None:
    pair = _connected()
    body = wire.encode_message("round_start", round=5, frame=5, pulses=1 << 19, auth="psk")
    with pytest.raises(RemoteProtocolError) as caught:
        deliver(pair, "bob", wire.encode_frame(pair.bob._recv_seq, body))
    assert caught.value.code == "bad-mac"


def test_replayed_and_reordered_frames_are_refused() -> None:
    pair = _connected()
    pair.handle("alice", pair.alice.start_round())
    frame = pair.queues["bob"][0]
    pair.run()
    with pytest.raises(RemoteProtocolError) as caught:
        deliver(pair, "bob", frame)  # replay of round_start
    assert caught.value.code == "bad-seq"

    pair = _connected()
    first = forge(pair, "alice", "abort", round=99, reason="x")
    second = forge(pair, "alice", "abort", round=99, reason="y")
    with pytest.raises(RemoteProtocolError) as caught:
        deliver(pair, "bob", second)
    assert caught.value.code == "bad-seq"
    del first


def test_reflected_frames_are_refused() -> None:
    pair = _connected()
    pair.handle("alice", pair.alice.start_round())
    own = pair.queues["bob"].pop()
    with pytest.raises(RemoteProtocolError) as caught:
        deliver(pair, "alice", own)  # Alice's round_start back to Alice
    assert caught.value.code in {"bad-mac", "bad-seq"}


def test_a_reflected_auth_proof_fails() -> None:
    alice, _ = make_engine("alice")
    bob, _ = make_engine("bob")
    alice.initiate()
    bob.initiate()
    actions = alice.receive_frame(wire.FrameDecoder().feed(wire.encode_frame(0, bob._hs.hellos["bob"]))[0])
    auth_frame = next(a.frame for a in actions if isinstance(a, engine.Send))
    with pytest.raises(RemoteProtocolError) as caught:
        alice.receive_frame(wire.FrameDecoder().feed(auth_frame)[0])
    assert caught.value.code == "auth-failed"


def test_messages_from_the_wrong_role_are_refused() -> None:
    pair = _connected()
    frame = forge(
        pair, "bob", "round_start", round=0, frame=0, pulses=1, auth="psk"
    )  # only Alice opens rounds
    with pytest.raises(RemoteProtocolError, match="may not send"):
        deliver(pair, "alice", frame)


def test_local_misuse_is_a_local_error() -> None:
    pair = _connected()
    with pytest.raises(LocalProtocolError):
        pair.bob.start_round()
    with pytest.raises(LocalProtocolError):
        pair.alice.abort_round("nothing open")


def test_bob_pending_round_is_dropped_when_alice_never_committed() -> None:
    pair = _connected()
    pair.handle("alice", pair.alice.start_round())
    # run until Bob has sent commit, then lose the connection before Alice reads it
    while not any(m == "commit" for _, m in pair.log):
        pair.step()
    assert pair.bob_store.pending and not pair.alice_store.committed
    again = ConnectionPair(alice_store=pair.alice_store, bob_store=pair.bob_store)
    again.connect()
    assert not again.bob_store.pending and not again.bob_store.key_map()
    again.round()
    assert again.alice_store.key_map() == again.bob_store.key_map() != {}
    assert min(again.alice_store.committed) == 1  # round 0 is never reused


def test_bob_pending_round_is_committed_when_alice_did() -> None:
    pair = _connected()
    pair.handle("alice", pair.alice.start_round())
    while not pair.alice_store.committed:
        pair.step()
    pair.queues["bob"].clear()  # "committed" is lost with the connection
    assert pair.bob_store.pending
    again = ConnectionPair(alice_store=pair.alice_store, bob_store=pair.bob_store)
    again.connect()
    assert not again.bob_store.pending
    assert again.alice_store.key_map() == again.bob_store.key_map() != {}


MESSAGE_SAMPLES: dict[str, dict[str, Any]] = {
    "hello": {
        "versions": [2],
        "capabilities": ["psk"],
        "role": "alice",
        "link_id": "test-link",
        "nonce": bytes(32),
        "keys": [],
    },
    "auth": {"proof": bytes(32), "certificate": b"", "kex": b""},
    "sync": {
        "next_round": 0,
        "pending": [],
        "qber_threshold": 0.11,
        "eps_sec": 1e-9,
        "eps_cor": 1e-15,
        "key_block_bits": 256,
        "reserve_total": 0,
        "reserve_consumed": 0,
        "window": 1,
    },
    "resolve": {"committed": [], "key_next": []},
    "round_start": {"round": 0, "frame": 0, "pulses": 1 << 19, "auth": "psk"},
    "sift_announce": {
        "round": 0,
        "pulses": 1 << 19,
        "detections": 1,
        "encoding": "gaps",
        "indices": b"\x05",
        "bases": b"\x00",
    },
    "sift_answer": {"round": 0, "matches": b"\x80", "intensities": b"\x00"},
    "estimate_request": {
        "round": 0,
        "x_count": 0,
        "x_bits": b"",
        "z_count": 1,
        "z_sample_mask": b"",
        "z_sample_bits": b"",
    },
    "estimate_answer": {"round": 0, "x_bits": b"", "z_sample_bits": b""},
    "cascade_pass": {
        "round": 0,
        "index": 0,
        "kind": "affine",
        "block_size": 1,
        "multiplier": 1,
        "offset": 0,
        "seed": b"",
    },
    "cascade_ranges": {"round": 0, "passes": b"\x00", "starts": bytes(4), "ends": b"\x01\x00\x00\x00"},
    "cascade_parities": {"round": 0, "count": 1, "parities": b"\x00"},
    "cascade_done": {"round": 0, "disclosed_bits": 0, "corrected_bits": 0},
    "confirm": {"round": 0, "hash_key": bytes(12), "tag": bytes(12)},
    "confirm_result": {"round": 0, "matched": True},
    "amplify": {"round": 0, "input_bits": 1, "output_bits": 0, "reserve_bits": 0, "seed": b""},
    "commit": {"round": 0, "blocks": 0},
    "committed": {"round": 0},
    "keepalive": {},
    "abort": {"round": 0, "reason": "test"},
    # the key channel's (§19): the engine refuses them, they never belong to a round
    "keys_hello": {"kme_id": "kme", "saes": ["sae"], "serial": 0, "applied": 0},
    "key_notice": {
        "serial": 1,
        "round": 0,
        "block": 0,
        "byte": 0,
        "number": 1,
        "size": 256,
        "key_ids": bytes(16),
        "master": "a",
        "slaves": ["b"],
    },
    "key_lease": {"request": 1, "need": 32, "want": 64},
    "key_grant": {
        "request": 1,
        "serial": 1,
        "round": 0,
        "block": 0,
        "byte": 0,
        "past_round": 0,
        "past_block": 1,
        "past_byte": 32,
    },
    "key_refuse": {"request": 1, "message": "none left"},
}


def test_samples_cover_the_catalogue() -> None:
    assert set(MESSAGE_SAMPLES) | {"error"} == set(spec.load().messages)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    role=st.sampled_from(ROLES),
    steps=st.integers(0, 12),
    name=st.sampled_from(sorted(MESSAGE_SAMPLES)),
    round_offset=st.sampled_from([0, 1, -1]),
)
def test_any_message_in_any_state_is_a_legal_transition_or_a_clean_error(
    role: str, steps: int, name: str, round_offset: int
) -> None:
    """h2-style: every (state, message) pair either follows the spec or ends in CLOSED with an error frame."""
    pair = ConnectionPair()
    pair.connect()
    pair.handle("alice", pair.alice.start_round())
    for _ in range(steps):
        pair.step()
    sender = other(role)
    fields = dict(MESSAGE_SAMPLES[name])
    if "round" in fields:
        fields["round"] = max(0, (pair.engine(role).round_number or 0) + round_offset)
    if sender not in spec.load().messages[name].senders:
        body = msgpack.packb({"type": name, **fields}, use_bin_type=True)
        source = pair.engine(sender)
        seq = source._send_seq
        source._send_seq += 1
        frame = wire.encode_frame(seq, body, source._macs[sender].tag(seq, body))
    else:
        frame = forge(pair, sender, name, **fields)
    target = pair.engine(role)
    before = target.state
    try:
        actions = deliver(pair, role, frame)
        for work in [a for a in actions if isinstance(a, engine.Compute) and a.kind == name]:
            actions += target.completed(work.job, work.run())  # the frame's own work, then its handling
    except RemoteProtocolError as error:
        assert target.state is engine.State.CLOSED
        assert error.frame is not None and error_of(error.frame)["code"] in spec.load().errors
        return
    on = f"recv:{name}"
    allowed = spec.load().allowed(role, before.value, on)
    assert allowed is not None or actions == []  # a legal transition, or a stale message discarded
    if allowed is not None:
        assert target.state.value in allowed.targets


@settings(max_examples=100, deadline=None)
@given(data=st.data(), connected=st.booleans())
def test_the_engine_receive_path_only_raises_remote_protocol_errors(
    data: st.DataObject, connected: bool
) -> None:
    """h11 fuzz/afl-server.py style: mutated frames, whole or byte by byte, into a live engine."""
    pair = ConnectionPair()
    if connected:
        pair.connect()
        pair.handle("alice", pair.alice.start_round())
        frame = bytearray(pair.queues["bob"].pop(0))
    else:
        pair.handle("alice", pair.alice.initiate())
        pair.handle("bob", pair.bob.initiate())
        frame = bytearray(pair.queues["bob"].pop(0))
    for _ in range(data.draw(st.integers(0, 3))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    frame += data.draw(st.binary(max_size=64))
    chunk = data.draw(st.integers(1, len(frame)))
    decoder = wire.FrameDecoder(max_frame_bytes=1 << 20)
    try:
        for i in range(0, len(frame), chunk):
            for payload in decoder.feed(bytes(frame[i : i + chunk])):
                pair.bob.receive_frame(payload)
                if pair.bob.state is engine.State.CLOSED:
                    return
    except RemoteProtocolError as error:
        assert pair.bob.state is engine.State.CLOSED or error.code == "bad-frame"


def test_a_frame_too_large_for_amplification_is_aborted_on_both_sides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(amplify, "MAX_INPUT_BITS", 1000)
    pair = ConnectionPair()
    pair.connect()
    pair.round()
    for role in ROLES:
        (summary,) = pair.summaries[role]
        assert summary.aborted and "frame too large" in (summary.reason or "")
    assert not pair.alice_store.key_map() and pair.alice.state is pair.bob.state is engine.State.IDLE


def test_bob_sends_the_clean_finish_of_cascade_as_one_flight() -> None:
    # §5 "Flights": the halves passes a clean finish needs leave Bob back to back, before any answer;
    # Alice answers each in order, and the round commits as usual
    pair = ConnectionPair()
    pair.connect()
    pair.round()
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}
    runs = [len(list(run)) for entry, run in itertools.groupby(pair.log) if entry == ("bob", "cascade_pass")]
    assert max(runs) >= 12  # 12 clean passes below 2^16 key bits, 14 from there
    answers = sum(entry == ("alice", "cascade_parities") for entry in pair.log)
    sent = sum(entry[0] == "bob" and entry[1] in ("cascade_pass", "cascade_ranges") for entry in pair.log)
    assert answers == sent
