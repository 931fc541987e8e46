"""The ETSI 014 server of qkdd/delivery/http.py without sockets: only 4xx for bad input; oversize bodies,
refused TLS handshakes and the Unix socket's uids over memory streams."""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdd.auth import pki
from qkdd.config import SaeIdentity
from qkdd.delivery import http
from qkdd.delivery.http import HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, REFUSAL_LOG_SECONDS, ApiServer, RefusalLog


class _Keys:
    """A key manager that hands out one key to anyone and knows every key ID."""

    async def status(self, caller: str, other: str) -> dict[str, Any]:
        return {"source_KME_ID": "a", "target_KME_ID": "b"}

    async def enc_keys(self, caller: str, saes: list[str], number: int, size: int) -> list[tuple[str, bytes]]:
        # the size is the request's, unchecked (the real KME refuses one out of range): keep it in bounds
        # so that hypothesis's 10**11 or -5 cost no memory and raise nothing here
        key = bytes(min(max(size, 0), 4096) // 8)
        return [("5f0c9b9e-0d2b-4d46-a3c5-2f7b0e7f1c11", key)] * min(number, 2)

    async def dec_keys(self, caller: str, other: str, ids: list[str]) -> list[tuple[str, bytes]]:
        return [(key_id, bytes(32)) for key_id in ids]


def _answer(method: str, target: str, body: bytes = b"", content_type: str = "application/json") -> Any:
    server = ApiServer(_Keys(), settings=_Settings())  # type: ignore[arg-type]
    return trio.run(server._answer, "sae-a", method, target, body, content_type)


class _Settings:
    key_size = 256
    max_sae_id_count = 4
    max_key_per_request = 128
    saes: tuple[SaeIdentity, ...] = ()


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "G\u00c9T"]),
    action=st.sampled_from(["status", "enc_keys", "dec_keys", "nothing", ""]),
    query=st.text(max_size=60),
    body=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=24), inner, max_size=4)
            ),
            max_leaves=12,
        ).map(lambda value: json.dumps(value).encode()),
        st.fixed_dictionaries(
            {},
            optional={
                "number": st.one_of(st.integers(), st.text(max_size=4), st.booleans()),
                "size": st.one_of(st.integers(), st.text(max_size=4)),
                "key_IDs": st.lists(st.dictionaries(st.just("key_ID"), st.text(max_size=40)), max_size=3),
                "additional_slave_SAE_IDs": st.lists(st.text(max_size=8), max_size=5),
            },
        ).map(lambda value: json.dumps(value).encode()),
    ),
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", ""]),
)
def test_any_query_and_body_get_an_answer_below_500(
    method: str, action: str, query: str, body: bytes, content_type: str
) -> None:
    status, answer, headers = _answer(method, f"/api/v1/keys/sae-b/{action}?{query}", body, content_type)
    assert status == 200 or 400 <= status < 500, (status, answer)
    assert isinstance(answer, dict)
    if status == 405:
        assert dict(headers)["allow"] in ("GET", "GET, POST")


def test_numbers_are_ascii_digits_in_a_query_and_json_integers_in_a_body() -> None:
    assert _answer("GET", "/api/v1/keys/sae-b/enc_keys?number=2")[0] == 200
    for digits in ("%C2%B2", "%D9%A1", "%EF%BC%91", "1" * 19, "-1", "+1", "1.0"):
        status, answer, _ = _answer("GET", f"/api/v1/keys/sae-b/enc_keys?number={digits}")
        assert status == 400 and "ASCII digits" in answer["message"], digits
    assert _answer("POST", "/api/v1/keys/sae-b/enc_keys", b'{"number": 2}')[0] == 200
    for value in ('"2"', "true", "2.0", "[2]"):
        status, answer, _ = _answer("POST", "/api/v1/keys/sae-b/enc_keys", f'{{"number": {value}}}'.encode())
        assert status == 400 and "JSON integer" in answer["message"], value


