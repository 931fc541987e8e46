"""A small ETSI GS QKD 014 client over one kept-alive mutual-TLS connection (the demo and the benchmark).

Applications normally use their own HTTP stack (README "Getting keys": curl); this one needs only the
standard library. :class:`LeanClient` is the benchmark's: the same requests at a fraction of the CPU.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import socket
import ssl
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from qkdd.errors import QkddError


class ApiError(QkddError):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message", "") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


class Client:
    """An SAE talking to its KME at ``host:port`` with its certificate and key, trusting ``ca``."""

    def __init__(self, host: str, port: int, certificate: Path, key: Path, ca: Path, timeout: float = 30.0):
        context = _sae_context(certificate, key, ca)
        self._connection = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)

    def close(self) -> None:
        self._connection.close()

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request; returns (status, decoded JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        self._connection.request(method, f"/api/v1/keys/{path}", body=data, headers=headers)
        response = self._connection.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else None

    def _ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.request(method, path, body)
        if status != 200:
            raise ApiError(status, answer)
        return answer

    def status(self, slave: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._ok("GET", f"{quote(slave)}/status")
        return answer

    def enc_keys(self, slave: str, number: int = 1, size: int | None = None) -> list[tuple[str, bytes]]:
        request: dict[str, Any] = {"number": number}
        if size is not None:
            request["size"] = size
        return _keys(self._ok("POST", f"{quote(slave)}/enc_keys", request))

    def dec_keys(self, master: str, key_ids: list[str]) -> list[tuple[str, bytes]]:
        request = {"key_IDs": [{"key_ID": key_id} for key_id in key_ids]}
        return _keys(self._ok("POST", f"{quote(master)}/dec_keys", request))


def _sae_context(certificate: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The TLS context of an SAE that shows ``certificate`` (with ``key``) and trusts KMEs of ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.load_cert_chain(str(certificate), str(key))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _keys(container: dict[str, Any]) -> list[tuple[str, bytes]]:
    return [(k["key_ID"], base64.b64decode(k["key"])) for k in container["keys"]]


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\t -~]*")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*")
MAX_HEAD = 16384
MAX_ANSWER = 1 << 20


class LeanClient:
    """An SAE's kept-alive mutual-TLS connection to its KME for the benchmark's pair rows, at a small
    fraction of :class:`Client`'s CPU: each request is written from pre-formatted bytes in one TLS
    record, and each answer is read by a strict HTTP/1.1 reader (status line, every header line,
    exactly ``Content-Length`` bytes of ``application/json``; no chunked body, no ``Connection:
    close``, nothing after the body) and its JSON checked as a Key container of one key. Anything else
    is an :class:`ApiError` (an HTTP error) or a :class:`QkddError` (a broken answer)."""

    def __init__(self, host: str, port: int, certificate: Path, key: Path, ca: Path, timeout: float = 30.0):
        context = _sae_context(certificate, key, ca)
        tcp = socket.create_connection((host, port), timeout=timeout)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request is one write: send it now
        try:
            self._socket = context.wrap_socket(tcp, server_hostname=host)
        except BaseException:
            tcp.close()
            raise
        self._host = host.encode()
        self._requests: dict[str, bytes] = {}  # enc_keys requests by slave

    def close(self) -> None:
        self._socket.close()

    def enc_key(self, slave: str) -> tuple[str, bytes]:
        """One key of the default size for ``slave``: (key ID, key)."""
        request = self._requests.get(slave)
        if request is None:
            request = self._requests[slave] = self._post(f"{quote(slave)}/enc_keys", b'{"number": 1}')
        return self._key(request)

    def dec_key(self, master: str, key_id: str) -> bytes:
        """The key ``key_id`` that ``master`` got for this SAE."""
        body = b'{"key_IDs": [{"key_ID": "%s"}]}' % key_id.encode()
        found, key = self._key(self._post(f"{quote(master)}/dec_keys", body))
        if found != key_id:
            raise QkddError(f"dec_keys of {key_id} answered the key {found}")
        return key

    def _post(self, path: str, body: bytes) -> bytes:
        return (
            b"POST /api/v1/keys/%s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (path.encode(), self._host, len(body), body)
        )

    def _key(self, request: bytes) -> tuple[str, bytes]:
        self._socket.sendall(request)
        status, body = self._answer()
        try:
            answer = json.loads(body)
        except ValueError as error:
            raise QkddError(f"an answer that is not JSON: {error}") from None
        if status != 200:
            raise ApiError(status, answer)
        try:
            [entry] = answer["keys"]
            key_id, key = entry["key_ID"], entry["key"]
            if not isinstance(key_id, str) or not isinstance(key, str):
                raise TypeError("key_ID and key must be strings")
            return key_id, base64.b64decode(key, validate=True)
        except (KeyError, TypeError, ValueError) as error:
            raise QkddError(f"not a Key container of one key: {error!r}") from None

    def _answer(self) -> tuple[int, bytes]:
        """The status and body of the next answer, read strictly (see the class)."""
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > MAX_HEAD:
                raise QkddError("an answer's head is over 16 KiB")
            data += self._receive()
        status_line, *lines = data[:end].split(b"\r\n")
        match = _STATUS_LINE.fullmatch(status_line)
        if match is None:
            raise QkddError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
        headers: dict[bytes, bytes] = {}
        for line in lines:
            header = _HEADER.fullmatch(line)
            if header is None:
                raise QkddError(f"not a header line: {line[:80]!r}")
            name = header[1].lower()
            if name in headers:
                raise QkddError(f"the header {name.decode()} is given twice")
            headers[name] = header[2]
        length = headers.get(b"content-length", b"")
        if not length.isdigit() or int(length) > MAX_ANSWER:
            raise QkddError(f"an answer without a usable Content-Length: {length[:20]!r}")
        if b"transfer-encoding" in headers or headers.get(b"connection", b"").lower() == b"close":
            raise QkddError("an answer that is not a kept-alive one with a Content-Length")
        if headers.get(b"content-type") != b"application/json":
            raise QkddError(f"an answer of type {headers.get(b'content-type', b'')[:40]!r}")
        body = data[end + 4 :]
        while len(body) < int(length):
            body += self._receive()
        if len(body) != int(length):
            raise QkddError("more bytes after the answer than its Content-Length")
        return int(match[1]), body

    def _receive(self) -> bytes:
        data = self._socket.recv(1 << 16)
        if not data:
            raise QkddError("the KME closed the connection")
        return data


def application(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One application of ``qkdd bench etsi014``'s pair rows, run in a process of its own (:func:`main`):
    connects as the master SAE to the KME at ``spec["master"]`` and as its slave to the one at
    ``spec["slave"]`` (each ``[host, port, certificate, key, CA]``), says ``ready``, waits for ``go``
    on its input, then ``spec["pairs"]`` times gets a key with enc_keys and that key with dec_keys at
    the other site, checking that both are the same bytes. Returns the latencies of each call, when it
    started and ended (``time.monotonic``: one clock for every process) and the CPU time it used."""
    with (
        contextlib.closing(_connect(spec["master"])) as master,
        contextlib.closing(_connect(spec["slave"])) as slave,
    ):
        print("ready", flush=True)
        if sys.stdin.readline() != "go\n":
            raise QkddError("not told to go")
        enc: list[float] = []
        dec: list[float] = []
        cpu, started = time.process_time(), time.monotonic()
        for _ in range(spec["pairs"]):
            t = time.perf_counter()
            key_id, key = master.enc_key(spec["slave_sae"])
            between = time.perf_counter()
            got = slave.dec_key(spec["master_sae"], key_id)
            enc.append(between - t)
            dec.append(time.perf_counter() - between)
            if got != key:
                raise QkddError("dec_keys at the slave's KME gave other bytes than enc_keys at the master's")
        ended = time.monotonic()
    return {"enc": enc, "dec": dec, "start": started, "end": ended, "cpu_seconds": time.process_time() - cpu}


def _connect(site: Sequence[Any]) -> LeanClient:
    host, port, certificate, key, ca = site
    return LeanClient(str(host), int(port), Path(certificate), Path(key), Path(ca))


def main(argv: Sequence[str]) -> int:
    """``python -m qkdd.delivery.client SPEC``: :func:`application` of the JSON ``SPEC``; its result as
    one JSON line on the output, or ``{"error": ...}``."""
    try:
        result = application(json.loads(argv[0]))
    except (OSError, QkddError) as error:
        result = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
