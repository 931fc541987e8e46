"""Framing (protocol/qkdp-v2.md §9): the only layer that sees bytes.

Theory of operation
-------------------
A frame is a 4-byte big-endian length followed by that many bytes holding one msgpack map, the
*envelope* ``{"seq", "body", "mac"}``; ``body`` is the msgpack encoding of one *message* map
``{"type": name, ...fields}``. :class:`FrameDecoder` is fed bytes as they arrive and yields complete
frame payloads; it refuses an oversize length as soon as the 4 length bytes are in, before buffering
anything more. :func:`decode_envelope` and :func:`decode_message` turn payloads into checked values:
every field present, none extra, each of its type and within the bounds of ``protocol/qkdp-v2.toml``.

Anything malformed raises :class:`RemoteProtocolError` (code ``bad-frame`` or ``bad-message``); after one,
the decoder is unusable, because a byte stream cannot be resynchronised. Encoding goes through the same
checks, so we never send what we would refuse.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from qkdd import spec
from qkdd.errors import LocalProtocolError, RemoteProtocolError

LENGTH = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Envelope:
    seq: int
    body: bytes
    mac: bytes
    tag: bytes = b""


@dataclass(frozen=True, slots=True)
class Message:
    """One checked message: its type name and fields (values as msgpack decodes them)."""

    type: str
    fields: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


class FrameDecoder:
    """Bytes in, frame payloads out; enforces the maximum frame size before buffering.

    Received pieces are kept as a list until the frame they belong to is complete and then joined once,
    so a frame of n bytes costs O(n) however it is split (growing one buffer that had its head cut
    off would copy it again at every growth step: O(n²) for a frame read in small pieces).
    """

    def __init__(self, max_frame_bytes: int = spec.load().max_frame_bytes) -> None:
        if max_frame_bytes < 16:
            raise ValueError("max_frame_bytes must be at least 16")
        self.max_frame_bytes = max_frame_bytes
        self._pieces: list[bytes] = []
        self._size = 0  # bytes in _pieces
        self._need: int | None = None  # the payload length of the frame in progress (its header read)
        self._broken = False

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Add received bytes; return every frame payload now complete.

        Raises:
            RemoteProtocolError: a frame announces a length of 0 or above the maximum.
        """
        if self._broken:
            raise LocalProtocolError("frame decoder used after a framing error")
        if data:
            self._pieces.append(bytes(data))
            self._size += len(data)
        if self._size < (LENGTH.size if self._need is None else self._need):
            return []
        buffer = b"".join(self._pieces)
        frames: list[bytes] = []
        start = 0
        while True:
            if self._need is None:
                if len(buffer) - start < LENGTH.size:
                    break
                (length,) = LENGTH.unpack_from(buffer, start)
                if not 0 < length <= self.max_frame_bytes:
                    self._broken = True
                    raise RemoteProtocolError(
                        f"frame length {length} outside [1, {self.max_frame_bytes}]", code="bad-frame"
                    )
                start += LENGTH.size
                self._need = length
            if len(buffer) - start < self._need:
                break
            frames.append(buffer[start : start + self._need])
            start += self._need
            self._need = None
        rest = buffer[start:] if start else buffer
        self._pieces = [rest] if rest else []
        self._size = len(rest)
        return frames

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame (non-zero at EOF = truncated frame)."""
        return self._size + (LENGTH.size if self._need is not None else 0)

    def check_eof(self) -> None:
        """Raise if the stream ended inside a frame."""
        if self.buffered:
            raise RemoteProtocolError("connection closed inside a frame (truncated frame)", code="bad-frame")


def _unpack_map(data: bytes, what: str, code: str) -> dict[Any, Any]:
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.UnpackException) as error:
        raise RemoteProtocolError(
            f"{what} is not one msgpack value: {type(error).__name__}", code=code
        ) from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} is not a msgpack map", code=code)
    return value


def decode_envelope(payload: bytes) -> Envelope:
    """Check one frame payload against the envelope of the spec."""
    envelope = _unpack_map(payload, "frame", "bad-frame")
    spec.check_fields(spec.load().envelope, envelope, "envelope")
    return Envelope(envelope["seq"], envelope["body"], envelope["mac"], envelope["tag"])


def decode_message(body: bytes) -> Message:
    """Check one message body against the message catalogue of the spec."""
    fields = _unpack_map(body, "message body", "bad-message")
    name = fields.pop("type", None)
    if not isinstance(name, str):
        raise RemoteProtocolError("message has no string field 'type'", code="bad-message")
    message_spec = spec.load().messages.get(name)
    if message_spec is None:
        raise RemoteProtocolError(f"unknown message type {name[:32]!r}", code="bad-message")
    spec.check_fields(message_spec.fields, fields, name)
    return Message(name, fields)


def hello_versions(body: bytes) -> list[int] | None:
    """The ``versions`` of a hello of any protocol version (its other fields may differ from ours), or
    ``None`` if ``body`` is no such hello: so that a peer of another version gets ``version-mismatch``
    rather than a complaint about fields it could not know (§10)."""
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.UnpackException):
        return None
    if not isinstance(fields, dict) or fields.get("type") != "hello":
        return None
    versions = fields.get("versions")
    if not isinstance(versions, list) or not all(type(v) is int for v in versions[:16]):
        return None
    return versions[:16]


def encode_message(name: str, **fields: Any) -> bytes:
    """The msgpack body of message ``name``; checked like a received one (a failure is our bug)."""
    message_spec = spec.load().messages.get(name)
    if message_spec is None:
        raise LocalProtocolError(f"unknown message type {name!r}")
    try:
        spec.check_fields(message_spec.fields, fields, name)
    except RemoteProtocolError as error:
        raise LocalProtocolError(f"we built an invalid message: {error}") from None
    body: bytes = msgpack.packb({"type": name, **fields}, use_bin_type=True)
    return body


def encode_frame(seq: int, body: bytes, mac: bytes = b"", tag: bytes = b"") -> bytes:
    """Length prefix + envelope map."""
    payload: bytes = msgpack.packb({"seq": seq, "body": body, "mac": mac, "tag": tag}, use_bin_type=True)
    return LENGTH.pack(len(payload)) + payload