def test_a_body_must_be_json_and_other_methods_get_405_with_allow() -> None:
    status, answer, _ = _answer("POST", "/api/v1/keys/sae-b/enc_keys", b'{"number": 1}', "text/plain")
    assert status == 400 and "application/json" in answer["message"]
    assert _answer("POST", "/api/v1/keys/sae-b/enc_keys", b"", "")[0] == 200  # no body: the defaults
    for method, action, allow in (("HEAD", "status", "GET"), ("DELETE", "enc_keys", "GET, POST")):
        status, answer, headers = _answer(method, f"/api/v1/keys/sae-b/{action}")
        assert status == 405 and dict(headers) == {"allow": allow} and method in answer["message"]


# -- the connection layer over memory streams: oversize bodies, refused handshakes, the Unix socket's uids


SAES = (SaeIdentity("sae-a", common_name="sae-a"), SaeIdentity("sae-local", uid=4321))


@dataclass
class _TlsSettings(_Settings):
    certificate: Path = Path()
    key: Path = Path()
    ca: Path = Path()
    saes: tuple[SaeIdentity, ...] = SAES


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tls(tmp_path_factory.mktemp("tls"))


def make_tls(folder: Path) -> Path:
    """In ``folder``, a CA with a KME certificate and the SAE ``sae-a``, and two other CAs that issued an
    ``sae-a`` too: ``other`` of another name, ``twin`` of the same name as ours."""
    for ca, name in (("ca", "qkdd CA"), ("other", "another CA"), ("twin", "qkdd CA")):
        pki.init_ca(folder / ca, algorithm="ecdsa-p256", days=1, name=name)
        pki.issue("sae-a", folder / ca, folder / ca, algorithm="ecdsa-p256", usage="client", days=1)
    pki.issue(
        "kme", folder / "ca", folder / "ca", algorithm="ecdsa-p256", usage="server", days=1, hosts=("kme",)
    )
    return folder


def make_server(tls: Path | None = None) -> ApiServer:
    """A server of a key manager that hands out one key to anyone; with ``tls`` (:func:`make_tls`), its
    certificate, key and CA; ``sae-a`` and ``sae-local`` (uid 4321) its SAEs."""
    settings = (
        _TlsSettings()
        if tls is None
        else _TlsSettings(tls / "ca/kme.crt", tls / "ca/kme.key", tls / "ca/ca.crt")
    )
    return ApiServer(_Keys(), settings)  # type: ignore[arg-type]


def client_context(tls: Path, issuer: str | None) -> ssl.SSLContext:
    """An SAE's TLS context: with the certificate ``issuer``'s CA gave ``sae-a``, or none."""
    context = ssl.create_default_context(cafile=str(tls / "ca/ca.crt"))
    if issuer is not None:
        context.load_cert_chain(str(tls / issuer / "sae-a.crt"), str(tls / issuer / "sae-a.key"))
    return context


@dataclass
class _Answer:
    status: int
    headers: dict[bytes, bytes]
    json: Any


async def _exchange(stream: trio.abc.Stream, data: bytes, body: bytes | list[bytes] = b"") -> _Answer:
    """Send a request (``data``, then ``body`` in one piece or chunks), read the answer to the end, check
    it is JSON and that the server then ends the connection if it said so."""
    client = h11.Connection(h11.CLIENT)
    await stream.send_all(data)
    for chunk in [body] if isinstance(body, bytes) else body:
        await stream.send_all(chunk)
    events: list[Any] = []
    while not events or not isinstance(events[-1], h11.EndOfMessage):
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(bytes(await stream.receive_some(1 << 16)))
        elif not isinstance(event, h11.InformationalResponse):
            events.append(event)
    response = events[0]
    assert isinstance(response, h11.Response)
    payload = b"".join(e.data for e in events if isinstance(e, h11.Data))
    answer = _Answer(response.status_code, dict(response.headers), json.loads(payload))
    if answer.headers.get(b"connection") == b"close":
        assert await stream.receive_some(1 << 16) == b""  # the server ended its side: FIN, no reset
    return answer


