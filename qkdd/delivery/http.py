"""The ETSI GS QKD 014 v1.1.1 REST API over mutual TLS: h11 on ``trio.SSLStream``.

Theory of operation
-------------------
* TLS ≥ 1.2 with a required client certificate issued by the configured CA: a client without one fails
  the handshake and never reaches HTTP. The SAE is the ``[[etsi014.sae]]`` entry whose certificate
  fingerprint (SHA-256 of the DER) or subject common name matches; a certificate of the CA that names no
  configured SAE gets 401 on every request.
* HTTP/1.1 through h11 (a sans-IO parser; we never parse HTTP ourselves), keep-alive, one request at a
  time per connection, request bodies up to 1 MiB, an idle timeout per connection.
* Routes, under ``/api/v1/keys/``: ``{slave}/status`` (GET), ``{slave}/enc_keys`` (GET with ``number``
  and ``size``, or POST with a Key request), ``{master}/dec_keys`` (GET with ``key_ID``, or POST with
  Key IDs). Every answer is JSON; errors are 400, 401 or 503 with ``{"message", "details"?}``, as the
  standard asks. ``protocol/etsi014-openapi.json`` describes exactly this, and a test checks the live
  server against it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import ssl
import uuid
from collections.abc import Callable, Mapping
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
IDLE_TIMEOUT = 60.0
READ_SIZE = 1 << 16
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
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(settings.ca))
        context.load_cert_chain(str(settings.certificate), str(settings.key))
    except (OSError, ssl.SSLError) as error:
        raise InputError(f"etsi014: cannot load the TLS certificate, key or CA: {error}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
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

    @functools.cached_property
    def context(self) -> ssl.SSLContext:
        return tls_context(self.settings)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        _ = self.context  # a bad certificate or key fails here, before the port opens
        listen = self.settings.listen
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        port = int(listeners[0].socket.getsockname()[1])
        log.info("ETSI 014 key delivery API on https://%s:%d/api/v1/keys/", listen.host, port)
        task_status.started(port)
        await trio.serve_listeners(self._connection, listeners)

    def identify(self, der: bytes | None) -> str | None:
        """The SAE ID a verified client certificate maps to, or ``None``."""
        if not der:
            return None
        sae = self._by_fingerprint.get(hashlib.sha256(der).hexdigest())
        if sae is None:
            names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            sae = next((self._by_name[n.value] for n in names if n.value in self._by_name), None)
        return sae

    async def _connection(self, tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, self.context, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
            caller = self.identify(stream.getpeercert(binary_form=True))
            connection = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
            while True:
                with trio.move_on_after(IDLE_TIMEOUT) as idle:
                    try:
                        request = await _read_request(stream, connection)
                    except h11.RemoteProtocolError as error:
                        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                            await self._respond(stream, connection, 400, {"message": f"bad HTTP: {error}"})
                        return
                if idle.cancelled_caught or request is None:
                    return
                started = trio.current_time()
                status, body, headers = await self._answer(caller, *request)
                await self._respond(stream, connection, status, body, headers, head=request[0] == "HEAD")
                self.observe(request[1], status, trio.current_time() - started)
                if connection.our_state is h11.MUST_CLOSE or connection.their_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            h11.ProtocolError,
        ) as error:
            log.debug("ETSI 014 connection ended: %s", type(error).__name__)
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.aclose()

    async def _respond(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        connection: h11.Connection,
        status: int,
        body: Any,
        extra: list[tuple[str, str]] | None = None,
        *,
        head: bool = False,
    ) -> None:
        """One JSON answer; to a HEAD request its headers only (HTTP sends no body there)."""
        data = json.dumps(body).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(data))), *(extra or [])]
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
        for key_id in key_ids:
            try:
                uuid.UUID(key_id)
            except ValueError:
                raise _Reject(400, f"key_ID {key_id[:64]!r} is not a UUID") from None
        return encode_keys(await self.kme.dec_keys(caller, other, [str(uuid.UUID(k)) for k in key_ids]))


async def _read_request(
    stream: trio.SSLStream[trio.SocketStream], connection: h11.Connection
) -> tuple[str, str, bytes, str] | None:
    """The next request (method, target, body, content type), or ``None`` when the client is done."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(READ_SIZE)
            connection.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("request body over 1 MiB")
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            content_type = dict(request.headers).get(b"content-type", b"").decode("latin-1")
            return request.method.decode(), request.target.decode(), bytes(body), content_type
        elif isinstance(event, (h11.ConnectionClosed, h11.EndOfMessage)) or event is h11.PAUSED:
            return None


def _query(text: str, allowed: set[str]) -> dict[str, str]:
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
