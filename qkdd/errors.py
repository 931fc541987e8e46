"""Error types shared by the protocol core and the stages.

Two kinds, after h11: a :class:`RemoteProtocolError` means the peer sent something that does not fit
(it becomes an error frame and a clean close, never a crash); a :class:`LocalProtocolError` means we
misused our own core (a bug). :class:`InputError` is bad local input, for example a link backend that
hands over arrays of different lengths. None of them ever carries secret material in its message.
"""

from __future__ import annotations


class QkddError(Exception):
    """Base of every error qkdd raises on purpose."""


class ProtocolError(QkddError):
    """Something broke the protocol; ``code`` is the error code sent in the error frame."""

    code: str = "protocol"
    frame: bytes | None = None  # the error frame to send before closing, when the engine built one

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class RemoteProtocolError(ProtocolError):
    """The peer's message is malformed, out of bounds, or does not answer the question asked."""

    code = "bad-message"


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow: a bug in the caller."""

    code = "internal"


class InputError(QkddError, ValueError):
    """Local input (frame data, parameters) is malformed: wrong dtype, length, range or emptiness."""