def _run(test: Any) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def _request(method: str, path: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} /api/v1/keys/{path} HTTP/1.1", "host: kme", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("framing", ["content-length", "chunked", "expect-100"])
def test_an_oversize_body_gets_its_400_and_the_server_reads_the_rest_before_closing(framing: str) -> None:
    big = b"[" + b"0," * (5 << 20) + b"0]"  # 10 MiB of valid JSON
    headers = [("content-type", "application/json")]
    if framing == "chunked":
        headers.append(("transfer-encoding", "chunked"))
        chunks = [
            b"%x\r\n%b\r\n" % (len(c), c) for c in (big[i : i + 65536] for i in range(0, len(big), 65536))
        ]
        body: bytes | list[bytes] = [*chunks, b"0\r\n\r\n"]
    else:
        headers.append(("content-length", str(len(big))))
        if framing == "expect-100":
            headers.append(("expect", "100-continue"))
        body = b"" if framing == "expect-100" else big  # told no, a client sends no body

    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(make_server().serve_unix, server, 4321)
            with trio.fail_after(30):
                response = await _exchange(client, _request("POST", "sae-b/enc_keys", headers), body)
            assert response.status == 400 and "over 1 MiB" in response.json["message"]
            assert response.headers[b"connection"] == b"close"
            await client.aclose()

    _run(main)


def test_a_body_of_1_mib_is_read_whole_and_an_expect_100_gets_its_continue() -> None:
    body = b'{"number": 1' + b" " * ((1 << 20) - 13) + b"}"
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("expect", "100-continue"),
    ]

    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(make_server().serve_unix, server, 4321)
            with trio.fail_after(30):
                await client.send_all(_request("POST", "sae-b/enc_keys", headers))
                assert (await client.receive_some(1 << 16)).startswith(b"HTTP/1.1 100 ")
                response = await _exchange(client, b"", body)
            assert response.status == 200 and len(response.json["keys"]) == 1
            await client.aclose()

    _run(main)


def test_a_local_process_is_the_sae_of_its_uid_and_any_other_uid_gets_401() -> None:
    server = make_server()
    assert server.identify_uid(4321) == "sae-local" and server.identify_uid(0) is None
    assert server.identify(None) is None  # a certificate never names the uid-only SAE

    async def main() -> None:
        for uid, status in ((4321, 200), (4322, 401), (0, 401)):
            client, stream = trio.testing.memory_stream_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve_unix, stream, uid)
                with trio.fail_after(10):
                    for method in ("GET", "POST", "DELETE"):  # the same answer whatever is asked
                        headers = [("content-type", "application/json"), ("content-length", "0")]
                        response = await _exchange(client, _request(method, "sae-b/status", headers))
                        if status == 401 or method == "GET":
                            assert response.status == status, (uid, method)
                    if status == 401:
                        assert response.json == {"message": f"uid {uid} names no SAE of this KME"}
                    await client.aclose()

    _run(main)


def test_the_refusal_log_keeps_one_line_per_peer_per_interval() -> None:
    now = [0.0]
    refusals = RefusalLog(60.0, peers=3, clock=lambda: now[0])
    assert refusals.note("10.0.0.1") == 0 and refusals.note("10.0.0.2") == 0
    assert refusals.note("10.0.0.1") is None and refusals.note("10.0.0.1") is None
    now[0] = 59.9
    assert refusals.note("10.0.0.1") is None
    now[0] = 60.0
    assert refusals.note("10.0.0.1") == 3  # its line says how many were not logged
    assert refusals.note("10.0.0.2") == 0
    # at most 3 addresses are remembered; the others share one line per interval
    assert refusals.note("10.0.0.3") == 0
    assert refusals.note("10.0.0.4") == 0 and refusals.note("10.0.0.5") is None
    now[0] = 120.0
    assert refusals.note("10.0.0.5") == 0  # the interval of the first ones is over: room again


