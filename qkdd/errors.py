"""Error types shared by the protocol core and the stages.

Two kinds, after h11: a :class:`RemoteProtocolError` means the peer sent something that does not fit
(it becomes an error frame and a clean close, never a crash); a :class:`LocalProtocolError` means we
misused our own core (a bug). :class:`InputError` is bad local input, for example a link backend that
hands over arrays of different lengths. None of them ever carries secret material in its message.
"""

from __future__ import annotations

import errno
import sqlite3


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


_ADVICE = {
    errno.EADDRINUSE: "another program holds that port (`ss -ltnp` shows which); stop it or change the port",
    errno.EADDRNOTAVAIL: "that address is not one of this host's; listen on one it has (or 0.0.0.0)",
    errno.EACCES: "permission denied: the user qkdd runs as must own its state directory and files",
    errno.EPERM: "permission denied: the user qkdd runs as must own its state directory and files",
    errno.ENOSPC: "the disk is full: free space; the link resumes by itself",
    errno.EDQUOT: "the disk quota is used up: free space; the link resumes by itself",
    errno.EROFS: "the file system is read-only: the state directory must be writable",
    errno.EIO: "the disk failed a read or write: check it (dmesg)",
}
_SQLITE_ADVICE = {
    "database or disk is full": errno.ENOSPC,
    "attempt to write a readonly database": errno.EACCES,
    "unable to open database file": errno.EACCES,
    "disk i/o error": errno.EIO,
}


def operational_problem(error: BaseException) -> str | None:
    """One line saying what the host refused and what to do, when ``error`` (or every error of an
    exception group) is something an operator fixes on the host — a port in use, a full disk, a
    permission — rather than a bug; ``None`` otherwise. These are logged without a traceback."""
    if isinstance(error, BaseExceptionGroup):
        lines = [operational_problem(each) for each in error.exceptions]
        return None if None in lines else "; ".join(dict.fromkeys(line for line in lines if line))
    if isinstance(error, OSError) and error.errno in _ADVICE:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{where}: {_ADVICE[error.errno]}"
    if isinstance(error, sqlite3.OperationalError):
        text = str(error)
        code = _SQLITE_ADVICE.get(text.lower())
        if code is not None:
            return f"the key store: {text}: {_ADVICE[code]}"
    return None
