"""Sequence numbers and frame MACs of one connection (protocol/qkdp-v2.md §9, §12).

Theory of operation
-------------------
Each direction numbers its frames from 0. The first two of each direction (``hello``, ``auth``) carry no
MAC; every later one carries HMAC-SHA256 over (seq, body) under the key of its direction, which the
handshake derives and installs in :attr:`FrameSession.macs` (from the PSK, a handshake key of the reserve
or the PKI exchange). A receiver accepts only the next number of the peer's direction and a MAC that
verifies: replay, reordering, loss and reflection all fail here, before anything reads the message.
This layer knows no message: it sees envelopes (from :mod:`qkdd.wire`) and bodies.
"""

from __future__ import annotations

from qkdd import wire
from qkdd.auth import psk as psk_auth
from qkdd.errors import RemoteProtocolError

MAC_FROM_SEQ = 2
"""hello (0) and auth (1) carry no MAC; every later frame must."""


class FrameSession:
    """One connection's sequence numbers and frame MACs, for ``role``."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.peer_role = "bob" if role == "alice" else "alice"
        self.send_seq = 0
        self.recv_seq = 0
        #: the frame MAC of each sender, installed by the handshake (filled in place, never replaced)
        self.macs: dict[str, psk_auth.FrameMac] = {}

    def check(self, envelope: wire.Envelope) -> None:
        """Accept the peer's next frame: its sequence number and, from ``MAC_FROM_SEQ`` on, its MAC.

        Raises:
            RemoteProtocolError: ``bad-seq``, ``bad-mac``, or a MAC'd frame before the handshake gave keys.
        """
        if envelope.seq != self.recv_seq:
            raise RemoteProtocolError(
                f"sequence number {envelope.seq}, expected {self.recv_seq}", code="bad-seq"
            )
        if envelope.seq >= MAC_FROM_SEQ:
            if self.peer_role not in self.macs:
                raise RemoteProtocolError("authenticated frame before the handshake ended", code="bad-state")
            self.macs[self.peer_role].verify(envelope.seq, envelope.body, envelope.mac)
        elif envelope.mac:
            raise RemoteProtocolError("hello and auth frames carry no MAC", code="bad-message")
        self.recv_seq += 1

    def seal(self, body: bytes, tag: bytes = b"", *, mac_if_keyed: bool = False) -> bytes:
        """Our next frame holding ``body`` (and a round's transcript ``tag``), sequenced and MAC'd.
        ``mac_if_keyed``: leave the MAC out if the handshake gave no key yet (an error frame may close a
        connection at any point); otherwise a MAC'd frame without a key is our bug (``KeyError``)."""
        seq = self.send_seq
        keyed = seq >= MAC_FROM_SEQ and (not mac_if_keyed or self.role in self.macs)
        self.send_seq += 1
        return wire.encode_frame(seq, body, self.macs[self.role].tag(seq, body) if keyed else b"", tag)
