"""The ETSI GS QKD 014 v1.1.1 REST API over mutual TLS and on a Unix socket: h11 on TLS (OpenSSL's memory
BIOs, :class:`_TlsStream`) or a plain socket stream.

Theory of operation
-------------------
* TLS ≥ 1.2 with a required client certificate issued by the configured CA: a client without one, or
  with one of another CA, fails the handshake with a TLS alert and never reaches HTTP; each refusal is
  logged, one line per peer address per minute. The SAE is the ``[[etsi014.sae]]`` entry whose
  certificate fingerprint (SHA-256 of the DER) or subject common name matches; a certificate of the CA
  that names no configured SAE gets 401 on every request.
* The same API on a Unix socket (``etsi014.unix_socket``, mode 0660, no TLS) for SAEs on this host: the
  SAE is the entry whose ``uid`` is the connecting process's (``SO_PEERCRED``, which the kernel fills in
  and no client can forge); any other uid gets 401 on every request.
* HTTP/1.1 through h11 (a sans-IO parser; we never parse HTTP ourselves), keep-alive, one request at a
  time per connection, request bodies up to 1 MiB, an idle timeout per connection: a client has
  :data:`IDLE_TIMEOUT` to send each request, and again to take each answer.
* Whenever the server ends a connection the client may still be sending on (an oversize body, bad
  HTTP, an answer with ``Connection: close``, a refused handshake), it sends its answer, ends its side
  (FIN) and reads and drops what still comes for a bounded time before closing: closing a socket with
  unread bytes makes the kernel send a reset, which can destroy the answer before the client reads it.
* Routes, under ``/api/v1/keys/``: ``{slave}/status`` (GET), ``{slave}/enc_keys`` (GET with ``number``
  and ``size``, or POST with a Key request), ``{master}/dec_keys`` (GET with ``key_ID``, or POST with
  Key IDs). Every answer is JSON; errors are 400, 401, 405 or 503 with ``{"message", "details"?}``, as
  the standard asks. ``protocol/etsi014-openapi.json`` describes exactly this, and a test checks the live
  server against it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import socket
import ssl
import stat
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from qkdd.config import Etsi014
from qkdd.delivery.kme import KeyManager, encode_keys
from qkdd.delivery.ledger import DeliveryError, NotAuthorized
from qkdd.errors import InputError

log = logging.getLogger("qkdd")
MAX_BODY = 1 << 20
HANDSHAKE_TIMEOUT = 10.0
MAX_HANDSHAKES = 256
"""TLS connections in their handshake at once; one more closes the oldest (I5: whoever holds sockets
open without finishing a handshake cannot lock the SAEs out; a real handshake takes milliseconds, so the
oldest is never one)."""
IDLE_TIMEOUT = 60.0
READ_SIZE = 1 << 16
LINGER_SECONDS = 5.0
"""How long a connection the server ends reads and drops what the client still sends (see the top)."""
LINGER_BYTES = 64 << 20
"""How much it drops at most: a 10 MB body is read whole, the client then reads its 400."""
REFUSAL_LOG_SECONDS = 60.0
"""A refused TLS handshake is logged at most once per peer address per this many seconds (I5)."""
REFUSAL_LOG_PEERS = 1024
"""Peer addresses the refusal log remembers at once; refusals from others share one line (I5)."""
UNIX_SOCKET_MODE = 0o660
"""The Unix socket's mode: the daemon's user and group may connect; the uid then names the SAE."""
_ROUTE = re.compile(r"/api/v1/keys/([^/]+)/(status|enc_keys|dec_keys)")
_PARAMETERS = {
    ("GET", "status"): set(),
    ("GET", "enc_keys"): {"number", "size"},
    ("POST", "enc_keys"): set(),
    ("GET", "dec_keys"): {"key_ID"},
    ("POST", "dec_keys"): set(),
}
_METHODS = {"status": ("GET",), "enc_keys": ("GET", "POST"), "dec_keys": ("GET", "POST")}
"""The methods each resource takes; any other gets 405 with ``Allow`` (RFC 9110 §15.5.6)."""
MAX_DIGITS = 18
"""A query number has at most this many ASCII digits (any larger is refused by the limits anyway)."""
_ENC_FIELDS = {"number", "size", "additional_slave_SAE_IDs", "extension_mandatory", "extension_optional"}
_DEC_FIELDS = {"key_IDs", "key_IDs_extension"}


def tls_context(settings: Etsi014) -> ssl.SSLContext:
    """The server's TLS context: our certificate, client certificates required from the CA."""
    assert settings.certificate is not None and settings.key is not None, "no TLS without etsi014.listen"
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(settings.ca))
        context.load_cert_chain(str(settings.certificate), str(settings.key))
    except (OSError, ssl.SSLError) as error:
        raise InputError(f"etsi014: cannot load the TLS certificate, key or CA: {error}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # a TLS 1.2 client may not renegotiate (OpenSSL 3 refuses it by default; older builds do not): a new
    # handshake mid-connection would cost CPU at the client's will and could change who the client is
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


class _Reject(Exception):
    """An HTTP error answer (status, JSON body, extra headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        details: list[Any] | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"message": message}
        self.headers = headers or []
        if details:
            self.body["details"] = details


class _TlsStream(trio.abc.Stream):
    """Server-side TLS on ``transport`` through OpenSSL's memory BIOs, for a connection that one task
    serves one request at a time. ``trio.SSLStream`` does the same for any number of tasks at once, and
    its locks, conflict checks and extra yields cost CPU on every request; its behaviour is kept:
    a ragged end (TCP closed without ``close_notify``) is an end, as HTTPS allows; any TLS error is
    ``trio.BrokenResourceError`` with the ``ssl`` error as its cause; ``aclose`` closes the transport
    without a ``close_notify``, and any use after it is ``trio.ClosedResourceError``; and TLS 1.3 session
    tickets go out with the first answer, not at the end of the handshake (OpenSSL queues them there,
    where a client that is not reading yet can deadlock).

    Only ``trio.BrokenResourceError``, ``trio.ClosedResourceError`` and ``trio.Cancelled`` leave it (a
    connection's handler that raised anything else would end the whole server). The incoming BIO is fed
    only when OpenSSL asks for more, so it holds at most one record and one read; the outgoing one is
    unbounded and never makes OpenSSL wait (no ``SSLWantWriteError``). ``send_all`` yields to the other
    tasks once, cancel-shielded, after its bytes went out, unless the connection waited for the socket
    since its last ``send_all`` (as it does for each request of a client that waits for its answers):
    the socket path may not wait at all, and a client pipelining requests would otherwise hold the
    event loop for as long as it sends them."""

    def __init__(self, transport: trio.abc.HalfCloseableStream, context: ssl.SSLContext) -> None:
        self.transport_stream = transport
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self._held = b""  # the session tickets, until the first answer
        self._closed = False
        self._waited = False  # the task waited for the socket since the last send_all (it yielded)
        # on a TCP socket the bytes go straight to its descriptor: trio's socket layer tries a read before
        # each wait (a failed system call per request) and yields after each send; -1 on other streams
        self._fd = transport.socket.fileno() if isinstance(transport, trio.SocketStream) else -1

    async def do_handshake(self) -> None:
        """Run the handshake; on a TLS error, what OpenSSL queued for the client stays in ``outgoing``."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLError, ssl.CertificateError) as error:
                raise trio.BrokenResourceError from error
            await self._flush()
            await self._fill()
        if self._tls.version() == "TLSv1.3":
            self._held = self.outgoing.read()
        else:
            await self._flush()

    def getpeercert(self, *, binary_form: bool) -> Any:
        return self._tls.getpeercert(binary_form)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError
        while True:
            try:
                return self._tls.read(max_bytes or READ_SIZE)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # close_notify, or a ragged end
            except (ssl.SSLError, ssl.CertificateError) as error:
                raise trio.BrokenResourceError from error
            await self._flush()  # what reading made OpenSSL queue (a key update's answer)
            await self._fill()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        if data:
            try:
                self._tls.write(data)
            except (ssl.SSLError, ssl.CertificateError) as error:
                raise trio.BrokenResourceError from error
            await self._flush()
        if not self._waited:
            await trio.lowlevel.cancel_shielded_checkpoint()  # the bytes are out: no cancel here (see above)
        self._waited = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._closed = True
        self._fd = -1  # the number may name another socket once the transport closes it
        await self.transport_stream.aclose()

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self._held:  # as trio does: the tickets go with the first bytes that must go anyway
            data, self._held = self._held + data, b""
        if data and self._fd >= 0:
            try:
                data = data[os.write(self._fd, data) :]
            except BlockingIOError:
                pass
            except OSError as error:
                raise trio.BrokenResourceError from error
        if data:  # the socket's buffer is full (or not a socket): wait until it takes the rest
            self._waited = True
            await self.transport_stream.send_all(data)

    async def _fill(self) -> None:
        data: bytes | bytearray
        self._waited = True
        if self._fd >= 0:
            await trio.lowlevel.wait_readable(self._fd)
            try:
                data = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                return  # woken with nothing to read: the caller asks OpenSSL again, then waits again
            except OSError as error:
                raise trio.BrokenResourceError from error
        else:
            data = await self.transport_stream.receive_some(READ_SIZE)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()


class _BodyTooLarge(h11.RemoteProtocolError):
    """A request body over :data:`MAX_BODY`."""


class ApiServer:
    """Serves one KME's API until cancelled."""

    def __init__(
        self,
        kme: KeyManager,
        settings: Etsi014,
        observe: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.kme = kme
        self.settings = settings
        # told (target, status, seconds) of each answer sent: the daemon's metrics
        self.observe = observe or (lambda target, status, seconds: None)
        self._by_fingerprint = {s.fingerprint: s.id for s in settings.saes if s.fingerprint}
        self._by_name = {s.common_name: s.id for s in settings.saes if s.common_name}
        self._by_uid = {s.uid: s.id for s in settings.saes if s.uid is not None}
        self.refusals = RefusalLog(REFUSAL_LOG_SECONDS)
        self._handshaking: dict[trio.CancelScope, str] = {}  # connections in the TLS handshake, oldest first

    @functools.cached_property
    def context(self) -> ssl.SSLContext:
        return tls_context(self.settings)

    async def serve(self, *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve HTTPS and the Unix socket, whichever are configured; ``task_status`` gets the HTTPS port
        (``None`` without HTTPS) once both listen."""
        listen = self.settings.listen
        if listen is None:
            assert self.settings.unix_socket is not None
            async with trio.open_nursery() as nursery:
                await nursery.start(self._serve_unix, self.settings.unix_socket)
                task_status.started(None)
            return
        _ = self.context  # a bad certificate or key fails here, before the port opens
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        port = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            if self.settings.unix_socket is not None:
                await nursery.start(self._serve_unix, self.settings.unix_socket)
            log.info("ETSI 014 key delivery API on https://%s:%d/api/v1/keys/", listen.host, port)
            task_status.started(port)
            await trio.serve_listeners(self._tls_connection, listeners)

    async def _serve_unix(self, path: Path, *, task_status: trio.TaskStatus[None]) -> None:
        with _claim_socket_path(path):
            listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await listener.bind(str(path))
                # before listen(), nobody can connect: no window with the mode bind() left (umask)
                os.chmod(path, UNIX_SOCKET_MODE)
                listener.listen()
                log.info("ETSI 014 key delivery API on the Unix socket %s", path)
                task_status.started()
                await trio.serve_listeners(self._unix_connection, [trio.SocketListener(listener)])
            finally:
                listener.close()

    def identify(self, der: bytes | None) -> str | None:
        """The SAE ID a verified client certificate maps to, or ``None``."""
        if not der:
            return None
        sae = self._by_fingerprint.get(hashlib.sha256(der).hexdigest())
        if sae is None:
            names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            sae = next((self._by_name[n.value] for n in names if n.value in self._by_name), None)
        return sae

    def identify_uid(self, uid: int) -> str | None:
        """The SAE ID a process of user ``uid`` on the Unix socket is, or ``None``."""
        return self._by_uid.get(uid)

    async def _tls_connection(self, tcp: trio.SocketStream) -> None:
        await self.serve_tls(tcp, _peer_address(tcp))

    async def serve_tls(self, transport: trio.abc.HalfCloseableStream, peer: str) -> None:
        """One HTTPS connection from ``peer`` (an address, for the log) until it ends."""
        stream = _TlsStream(transport, self.context)
        try:
            with trio.CancelScope() as handshake:
                self._make_room(peer)
                self._handshaking[handshake] = peer
                try:
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        await stream.do_handshake()
                except (trio.BrokenResourceError, trio.TooSlowError) as error:
                    await self._refuse_handshake(stream, peer, error)
                    return
                finally:
                    self._handshaking.pop(handshake, None)
            if handshake.cancelled_caught:
                return  # closed to make room for a newer connection
            caller = self.identify(stream.getpeercert(binary_form=True))
            await self._serve_http(
                stream, transport, caller, "the client certificate names no SAE of this KME"
            )
        finally:
            await _close(stream)

    async def _unix_connection(self, stream: trio.SocketStream) -> None:
        try:
            uid = _peer_uid(stream.socket)
        except OSError as error:  # not expected on Linux; refuse rather than guess
            log.warning("ETSI 014: no credentials of a Unix socket client: %s", error)
            await _close(stream)
            return
        await self.serve_unix(stream, uid)

    async def serve_unix(self, stream: trio.abc.HalfCloseableStream, uid: int) -> None:
        """One connection on the Unix socket from a process of user ``uid``, until it ends."""
        try:
            await self._serve_http(
                stream, stream, self.identify_uid(uid), f"uid {uid} names no SAE of this KME"
            )
        finally:
            await _close(stream)

    def _make_room(self, peer: str) -> None:
        """Before ``peer``'s handshake: at :data:`MAX_HANDSHAKES` connections in theirs, close the oldest,
        and say so (rate-limited with the refused handshakes)."""
        if len(self._handshaking) < MAX_HANDSHAKES:
            return
        oldest, who = next(iter(self._handshaking.items()))
        del self._handshaking[oldest]
        oldest.cancel()
        unlogged = self.refusals.note(who)
        if unlogged is not None:
            log.warning(
                "ETSI 014: closed a connection from %s still in the TLS handshake: %d connections were in "
                "theirs, one came from %s%s",
                who,
                MAX_HANDSHAKES,
                peer,
                f" (and {unlogged} more refusals not logged since the last such line)" if unlogged else "",
            )

    async def _refuse_handshake(
        self, stream: _TlsStream, peer: str, error: trio.BrokenResourceError | trio.TooSlowError
    ) -> None:
        """Log why a handshake failed (rate-limited), send the alert OpenSSL made for it, and linger."""
        cause = error.__cause__
        gone = not isinstance(cause, ssl.SSLError) or isinstance(
            cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)
        )
        if isinstance(error, trio.BrokenResourceError) and gone:
            log.debug("ETSI 014: %s closed the connection during the TLS handshake", peer)
            return  # the client went away (a port check, a reset): nothing was refused
        unlogged = self.refusals.note(peer)
        if unlogged is not None:
            log.warning(
                "ETSI 014: refused a TLS handshake from %s: %s%s",
                peer,
                _handshake_failure(error),
                f" (and {unlogged} more not logged since the last such line)" if unlogged else "",
            )
        # the handshake stops at the error with what OpenSSL queued unsent: the alert (certificate_required,
        # unknown_ca, ...) that tells the client why goes out from here
        alert = stream.outgoing.read()
        transport = stream.transport_stream
        if alert:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await transport.send_all(alert)
            await _linger(transport)  # with TLS 1.3 the client may be sending its request already

    async def _serve_http(
        self,
        stream: trio.abc.Stream,
        transport: trio.abc.HalfCloseableStream,
        caller: str | None,
        unknown: str,
    ) -> None:
        """HTTP requests on ``stream`` (``transport`` the byte stream under it) from ``caller`` (an SAE ID,
        or ``None``: every request gets 401 with the message ``unknown``), until either side ends it."""
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        try:
            # one scope for the connection (a scope per request costs CPU): the idle timeout runs while
            # we wait for a request and while the client takes its answer, not while the KME works on it
            with trio.CancelScope() as idle:
                while True:
                    idle.deadline = trio.current_time() + IDLE_TIMEOUT
                    try:
                        request = await _read_request(stream, connection)
                    except h11.RemoteProtocolError as error:
                        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                            text = str(error) if isinstance(error, _BodyTooLarge) else f"bad HTTP: {error}"
                            body = {"message": text}
                            await self._respond(stream, connection, 400, body, [("connection", "close")])
                        await _linger(transport)
                        return
                    if request is None or idle.cancel_called:
                        # the timeout ran out as the request came in: drop it unanswered, as one that came
                        # a moment later; answering under a cancelled scope would cut the KME off mid-way
                        return
                    idle.deadline = math.inf
                    started = trio.current_time()
                    headers: list[tuple[str, str]] = []
                    if caller is None:
                        status, body = 401, {"message": unknown}
                    else:
                        status, body, headers = await self._answer(caller, *request)
                    # a client that does not read its answer holds the connection no longer than an idle
                    # one (its keys are handed out: as if it had crashed before it read them)
                    idle.deadline = trio.current_time() + IDLE_TIMEOUT
                    await self._respond(stream, connection, status, body, headers, head=request[0] == "HEAD")
                    self.observe(request[1], status, trio.current_time() - started)
                    if connection.our_state is h11.MUST_CLOSE or connection.their_state is h11.MUST_CLOSE:
                        await _linger(transport)
                        return
                    connection.start_next_cycle()
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            h11.ProtocolError,
        ) as error:
            log.debug("ETSI 014 connection ended: %s", type(error).__name__)

    async def _respond(
        self,
        stream: trio.abc.Stream,
        connection: h11.Connection,
        status: int,
        body: Any,
        extra: list[tuple[str, str]] | None = None,
        *,
        head: bool = False,
    ) -> None:
        """One JSON answer; to a HEAD request its headers only (HTTP sends no body there)."""
        data = json.dumps(body).encode()
        # bytes, as h11 keeps them: it need not encode each name and value again
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        headers += [(name.encode(), value.encode()) for name, value in extra or ()]
        out = connection.send(h11.Response(status_code=status, headers=headers)) or b""
        if not head:
            out += connection.send(h11.Data(data=data)) or b""
        out += connection.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)  # one TLS record, one write

    async def _answer(
        self,
        caller: str | None,
        method: str,
        target: str,
        body: bytes,
        content_type: str = "application/json",
    ) -> tuple[int, Any, list[tuple[str, str]]]:
        """The status, JSON body and extra headers of the answer to one request."""
        try:
            return 200, await self._route(caller, method, target, body, content_type), []
        except _Reject as reject:
            return reject.status, reject.body, reject.headers
        except DeliveryError as error:
            return error.status, {"message": str(error)}, []
        except Exception:  # our bug: log it, answer as the standard's "server error"
            log.exception("ETSI 014: internal error on %s %s", method, target.split("?", maxsplit=1)[0])
            return 503, {"message": "internal error of the KME"}, []

    async def _route(
        self, caller: str | None, method: str, target: str, body: bytes, content_type: str
    ) -> Any:
        if caller is None:
            raise NotAuthorized("the client certificate names no SAE of this KME")
        url = urlsplit(target)
        match = _ROUTE.fullmatch(url.path)
        if match is None:
            raise _Reject(400, f"no such resource: {url.path[:100]}", ["see /api/v1/keys/{SAE_ID}/status"])
        other, action = unquote(match[1]), match[2]
        allowed = _PARAMETERS.get((method, action))
        if allowed is None:
            methods = ", ".join(_METHODS[action])
            raise _Reject(
                405, f"{method[:16]} is not allowed on {action}: {methods}", headers=[("allow", methods)]
            )
        query = _query(url.query, allowed)
        if method == "POST":
            if body.strip() and content_type.split(";", maxsplit=1)[0].strip().lower() != "application/json":
                raise _Reject(400, f"the body must be application/json, not {content_type[:64]!r}")
            fields = _json_object(body, _ENC_FIELDS if action == "enc_keys" else _DEC_FIELDS)
        elif body:
            raise _Reject(400, "a GET request carries no body")
        else:
            fields = {}
        if action == "status":
            return await self.kme.status(caller, other)
        if action == "enc_keys":
            number = _number(query, fields, "number", 1)
            size = _number(query, fields, "size", self.settings.key_size)
            additional = fields.get("additional_slave_SAE_IDs") or []
            if not isinstance(additional, list) or not all(isinstance(a, str) for a in additional):
                raise _Reject(400, "additional_slave_SAE_IDs must be an array of strings")
            if len(additional) > self.settings.max_sae_id_count:
                raise _Reject(400, f"at most {self.settings.max_sae_id_count} additional_slave_SAE_IDs")
            mandatory = fields.get("extension_mandatory") or []
            if not isinstance(mandatory, list):
                raise _Reject(400, "extension_mandatory must be an array")
            if mandatory:
                raise _Reject(400, "unsupported extension_mandatory", mandatory[:8])
            if other in additional:
                raise _Reject(400, "the slave SAE is listed again in additional_slave_SAE_IDs")
            return encode_keys(await self.kme.enc_keys(caller, [other, *additional], number, size))
        if method == "GET":
            if "key_ID" not in query:
                raise _Reject(400, "dec_keys by GET needs the parameter key_ID")
            key_ids = [query["key_ID"]]
        else:
            entries = fields.get("key_IDs")
            if not isinstance(entries, list) or not entries:
                raise _Reject(400, 'key_IDs must be a non-empty array of {"key_ID": ...} objects')
            if len(entries) > self.settings.max_key_per_request:
                raise _Reject(400, f"at most {self.settings.max_key_per_request} key_IDs per request")
            key_ids = []
            for entry in entries:
                if not isinstance(entry, dict) or not isinstance(entry.get("key_ID"), str):
                    raise _Reject(400, 'key_IDs must be a non-empty array of {"key_ID": ...} objects')
                key_ids.append(entry["key_ID"])
        canonical = []
        for key_id in key_ids:
            try:
                canonical.append(str(uuid.UUID(key_id)))
            except ValueError:
                raise _Reject(400, f"key_ID {key_id[:64]!r} is not a UUID") from None
        return encode_keys(await self.kme.dec_keys(caller, other, canonical))


async def _read_request(
    stream: trio.abc.Stream, connection: h11.Connection
) -> tuple[str, str, bytes, str] | None:
    """The next request (method, target, body, content type), or ``None`` when the client is done.

    Raises:
        h11.RemoteProtocolError: bad HTTP, or a body over :data:`MAX_BODY` (refused on its
            ``Content-Length`` before any of it is read, or as soon as a chunked one grows past it).
    """
    request: h11.Request | None = None
    content_type = b""
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            if connection.they_are_waiting_for_100_continue:  # RFC 9110 §10.1.1: go on, send the body
                await stream.send_all(
                    connection.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )
            data = await stream.receive_some(READ_SIZE)
            connection.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            request = event
            for name, value in event.headers:  # h11 lower-cased the names
                if name == b"content-length" and int(value) > MAX_BODY:  # h11 checked: digits, one value
                    raise _BodyTooLarge(f"the request body is over {MAX_BODY >> 20} MiB")
                if name == b"content-type":
                    content_type = value  # the last one, if several
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _BodyTooLarge(f"the request body is over {MAX_BODY >> 20} MiB")
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            method, target = request.method.decode(), request.target.decode()
            return method, target, bytes(body), content_type.decode("latin-1")
        elif isinstance(event, (h11.ConnectionClosed, h11.EndOfMessage)) or event is h11.PAUSED:
            return None


def _query(text: str, allowed: set[str]) -> dict[str, str]:
    if not text:
        return {}  # a POST's usual target
    values = parse_qs(text, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise _Reject(400, f"unknown query parameter {unknown[0][:32]!r}")
    if any(len(v) > 1 for v in values.values()):
        raise _Reject(400, "a query parameter is given twice")
    return {k: v[0] for k, v in values.items()}


def _json_object(body: bytes, allowed: set[str]) -> Mapping[str, Any]:
    if not body.strip():
        return {}  # an empty body means every default
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise _Reject(400, f"the body is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise _Reject(400, "the body must be a JSON object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _Reject(400, f"unknown field {unknown[0][:32]!r}")
    return {k: v for k, v in value.items() if v is not None}


def _number(query: Mapping[str, str], fields: Mapping[str, Any], name: str, default: int) -> int:
    """``name`` from the query (ASCII digits only: ``int()`` would also take "²" or Arabic-Indic digits)
    or from the JSON body (a JSON integer: not a string, not a boolean), else ``default``."""
    if name in query:
        text = query[name]
        if text.isascii() and text.isdigit() and len(text) <= MAX_DIGITS:
            return int(text)
        raise _Reject(400, f"{name} must be ASCII digits, got {text[:32]!r}")
    value = fields.get(name, default)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Reject(400, f"{name} must be a JSON integer, got {json.dumps(value)[:32]}")


def _peer_address(tcp: trio.SocketStream) -> str:
    try:
        return str(tcp.socket.getpeername()[0])
    except OSError:
        return "an unknown address"


def _peer_uid(sock: trio.socket.SocketType) -> int:
    """The user ID of the process at the other end of a Unix socket, as the kernel recorded it."""
    _pid, uid, _gid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(uid)


def _handshake_failure(error: trio.BrokenResourceError | trio.TooSlowError) -> str:
    """Why a TLS handshake failed, in words for the log."""
    if isinstance(error, trio.TooSlowError):
        return f"no handshake within {HANDSHAKE_TIMEOUT:g} s"
    cause = error.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        # OpenSSL's X509_V_ERR_*: 2 and 20 an issuer we do not have, 7 one of the same name that did not
        # sign it, 18 and 19 self-signed
        if cause.verify_code in (2, 7, 18, 19, 20):
            return f"a client certificate of another CA ({cause.verify_message})"
        return f"the client certificate is refused: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        if cause.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no client certificate"
        return f"TLS error {cause.reason or cause}"
    return str(cause or error)


class RefusalLog:
    """Which refused handshakes to log: one line per peer address per ``seconds``, counting those not
    logged in between. At most ``peers`` addresses are remembered; past that, one line per ``seconds``
    speaks for all the others (the log and the memory stay bounded whatever connects, I5).

    ``clock`` is trio's by default; a test passes its own."""

    OTHERS = "\x00others"  # no address looks like this

    def __init__(
        self,
        seconds: float,
        *,
        peers: int = REFUSAL_LOG_PEERS,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.seconds = seconds
        self.peers = peers
        self.clock = clock
        self._last: dict[str, float] = {}  # peer -> when its last line was logged
        self._unlogged: dict[str, int] = {}  # peer -> refusals since that line

    def note(self, peer: str) -> int | None:
        """A refusal of ``peer``: ``None`` if it is not to be logged now, else how many of its refusals
        were not logged since its last line."""
        now = self.clock()
        if peer not in self._last and len(self._last) >= self.peers:
            for old in [p for p, last in self._last.items() if now - last >= self.seconds]:
                del self._last[old]
                self._unlogged.pop(old, None)
            if len(self._last) >= self.peers:
                peer = self.OTHERS
        if now - self._last.get(peer, -math.inf) < self.seconds:
            self._unlogged[peer] = self._unlogged.get(peer, 0) + 1
            return None
        self._last[peer] = now
        return self._unlogged.pop(peer, 0)


async def _linger(transport: trio.abc.HalfCloseableStream) -> None:
    """End our side of a connection the client may still be sending on, then read and drop what comes
    until the client closes, or for :data:`LINGER_SECONDS` and at most :data:`LINGER_BYTES`. Closing a
    socket with unread bytes in it makes the kernel send a reset, and a reset can discard our answer
    from the client's receive buffer before the client reads it (RFC 9112 §9.6, "tear-down")."""
    with trio.move_on_after(LINGER_SECONDS):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await transport.send_eof()
            dropped = 0
            while dropped < LINGER_BYTES:
                data = await transport.receive_some(READ_SIZE)
                if not data:
                    return
                dropped += len(data)


async def _close(stream: trio.abc.AsyncResource) -> None:
    with trio.move_on_after(1) as cleanup:
        cleanup.shield = True
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()


@contextlib.contextmanager
def _claim_socket_path(path: Path) -> Iterator[None]:
    """Hold ``PATH.lock`` (``flock``) while serving on ``path``: remove a stale socket left there by a
    daemon that is gone, but never one a running daemon holds (its lock keeps us out) and never a file
    that is not a socket; remove ours at the end. The kernel drops the lock however its holder ends,
    kill -9 included, so a stale lock file keeps no one out.

    Raises:
        InputError: another process holds the lock, or ``path`` is not a socket.
    """
    with Path(f"{path}.lock").open("a+", encoding="ascii") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"etsi014.unix_socket: another process serves {path} (it holds {lock.name})"
            ) from None
        _remove_socket(path)
        try:
            yield
        finally:
            _remove_socket(path)


def _remove_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InputError(f"etsi014.unix_socket: {path} exists and is not a socket; not removing it")
    path.unlink()