@pytest.mark.parametrize(
    ("issuer", "version", "why"),
    [
        (None, ssl.TLSVersion.TLSv1_3, "no client certificate"),
        (None, ssl.TLSVersion.TLSv1_2, "no client certificate"),
        ("other", ssl.TLSVersion.TLSv1_3, "a client certificate of another CA (unable to get local issuer"),
        ("other", ssl.TLSVersion.TLSv1_2, "a client certificate of another CA (unable to get local issuer"),
        (
            "twin",
            ssl.TLSVersion.TLSv1_3,
            "a client certificate of another CA (certificate signature failure)",
        ),
    ],
)
def test_a_refused_handshake_gets_a_tls_alert_and_one_log_line_per_peer_per_minute(
    tls: Path, issuer: str | None, version: ssl.TLSVersion, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(tls)
    context = client_context(tls, issuer)
    context.maximum_version = version

    async def refused(peer: str) -> ssl.SSLError:
        client, stream = trio.testing.memory_stream_pair()
        tls_client = trio.SSLStream(client, context, server_hostname="kme")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_tls, stream, peer)
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as caught:
                await tls_client.do_handshake()  # TLS 1.3: the client is done before the server checks
                await tls_client.send_all(_request("GET", "sae-b/status", []))
                await tls_client.receive_some(1 << 16)
            await client.aclose()
        assert isinstance(caught.value.__cause__, ssl.SSLError)
        return caught.value.__cause__

    async def main() -> None:
        for peer in ("192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.1"):
            error = await refused(peer)
            # an alert from the server, not the end of the stream
            assert not isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)), error
            assert "ALERT" in (error.reason or ""), error
        await trio.sleep(REFUSAL_LOG_SECONDS)
        await refused("192.0.2.1")

    with caplog.at_level(logging.WARNING, logger="qkdd"):
        _run(main)
    lines = [r.getMessage() for r in caplog.records if "refused a TLS handshake" in r.getMessage()]
    assert [line.split(": ", 2)[1] for line in lines] == [
        f"refused a TLS handshake from {peer}" for peer in ("192.0.2.1", "192.0.2.2", "192.0.2.1")
    ], lines
    assert all(line.split(": ", 2)[2].startswith(why) for line in lines), lines
    assert lines[2].endswith(" (and 2 more not logged since the last such line)"), lines


