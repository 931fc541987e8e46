"""The control socket: a running daemon answers ``qkdd status`` on a Unix socket in its state directory.

Theory of operation
-------------------
* The daemon listens on ``STATE_DIR/control.sock`` (mode 0600, in the 0700 state directory: only the
  daemon's user may ask). The socket file is bound under a temporary name, made 0600 and then renamed
  into place, so no one ever reaches it with looser permissions.
* One request per connection: the client sends one JSON object on one line, the daemon answers one JSON
  object on one line and closes. ``{"request": "status"}`` is answered with the status snapshot;
  anything else with ``{"error": "..."}``. A request is at most :data:`MAX_REQUEST` bytes and must
  arrive within :data:`REQUEST_TIMEOUT` seconds (a stuck client holds no more than one socket).
* Whether a daemon runs is what answers: a stale socket file (the daemon was killed) refuses the
  connection. The daemon never writes a status file while it runs; ``status.json`` is written once, when
  it stops cleanly, so that ``qkdd status`` can say since when it is not running.
* A Unix socket path holds at most 107 bytes; a longer state directory path is reached through
  ``/proc/self/fd/N`` of an open handle on the directory (Linux), on both sides.

:func:`encode_request`, :func:`decode_request`, :func:`encode_answer` and :func:`decode_answer` are the
whole protocol, without I/O; :func:`serve` (trio, the daemon) and :func:`ask` (blocking, the CLI) move
the bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

SOCKET_FILE = "control.sock"
MAX_REQUEST = 4096
"""The longest request line the daemon reads (the protocol's requests are a few dozen bytes)."""
MAX_ANSWER = 1 << 20
"""The longest answer line the client reads."""
REQUEST_TIMEOUT = 5.0
"""Seconds a client has to send its request, and the CLI waits for the answer."""
REQUESTS = ("status",)
_MAX_PATH = 107  # sun_path holds 108 bytes with its terminating NUL

Handler = Callable[[str], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """A request or answer that does not follow the protocol (the message says how)."""


def encode_request(request: str) -> bytes:
    return json.dumps({"request": request}).encode() + b"\n"


def decode_request(line: bytes) -> str:
    """The request a line asks for.

    Raises:
        ControlError: not one JSON object naming a known request.
    """
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ControlError("the request is not a JSON line") from None
    if not isinstance(value, dict) or set(value) != {"request"}:
        raise ControlError('expected {"request": NAME}')
    request = value["request"]
    if request not in REQUESTS:
        raise ControlError(f"unknown request {str(request)[:32]!r}; expected one of {', '.join(REQUESTS)}")
    return str(request)


def encode_answer(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer, allow_nan=False).encode() + b"\n"


def decode_answer(data: bytes) -> dict[str, Any]:
    """The daemon's answer.

    Raises:
        ControlError: not one complete JSON object.
    """
    if not data.endswith(b"\n"):
        raise ControlError("the answer ended early")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ControlError("the answer is not JSON") from None
    if not isinstance(value, dict):
        raise ControlError("the answer is not a JSON object")
    return value


@contextlib.contextmanager
def _address(state_dir: Path) -> Iterator[str]:
    """The path to bind or connect to for the control socket of ``state_dir`` (short enough for
    ``sun_path``, through a directory handle if need be)."""
    path = str(state_dir / SOCKET_FILE)
    if len(path.encode()) <= _MAX_PATH:
        yield path
        return
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_FILE}"
    finally:
        os.close(fd)


async def serve(
    state_dir: Path, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer requests on ``STATE_DIR/control.sock`` until cancelled; remove the socket file then.

    ``handler(request)`` returns the answer to a valid request; an exception it raises becomes an
    ``{"error"}`` answer (and is not lost: the daemon logs what it must itself)."""
    final = state_dir / SOCKET_FILE
    temporary = state_dir / f".{SOCKET_FILE}.{os.getpid()}"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(state_dir) as address:
            directory = address.rsplit("/", 1)[0]
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            await listener.bind(f"{directory}/{temporary.name}")
        os.chmod(temporary, 0o600)
        temporary.replace(final)  # a stale socket of a killed daemon goes (we hold the state lock)
        listener.listen(16)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                connection, _ = await listener.accept()
                nursery.start_soon(_answer, connection, handler)
    finally:
        listener.close()
        for leftover in (temporary, final):
            with contextlib.suppress(OSError):
                leftover.unlink()


async def _answer(connection: trio.socket.SocketType, handler: Handler) -> None:
    with connection:
        line = bytearray()
        answer: dict[str, Any]
        with trio.move_on_after(REQUEST_TIMEOUT) as waiting:
            while b"\n" not in line and len(line) <= MAX_REQUEST:
                try:
                    chunk = await connection.recv(MAX_REQUEST + 1)
                except OSError:
                    return
                if not chunk:
                    break
                line += chunk
        if waiting.cancelled_caught:
            answer = {"error": f"no request line within {REQUEST_TIMEOUT:g} s"}
        elif len(line) > MAX_REQUEST:
            answer = {"error": f"the request is longer than {MAX_REQUEST} bytes"}
        else:
            try:
                answer = await handler(decode_request(bytes(line).split(b"\n", 1)[0]))
            except ControlError as error:
                answer = {"error": str(error)}
            except Exception as error:  # the daemon goes on; the client learns what went wrong
                answer = {"error": f"the daemon could not answer: {type(error).__name__}: {error}"}
        with trio.move_on_after(REQUEST_TIMEOUT), contextlib.suppress(OSError):
            data = encode_answer(answer)
            while data:
                sent = await connection.send(data)
                data = data[sent:]


def ask(state_dir: Path, request: str = "status", timeout: float = REQUEST_TIMEOUT) -> dict[str, Any] | None:
    """Ask the daemon of ``state_dir``; ``None`` when no daemon listens there (no socket file, or a
    stale one).

    Raises:
        PermissionError: this user may not reach the socket (it is the daemon's user's, mode 0600).
        ControlError: a daemon took the connection but its answer is missing, late or malformed.
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    with client:
        try:
            with _address(state_dir) as address:
                client.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return None
        except PermissionError:
            raise  # the caller says whom to ask as
        except OSError as error:
            raise ControlError(f"cannot reach the control socket: {error.strerror or error}") from None
        data = bytearray()
        try:
            client.sendall(encode_request(request))
            while not data.endswith(b"\n") and len(data) <= MAX_ANSWER:
                chunk = client.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ControlError(f"the daemon did not answer within {timeout:g} s") from None
        except OSError as error:
            raise ControlError(f"the control connection failed: {error.strerror or error}") from None
    return decode_answer(bytes(data))
