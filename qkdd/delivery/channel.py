"""The key channel (protocol/qkdp-v2.md §19): framing and authentication, sans-IO.

Theory of operation
-------------------
The key-channel messages of ``protocol/qkdp-v2.toml`` (``channel = "keys"``) share the connection with
the round messages but not their sequence numbers: each direction counts its key-channel frames from 0.
Every frame carries HMAC-SHA256 over (seq, body) under a key of its direction derived from the session's
frame-MAC key (§12) with HKDF-Expand and the label ``"qkdp/1 channel keys"``. So the channel is
authenticated exactly as strongly as the round messages, replays and reordering are refused, and frames
of the two channels interleave in any order. The daemon hands each decoded frame to :func:`is_key_message`
to pick the channel.
"""

from __future__ import annotations

from typing import Any

from qkdd import spec, wire
from qkdd.auth.psk import FrameMac
from qkdd.errors import RemoteProtocolError

CAPABILITY: str = spec.load().key_channel["capability"]
ANSWER_TIMEOUT: float = spec.load().key_channel["answer_timeout"]
MESSAGES = frozenset(name for name, m in spec.load().messages.items() if m.channel == "keys")


def is_key_message(message: wire.Message) -> bool:
    return message.type in MESSAGES


class KeyChannel:
    """One connection's key channel, for ``role``; ``macs`` are the session's frame MACs by sender."""

    def __init__(self, role: str, macs: dict[str, FrameMac]) -> None:
        self.role = role
        self.peer_role = "bob" if role == "alice" else "alice"
        self._send_mac = macs[role].derive(b"qkdp/1 channel keys")
        self._recv_mac = macs[self.peer_role].derive(b"qkdp/1 channel keys")
        self._send_seq = 0
        self._recv_seq = 0

    def encode(self, name: str, **fields: Any) -> bytes:
        """The frame of key-channel message ``name`` (the next sequence number of our direction)."""
        if name not in MESSAGES or self.role not in spec.load().messages[name].senders:
            raise AssertionError(f"{self.role} does not send {name} on the key channel")
        body = wire.encode_message(name, **fields)
        seq = self._send_seq
        self._send_seq += 1
        return wire.encode_frame(seq, body, self._send_mac.tag(seq, body))

    def receive(self, envelope: wire.Envelope, message: wire.Message) -> wire.Message:
        """Check one received key-channel frame: sender, sequence number, MAC, no transcript tag."""
        if self.peer_role not in spec.load().messages[message.type].senders:
            raise RemoteProtocolError(f"{self.peer_role} may not send {message.type}", code="bad-message")
        if envelope.seq != self._recv_seq:
            raise RemoteProtocolError(
                f"key channel: sequence number {envelope.seq}, expected {self._recv_seq}", code="bad-seq"
            )
        self._recv_mac.verify(envelope.seq, envelope.body, envelope.mac)
        if envelope.tag:
            raise RemoteProtocolError("key-channel frames carry no transcript tag", code="bad-message")
        self._recv_seq += 1
        return message