def test_a_handshake_that_never_comes_is_logged_and_a_client_that_leaves_is_not(
    tls: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(tls)

    async def main() -> None:
        client, stream = trio.testing.memory_stream_pair()
        with trio.fail_after(HANDSHAKE_TIMEOUT + 5):
            await server.serve_tls(stream, "192.0.2.9")  # a client that sends nothing
        client, stream = trio.testing.memory_stream_pair()
        await client.aclose()  # a port check: connect, close
        await server.serve_tls(stream, "192.0.2.10")

    with caplog.at_level(logging.WARNING, logger="qkdd"):
        _run(main)
    lines = [r.getMessage() for r in caplog.records if "refused a TLS handshake" in r.getMessage()]
    assert lines == [
        f"ETSI 014: refused a TLS handshake from 192.0.2.9: no handshake within {HANDSHAKE_TIMEOUT:g} s"
    ]


def test_connections_that_never_finish_a_handshake_cannot_lock_an_sae_out(
    tls: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MAX_HANDSHAKES connections silent in their handshake, one more closes the oldest of them (and
    says so, once): an SAE that connects then is served, and the others stay open."""
    monkeypatch.setattr(http, "MAX_HANDSHAKES", 3)
    server = make_server(tls)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            silent = []
            for i in range(4):  # the fourth closes the first
                client, stream = trio.testing.memory_stream_pair()
                nursery.start_soon(server.serve_tls, stream, f"192.0.2.{i}")
                silent.append(client)
                await trio.testing.wait_all_tasks_blocked()
            assert await _read_to_end(silent[0]) == b""
            client, stream = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve_tls, stream, "192.0.2.200")  # closes 192.0.2.1's
            tls_client = trio.SSLStream(client, client_context(tls, "ca"), server_hostname="kme")
            assert (await _exchange(tls_client, STATUS)).status == 200
            assert list(server._handshaking.values()) == ["192.0.2.2", "192.0.2.3"]
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, logger="qkdd"):
        _run(main)
    lines = [r.getMessage() for r in caplog.records if "still in the TLS handshake" in r.getMessage()]
    assert [line.split(": ")[1] for line in lines] == [
        f"closed a connection from 192.0.2.{i} still in the TLS handshake" for i in (0, 1)
    ]


# -- hostile TLS clients (qkdd/delivery/http.py's _TlsStream): each scenario takes the connection's two
# ends from ``pair``, here memory streams; tests/e2e/test_etsi014.py runs them on a socket pair too, where
# the server reads and writes the socket's descriptor itself.

Pair = Any  # () -> (client end, server end), both trio.abc.HalfCloseableStream
STATUS = _request("GET", "sae-b/status", [])
PEER = "192.0.2.7"


class _Dribble(trio.abc.HalfCloseableStream):
    """A client's end that sends one byte at a time: every TLS record reaches the server in pieces."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        for i in range(len(data)):
            await self.inner.send_all(bytes(data[i : i + 1]))

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _serving(server: ApiServer, stream: trio.abc.HalfCloseableStream, ended: trio.Event) -> None:
    """``serve_tls`` on ``stream``; ``ended`` once it returned (it must: nothing may escape it)."""
    await server.serve_tls(stream, PEER)
    ended.set()


async def _read_to_end(stream: trio.abc.ReceiveStream) -> bytes:
    """What ``stream`` still brings until the server ends it (an error counts as the end)."""
    data = b""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while chunk := await stream.receive_some(1 << 16):
            data += chunk
    return data


async def hostile_fragmented_records(tls: Path, pair: Pair) -> None:
    """Every byte of the handshake and of two requests in its own read: both answered, in keep-alive."""
    server = make_server(tls)
    client, stream = pair()
    ended = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serving, server, stream, ended)
        tls_client = trio.SSLStream(_Dribble(client), client_context(tls, "ca"), server_hostname="kme")
        for _ in range(2):
            assert (await _exchange(tls_client, STATUS)).status == 200
        await tls_client.aclose()
        await ended.wait()


async def hostile_bad_record(tls: Path, pair: Pair, record: str) -> None:
    """After an answered request, a record OpenSSL must refuse (one longer than TLS allows, one that
    fails its MAC, a ClientHello as if to start again): the server ends the connection, unhurt."""
    server = make_server(tls)
    client, stream = pair()
    ended = trio.Event()
    raw = {
        "oversize": b"\x17\x03\x03\xff\xff" + bytes(65535),
        "bad-mac": b"\x17\x03\x03\x00\x40" + bytes(64),
        "handshake-again": b"\x16\x03\x01\x00\x40\x01\x00\x00\x3c\x03\x03" + bytes(60),
    }[record]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serving, server, stream, ended)
        tls_client = trio.SSLStream(client, client_context(tls, "ca"), server_hostname="kme")
        assert (await _exchange(tls_client, STATUS)).status == 200
        with contextlib.suppress(trio.BrokenResourceError):
            await client.send_all(raw)
        await _read_to_end(client)  # an alert, perhaps, then the end
        await ended.wait()
        await client.aclose()


async def hostile_endings(tls: Path, pair: Pair) -> None:
    """A client that ends with close_notify, one that just closes, and one that leaves mid-request: the
    server ends each connection without an error."""
    server = make_server(tls)
    for ending in ("close_notify", "abrupt", "mid-request", "half-close"):
        client, stream = pair()
        ended = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serving, server, stream, ended)
            tls_client = trio.SSLStream(client, client_context(tls, "ca"), server_hostname="kme")
            assert (await _exchange(tls_client, STATUS)).status == 200
            if ending == "close_notify":
                await tls_client.aclose()  # https_compatible=False: close_notify first
            elif ending == "mid-request":
                await tls_client.send_all(STATUS[:20])
                await client.aclose()
            elif ending == "half-close":  # the request, then FIN: the answer still comes
                await tls_client.send_all(STATUS)
                await client.send_eof()
                assert b"HTTP/1.1 200 " in await _read_to_end(tls_client)
                await client.aclose()
            else:
                await client.aclose()
            await ended.wait()


HOSTILE: dict[str, tuple[Any, tuple[str, ...]]] = {
    "fragmented-records": (hostile_fragmented_records, ()),
    "oversize-record": (hostile_bad_record, ("oversize",)),
    "bad-mac-record": (hostile_bad_record, ("bad-mac",)),
    "plaintext-client-hello": (hostile_bad_record, ("handshake-again",)),
    "endings": (hostile_endings, ()),
}
"""The scenarios by name: (the coroutine function, its arguments after ``tls`` and ``pair``)."""


