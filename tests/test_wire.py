"""Framing and message checks (qkdp-v2.md §9): only RemoteProtocolError escapes the receive path."""

from __future__ import annotations

import contextlib
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdd import wire
from qkdd.errors import LocalProtocolError, RemoteProtocolError
from tests.conftest import load_vectors

HELLO = {
    "versions": [2],
    "capabilities": ["psk"],
    "role": "alice",
    "link_id": "l",
    "nonce": bytes(32),
    "keys": [],
}


def frame_of(envelope: object) -> bytes:
    payload = msgpack.packb(envelope, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def test_round_trip_whole_and_byte_by_byte() -> None:
    body = wire.encode_message("hello", **HELLO)
    frames = wire.encode_frame(0, body) + wire.encode_frame(1, body, b"m" * 32)
    whole = wire.FrameDecoder().feed(frames)
    decoder = wire.FrameDecoder()
    single = [payload for i in range(len(frames)) for payload in decoder.feed(frames[i : i + 1])]
    assert whole == single and len(whole) == 2
    envelope = wire.decode_envelope(whole[1])
    assert (envelope.seq, envelope.mac) == (1, b"m" * 32)
    message = wire.decode_message(envelope.body)
    assert message.type == "hello" and message["nonce"] == bytes(32)
    assert decoder.buffered == 0


def test_oversize_length_is_refused_before_the_body_arrives() -> None:
    decoder = wire.FrameDecoder(max_frame_bytes=1024)
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.feed(struct.pack(">I", 1025))
    assert caught.value.code == "bad-frame"
    with pytest.raises(LocalProtocolError):
        decoder.feed(b"x")


def test_zero_length_and_truncated_frames() -> None:
    with pytest.raises(RemoteProtocolError, match="outside"):
        wire.FrameDecoder().feed(struct.pack(">I", 0))
    decoder = wire.FrameDecoder()
    assert decoder.feed(wire.encode_frame(0, b"\x80")[:-1]) == []
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decoder.check_eof()


@pytest.mark.parametrize(
    ("payload", "code", "match"),
    [
        (b"\xc1", "bad-frame", "not one msgpack value"),
        (msgpack.packb([1, 2]), "bad-frame", "not a msgpack map"),
        (msgpack.packb({"seq": 0, "body": b"x"}), "bad-message", "missing field 'mac'"),
        (
            msgpack.packb({"seq": 0, "body": b"x", "mac": b"", "tag": b"", "x": 1}),
            "bad-message",
            "unexpected field",
        ),
        (msgpack.packb({"seq": -1, "body": b"x", "mac": b"", "tag": b""}), "bad-message", "outside"),
        (
            msgpack.packb({"seq": "0", "body": b"x", "mac": b"", "tag": b""}),
            "bad-message",
            "unsigned integer",
        ),
        (msgpack.packb({"seq": 0, "body": "x", "mac": b"", "tag": b""}), "bad-message", "binary"),
        (
            msgpack.packb({"seq": 0, "body": b"x", "mac": b"", "tag": b""}) + b"\x00",
            "bad-frame",
            "not one msgpack value",
        ),
        (msgpack.packb({1: 0}), "bad-frame", "not one msgpack value"),
    ],
)
def test_malformed_envelopes(payload: bytes, code: str, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as caught:
        wire.decode_envelope(payload)
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"type": "nonsense"}, "unknown message type"),
        ({"versions": [1]}, "no string field 'type'"),
        ({"type": "hello", **{k: v for k, v in HELLO.items() if k != "nonce"}}, "missing field 'nonce'"),
        ({"type": "hello", **HELLO, "extra": 1}, "unexpected field"),
        ({"type": "hello", **HELLO, "nonce": bytes(31)}, "31 bytes"),
        ({"type": "hello", **HELLO, "role": "eve"}, "not one of"),
        ({"type": "hello", **HELLO, "versions": [0]}, "outside"),
        ({"type": "hello", **HELLO, "versions": list(range(1, 18))}, "more than 16"),
        ({"type": "hello", **HELLO, "versions": 1}, "must be an array"),
        ({"type": "hello", **HELLO, "link_id": "x" * 129}, "longer than 128"),
        ({"type": "confirm_result", "round": 0, "matched": 1}, "boolean"),
        (
            {
                "type": "sync",
                "next_round": 0,
                "pending": [],
                "qber_threshold": float("nan"),
                "eps_sec": 1e-9,
                "eps_cor": 1e-15,
                "key_block_bits": 256,
            },
            "outside",
        ),
        ({"type": "round_start", "round": 0, "frame": 0, "pulses": True}, "unsigned integer"),
    ],
)
def test_malformed_messages(body: dict[str, object], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as caught:
        wire.decode_message(msgpack.packb(body, use_bin_type=True))
    assert caught.value.code == "bad-message"


def test_we_never_encode_what_we_would_refuse() -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode_message("hello", **{**HELLO, "nonce": b"short"})
    with pytest.raises(LocalProtocolError):
        wire.encode_message("no_such_message")


def _receive(data: bytes, chunk: int) -> None:
    decoder = wire.FrameDecoder(max_frame_bytes=1 << 16)
    for i in range(0, len(data), chunk):
        for payload in decoder.feed(data[i : i + chunk]):
            envelope = wire.decode_envelope(payload)
            wire.decode_message(envelope.body)
    decoder.check_eof()


@given(st.binary(max_size=2000), st.integers(1, 64))
def test_random_bytes_only_raise_remote_protocol_errors(data: bytes, chunk: int) -> None:
    with contextlib.suppress(RemoteProtocolError):
        _receive(data, chunk)


@given(st.data())
def test_mutated_frames_only_raise_remote_protocol_errors(data: st.DataObject) -> None:
    frame = bytearray(wire.encode_frame(3, wire.encode_message("hello", **HELLO), b"t" * 32))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(frame) - 1))
        frame[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(RemoteProtocolError):
        _receive(bytes(frame), data.draw(st.integers(1, len(frame))))


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=8)
        | st.binary(max_size=8),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_arbitrary_msgpack_bodies_only_raise_remote_protocol_errors(value: object) -> None:
    with contextlib.suppress(RemoteProtocolError):
        wire.decode_message(msgpack.packb(value, use_bin_type=True))


def test_framing_vectors() -> None:
    """protocol/vectors/framing.json: the exact bytes of frames, both ways."""
    for v in load_vectors("framing"):
        body = bytes.fromhex(v["body"])
        assert (
            wire.encode_message(
                v["message"]["type"], **{k: x for k, x in v["message"].items() if k != "type"}
            )
            == body
        )
        frame = wire.encode_frame(v["seq"], body, bytes.fromhex(v["mac"]), bytes.fromhex(v["tag"]))
        assert frame.hex() == v["frame"]
        (payload,) = wire.FrameDecoder().feed(frame)
        envelope = wire.decode_envelope(payload)
        assert (envelope.seq, envelope.body, envelope.mac.hex(), envelope.tag.hex()) == (
            v["seq"],
            body,
            v["mac"],
            v["tag"],
        )