def _memory_pair() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
    return trio.testing.memory_stream_pair()


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_tls_client_gets_its_connection_ended_and_the_server_goes_on(
    tls: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    scenario, args = HOSTILE[name]

    async def main() -> None:
        with trio.fail_after(30):
            await scenario(tls, _memory_pair, *args)

    with caplog.at_level(logging.WARNING, logger="qkdd"):
        _run(main)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


class _Slow(_Keys):
    """A key manager that waits once (as the real one does for its store) and tells what it began and
    what it finished."""

    def __init__(self) -> None:
        self.begun = 0
        self.finished = 0

    async def enc_keys(self, caller: str, saes: list[str], number: int, size: int) -> list[tuple[str, bytes]]:
        self.begun += 1
        await trio.lowlevel.checkpoint()
        self.finished += 1
        return await super().enc_keys(caller, saes, number, size)


class _Late(trio.abc.HalfCloseableStream):
    """A server's end whose reads come back only after the idle timeout, whatever cancels them: a request
    that arrives just as the timeout runs out."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with trio.CancelScope(shield=True):
            await trio.sleep(IDLE_TIMEOUT + 1)
            return bytes(await self.inner.receive_some(max_bytes))

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_request_read_as_the_idle_timeout_runs_out_is_answered_whole_or_not_begun() -> None:
    keys = _Slow()
    server = ApiServer(keys, _TlsSettings())  # type: ignore[arg-type]
    headers = [("content-type", "application/json"), ("content-length", "0")]

    async def main() -> None:
        client, stream = trio.testing.memory_stream_pair()
        with trio.fail_after(3 * IDLE_TIMEOUT):
            await client.send_all(_request("POST", "sae-b/enc_keys", headers))
            await server.serve_unix(_Late(stream), 4321)
            answer = await _read_to_end(client)
        assert keys.begun == keys.finished, "the KME was cut off mid-request"
        assert answer == b"" or b"HTTP/1.1 200 " in answer

    _run(main)


def test_a_client_that_does_not_read_its_answer_is_cut_off_after_the_idle_timeout(tls: Path) -> None:
    server = make_server(tls)

    async def main() -> None:
        client, stream = trio.testing.lockstep_stream_pair()  # no buffer: a write waits for its reader
        ended = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serving, server, stream, ended)
            tls_client = trio.SSLStream(client, client_context(tls, "ca"), server_hostname="kme")
            with trio.fail_after(IDLE_TIMEOUT + 30):
                await tls_client.send_all(STATUS)
                began = trio.current_time()
                await ended.wait()  # and never reads
            assert trio.current_time() - began == pytest.approx(IDLE_TIMEOUT, abs=1)
            await client.aclose()

    _run(main)


def test_a_request_sent_a_byte_at_a_time_must_arrive_within_the_idle_timeout(tls: Path) -> None:
    """Slowloris: a byte every few seconds does not keep a connection open longer than the timeout."""
    server = make_server(tls)

    async def main() -> None:
        client, stream = trio.testing.memory_stream_pair()
        ended = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serving, server, stream, ended)
            tls_client = trio.SSLStream(client, client_context(tls, "ca"), server_hostname="kme")
            with trio.fail_after(IDLE_TIMEOUT + 30):
                await tls_client.do_handshake()
                began = trio.current_time()
                with contextlib.suppress(trio.BrokenResourceError):
                    for byte in STATUS[:-1]:  # a TLS record each
                        if ended.is_set():
                            break
                        await tls_client.send_all(bytes([byte]))
                        await trio.sleep(IDLE_TIMEOUT / 20)
                await ended.wait()
            assert trio.current_time() - began <= IDLE_TIMEOUT + 1
            assert await _read_to_end(client) == b""  # no answer
            await client.aclose()

    _run(main)


def test_the_server_refuses_renegotiation(tls: Path) -> None:
    """A TLS 1.2 client may not start a new handshake on its connection, whatever OpenSSL's build says."""
    assert make_server(tls).context.options & ssl.OP_NO_RENEGOTIATION
