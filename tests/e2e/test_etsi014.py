"""ETSI GS QKD 014 at both sites: two `qkdd run` processes, a real HTTPS client (httpx) with client
certificates, the OpenAPI document checked against what the server answers."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio

from qkdd import control
from qkdd.auth import pki
from qkdd.daemon import ETSI014_FILE, read_listen_address
from qkdd.delivery import demo as delivery_demo
from qkdd.delivery import http as api_http
from qkdd.demo import ETSI014_SOCKET, spawn
from qkdd.errors import InputError, QkddError
from qkdd.spec import SPEC_PATH
from qkdd.store import KeyStore
from tests.delivery import test_http
from tests.helpers import wait_until

SIM = {"pulses_per_frame": 1 << 20, "z_probability": 0.7, "seed": 5, "single_photon": True}
ROUNDS = 6
EXTRA = {"alice": ["sae-alice2"], "bob": ["sae-bob2"]}
OPENAPI = json.loads((SPEC_PATH.parent / "etsi014-openapi.json").read_text())
HTTP_METHODS = ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE")  # OpenAPI's, less QUERY
BIG = b"[" + b"0," * (5 << 20) + b"0]"  # 10 MiB of valid JSON: only its size is wrong
pytestmark = pytest.mark.timeout(240)


@dataclass
class Sites:
    folder: Path
    urls: dict[str, str]
    daemons: tuple[subprocess.Popen[bytes], ...] = ()

    def client(self, sae: str, site: str | None = None, *, certificate: bool = True) -> httpx.Client:
        """An httpx client of ``sae`` talking to its own site's KME (or ``site``'s)."""
        site = site or ("alice" if sae.startswith("sae-alice") else "bob")
        tls = self.folder / "etsi014"
        context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
        if certificate:
            context.load_cert_chain(str(tls / f"{sae}.crt"), str(tls / f"{sae}.key"))
        return httpx.Client(base_url=self.urls[site] + "/api/v1/keys/", verify=context, timeout=30)

    def local(self, site: str) -> httpx.Client:
        """An httpx client on ``site``'s Unix socket: its SAE of SAES, by this process's uid."""
        transport = httpx.HTTPTransport(uds=str(self.folder / site / ETSI014_SOCKET))
        return httpx.Client(transport=transport, base_url="http://localhost/api/v1/keys/", timeout=30)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    folder = tmp_path_factory.mktemp("etsi014")
    with delivery_demo.running_pair(folder, SIM, 600, 180.0, rounds=ROUNDS, extra_saes=EXTRA) as pair:
        yield Sites(folder, _urls(folder), tuple(pair.processes.values()))


def keys_of(response: httpx.Response) -> list[tuple[str, bytes]]:
    assert response.status_code == 200, response.text
    check("KeyContainer", response.json())
    return [(k["key_ID"], base64.b64decode(k["key"])) for k in response.json()["keys"]]


def check(schema: str, body: Any) -> None:
    """Validate a body against a schema of the OpenAPI document (JSON Schema 2020-12)."""
    resolver = {"components": OPENAPI["components"], "$ref": f"#/components/schemas/{schema}"}
    jsonschema.validate(body, resolver, cls=jsonschema.Draft202012Validator)


def refused(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    check("Error", response.json())
    return str(response.json()["message"])


def stored(sites: Sites) -> int:
    with sites.client("sae-alice") as alice:
        response = alice.get("sae-bob/status")
    assert response.status_code == 200
    return int(response.json()["stored_key_count"])


def test_status_has_every_field_and_true_counts(sites: Sites) -> None:
    with sites.client("sae-alice") as alice, sites.client("sae-bob") as bob:
        status = alice.get("sae-bob/status").json()
        check("Status", status)
        assert status["source_KME_ID"] == "alice-kme" and status["target_KME_ID"] == "bob-kme"
        assert status["master_SAE_ID"] == "sae-alice" and status["slave_SAE_ID"] == "sae-bob"
        assert status["key_size"] == 256 and status["max_SAE_ID_count"] == 8
        # Bob allocates every key from one pool, so both sites count the same keys
        assert bob.get("sae-alice/status").json()["stored_key_count"] == status["stored_key_count"] > 0
        before = status["stored_key_count"]
        keys_of(alice.post("sae-bob/enc_keys", json={"number": 3}))
        assert alice.get("sae-bob/status").json()["stored_key_count"] == before - 3
        refused(alice.get("sae-nobody/status"), 400)


@pytest.mark.parametrize("form", ["GET", "POST"])
@pytest.mark.parametrize(("master", "slave"), [("sae-alice", "sae-bob"), ("sae-bob", "sae-alice")])
def test_enc_keys_at_one_site_and_dec_keys_at_the_other_give_identical_bytes(
    sites: Sites, form: str, master: str, slave: str
) -> None:
    with sites.client(master) as m, sites.client(slave) as s:
        if form == "GET":
            sent = keys_of(m.get(f"{slave}/enc_keys", params={"number": 2, "size": 512}))
            got = [keys_of(s.get(f"{master}/dec_keys", params={"key_ID": key_id}))[0] for key_id, _ in sent]
        else:
            sent = keys_of(m.post(f"{slave}/enc_keys", json={"number": 2, "size": 512}))
            got = keys_of(s.post(f"{master}/dec_keys", json={"key_IDs": [{"key_ID": k} for k, _ in sent]}))
        assert got == sent and all(len(key) == 64 for _, key in sent)
        assert all(uuid.UUID(key_id).version == 8 for key_id, _ in sent)
        # handed out once at each site: the slave cannot fetch them again
        assert "already delivered" in refused(s.get(f"{master}/dec_keys", params={"key_ID": sent[0][0]}), 400)
        # an empty body is the default request: one key of key_size
        [(_, key)] = keys_of(m.post(f"{slave}/enc_keys", content=b""))
        assert len(key) == 32


def test_every_named_slave_gets_the_keys_once_and_no_other_sae_does(sites: Sites) -> None:
    with (
        sites.client("sae-alice") as master,
        sites.client("sae-bob") as slave,
        sites.client("sae-bob2") as other,
    ):
        [(key_id, key)] = keys_of(master.post("sae-bob/enc_keys", json={}))
        ask = {"key_IDs": [{"key_ID": key_id}]}
        refused(other.post("sae-alice/dec_keys", json=ask), 401)  # a slave not named
        refused(slave.post("sae-alice2/dec_keys", json=ask), 401)  # not the master that got it
        refused(master.post("sae-alice/dec_keys", json=ask), 401)  # the master's site never hands it again
        assert keys_of(slave.post("sae-alice/dec_keys", json=ask)) == [(key_id, key)]
        both = keys_of(master.post("sae-bob/enc_keys", json={"additional_slave_SAE_IDs": ["sae-bob2"]}))
        ask = {"key_IDs": [{"key_ID": both[0][0]}]}
        assert keys_of(slave.post("sae-alice/dec_keys", json=ask)) == both
        assert keys_of(other.post("sae-alice/dec_keys", json=ask)) == both


def test_bad_requests_are_400_with_a_message(sites: Sites) -> None:
    with sites.client("sae-alice") as alice, sites.client("sae-bob") as bob:
        before = stored(sites)
        for bad in (
            {"size": 100},  # not a multiple of 8
            {"size": 16},  # below min_key_size
            {"size": 8200},  # above max_key_size
            {"number": 0},
            {"number": 129},  # above max_key_per_request
            {"extension_mandatory": [{"abc_route_type": "direct"}]},
            {"additional_slave_SAE_IDs": ["sae-unknown"]},
            {"surprise": 1},
        ):
            assert refused(alice.post("sae-bob/enc_keys", json=bad), 400)
        assert "size" in refused(alice.get("sae-bob/enc_keys", params={"size": "abc"}), 400)
        assert "not JSON" in refused(
            alice.post(
                "sae-bob/enc_keys", content=b'{"number": 1', headers={"content-type": "application/json"}
            ),
            400,
        )
        refused(alice.post("sae-bob/enc_keys", content=b"[1, 2]"), 400)
        # numbers: ASCII digits in a query (int() would take "²" or Arabic-Indic digits), JSON integers
        for digits in ("\u00b2", "\u0661", "\uff11", "1" * 19):
            assert "ASCII digits" in refused(alice.get("sae-bob/enc_keys", params={"number": digits}), 400)
        assert "JSON integer" in refused(alice.post("sae-bob/enc_keys", json={"number": "1"}), 400)
        assert "JSON integer" in refused(alice.post("sae-bob/enc_keys", json={"size": True}), 400)
        plain = {"content-type": "text/plain"}
        assert "application/json" in refused(
            alice.post("sae-bob/enc_keys", content=b'{"number": 1}', headers=plain), 400
        )
        # a method the resource does not take: 405 with Allow (HEAD too, headers only)
        deleted = alice.delete("sae-bob/enc_keys")
        refused(deleted, 405)
        assert deleted.headers["allow"] == "GET, POST"
        head = alice.head("sae-bob/status")
        assert head.status_code == 405 and head.headers["allow"] == "GET" and head.content == b""
        refused(alice.post("sae-bob/status", json={}), 405)
        refused(alice.get("sae-bob/nothing"), 400)
        refused(bob.get("sae-alice/dec_keys", params={"key_ID": str(uuid.uuid4())}), 400)  # unknown key
        refused(bob.get("sae-alice/dec_keys", params={"key_ID": "not-a-uuid"}), 400)
        refused(bob.post("sae-alice/dec_keys", json={"key_IDs": []}), 400)
        refused(bob.post("sae-alice/dec_keys", content=b"\xff\xfe"), 400)
        assert stored(sites) == before  # no bad request consumed anything
        # extension_optional is ignored, as the standard allows
        keys_of(alice.post("sae-bob/enc_keys", json={"extension_optional": [{"x": 1}]}))


def test_the_bench_pair_row_gets_each_key_at_both_sites_and_says_what_the_clients_cost(sites: Sites) -> None:
    """``qkdd bench etsi014``'s pair row: its applications (one process each, LeanClient) get keys both
    sites hand out with the same bytes (each application checks), and the row reports the CPU of the
    clients and of the daemons."""
    pairs = 6 * delivery_demo.PAIR_CLIENTS
    row = delivery_demo._measure_pairs("test", sites.folder, pairs, sites.daemons)
    assert row["calls"] == 2 * pairs and row["keys_per_second"] > 0
    assert row["client_cpu_ms_per_pair"] > 0 and row["daemon_cpu_ms_per_pair"] > 0


def test_a_pair_row_whose_applications_cannot_connect_says_why(tmp_path: Path) -> None:
    with pytest.raises(QkddError, match="alice's key delivery API is not up"):
        delivery_demo._measure_pairs("test", tmp_path, 8, ())
    for role in ("alice", "bob"):  # APIs, but no SAE certificates: the application process says so
        (tmp_path / role).mkdir()
        (tmp_path / role / ETSI014_FILE).write_text("127.0.0.1:1\n")
    with pytest.raises(QkddError, match="did not start: FileNotFoundError: "):
        delivery_demo._measure_pairs("test", tmp_path, 8, ())


def test_not_enough_key_is_503_and_consumes_nothing(sites: Sites) -> None:
    with sites.client("sae-alice") as alice, sites.client("sae-bob") as bob:
        before = stored(sites)
        assert before * 256 < 128 * 8192  # the link ran a few rounds only
        assert "asked" in refused(alice.post("sae-bob/enc_keys", json={"number": 128, "size": 8192}), 503)
        assert "asked" in refused(bob.post("sae-alice/enc_keys", json={"number": 128, "size": 8192}), 503)
        assert stored(sites) == before


def test_an_sae_without_a_certificate_cannot_connect_and_an_unknown_one_gets_401(sites: Sites) -> None:
    with sites.client("sae-alice", certificate=False) as anonymous, pytest.raises(httpx.TransportError):
        anonymous.get("sae-bob/status")
    tls = sites.folder / "etsi014"
    pki.issue("sae-eve", tls, tls, algorithm="ecdsa-p256", usage="client", days=1)
    with sites.client("sae-eve", "alice") as eve:
        assert "names no SAE" in refused(eve.get("sae-bob/status"), 401)
        refused(eve.post("sae-bob/enc_keys", json={}), 401)


OVERSIZE_TRIES = 12
"""10 MiB bodies per transport: the reset came "sometimes" before (seen in about 1 of N)"""


def test_an_oversize_body_always_gets_its_400_before_the_connection_closes(sites: Sites) -> None:
    """httpx reads the answer even when its write fails; a plainer client (curl among them) sends its whole
    request before it reads, and a reset on the way used to leave it with no answer at all."""
    before = stored(sites)
    json_type = {"content-type": "application/json"}
    chunks = [BIG[i : i + 65536] for i in range(0, len(BIG), 65536)]
    head = b"POST /api/v1/keys/sae-bob/enc_keys HTTP/1.1\r\nhost: kme\r\ncontent-type: application/json\r\n"
    with_length = head + b"content-length: %d\r\n\r\n" % len(BIG) + BIG
    chunked_body = b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    with_chunks = head + b"transfer-encoding: chunked\r\n\r\n" + chunked_body
    with sites.client("sae-alice") as alice, sites.local("alice") as local:
        for client in (alice, local):
            for _ in range(OVERSIZE_TRIES):
                answer = client.post("sae-bob/enc_keys", content=BIG, headers=json_type)
                assert "over 1 MiB" in refused(answer, 400)
                assert answer.headers["connection"] == "close"
                chunked = client.post("sae-bob/enc_keys", content=iter(chunks), headers=json_type)
                assert "over 1 MiB" in refused(chunked, 400)
            keys_of(client.post("sae-bob/enc_keys", json={}))  # and the next connection is served
    for _ in range(OVERSIZE_TRIES):
        for request in (with_length, with_chunks):
            for answer in (_send_whole_then_read(sites, "alice", request, tls=tls) for tls in (True, False)):
                assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close\r\n" in answer, answer
                assert b"over 1 MiB" in answer, answer
    assert stored(sites) == before - 2


def _send_whole_then_read(sites: Sites, site: str, request: bytes, *, tls: bool) -> bytes:
    """Send ``request`` whole, then read the answer until the server closes: a reset on the way fails."""
    if tls:
        context = ssl.create_default_context(cafile=str(sites.folder / "etsi014" / "ca.crt"))
        context.load_cert_chain(
            *(str(sites.folder / "etsi014" / f"sae-{site}.{end}") for end in ("crt", "key"))
        )
        host, port = sites.urls[site].removeprefix("https://").rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=30)
        connection: socket.socket = context.wrap_socket(raw, server_hostname="localhost")
    else:
        connection = socket.socket(socket.AF_UNIX)
        connection.settimeout(30)
        connection.connect(str(sites.folder / site / ETSI014_SOCKET))
    with connection:
        connection.sendall(request)
        answer = b""
        while data := connection.recv(1 << 16):
            answer += data
    return answer


def _refusal_lines(sites: Sites) -> list[str]:
    return [line for line in (sites.folder / "alice.log").read_text().splitlines() if "refused a TLS" in line]


def test_a_refused_handshake_gets_a_tls_alert_and_a_rate_limited_log_line(sites: Sites) -> None:
    """No certificate, or one of another CA: the client gets an alert (an SSL error, not a bare reset or
    end of stream), whatever the TLS version, and the log a line per peer address per minute."""
    other = sites.folder / "other-ca"
    pki.init_ca(other, algorithm="ecdsa-p256", name="another CA", days=1)
    pki.issue("sae-alice", other, other, algorithm="ecdsa-p256", usage="client", days=1)
    host, port = sites.urls["alice"].removeprefix("https://").rsplit(":", 1)
    logged = len(_refusal_lines(sites))
    started = time.monotonic()
    for certificate in (None, other, None, other):
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            context = ssl.create_default_context(cafile=str(sites.folder / "etsi014" / "ca.crt"))
            context.maximum_version = version
            if certificate is not None:
                context.load_cert_chain(
                    str(certificate / "sae-alice.crt"), str(certificate / "sae-alice.key")
                )
            with (
                socket.create_connection((host, int(port)), timeout=30) as raw,
                pytest.raises(ssl.SSLError) as caught,
                context.wrap_socket(raw, server_hostname="localhost") as tls,  # TLS 1.3: done here
            ):
                tls.sendall(b"GET /api/v1/keys/sae-bob/status HTTP/1.1\r\nhost: localhost\r\n\r\n")
                tls.recv(1024)
            assert not isinstance(caught.value, (ssl.SSLEOFError, ssl.SSLZeroReturnError)), caught.value
            assert "ALERT" in (caught.value.reason or ""), caught.value
    seconds = time.monotonic() - started
    lines = _refusal_lines(sites)
    # the daemon logs before it sends the alert: every line is there; the earlier tests' refusals of
    # 127.0.0.1 may have had the line of this minute already
    assert len(lines) >= 1 and len(lines) - logged <= 1 + seconds // api_http.REFUSAL_LOG_SECONDS, lines
    assert all("refused a TLS handshake from 127.0.0.1: " in line for line in lines), lines
    assert any(why in line for line in lines for why in ("no client certificate", "another CA")), lines


def test_the_unix_socket_serves_the_same_api_to_the_sae_of_its_uid(sites: Sites) -> None:
    for site in ("alice", "bob"):
        mode = (sites.folder / site / ETSI014_SOCKET).stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == api_http.UNIX_SOCKET_MODE == 0o660
    with sites.local("alice") as alice, sites.local("bob") as bob, sites.client("sae-bob") as remote_bob:
        status = alice.get("sae-bob/status").json()
        check("Status", status)
        assert status["master_SAE_ID"] == "sae-alice" and status["slave_SAE_ID"] == "sae-bob"
        sent = keys_of(alice.post("sae-bob/enc_keys", json={"number": 2, "size": 512}))
        ids = {"key_IDs": [{"key_ID": key_id} for key_id, _ in sent]}
        assert keys_of(bob.post("sae-alice/dec_keys", json=ids)) == sent
        # a local master, a slave over HTTPS, and the other way round: one API
        sent = keys_of(alice.get("sae-bob/enc_keys", params={"number": 1}))
        assert keys_of(remote_bob.get("sae-alice/dec_keys", params={"key_ID": sent[0][0]})) == sent
        sent = keys_of(remote_bob.post("sae-alice/enc_keys", json={}))
        assert keys_of(alice.get("sae-bob/dec_keys", params={"key_ID": sent[0][0]})) == sent
        # and the same refusals
        assert "already delivered" in refused(
            alice.get("sae-bob/dec_keys", params={"key_ID": sent[0][0]}), 400
        )
        deleted = alice.delete("sae-bob/enc_keys")
        assert refused(deleted, 405) and deleted.headers["allow"] == "GET, POST"
        assert "ASCII digits" in refused(alice.get("sae-bob/enc_keys", params={"number": "\u00b2"}), 400)


def test_a_socket_path_is_taken_over_only_from_a_daemon_that_is_gone(sites: Sites, tmp_path: Path) -> None:
    """A stale socket (its daemon killed) is replaced, but not a running daemon's, nor a file that is not a
    socket (the kill -9 test restarts daemons on their stale sockets)."""
    held = sites.folder / "alice" / ETSI014_SOCKET
    with pytest.raises(InputError, match="another process serves"), api_http._claim_socket_path(held):
        pass
    with sites.local("alice") as alice:  # still served
        assert alice.get("sae-bob/status").status_code == 200
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(path))
    with api_http._claim_socket_path(path):
        assert not path.exists()
    path.write_text("not a socket")
    with (
        pytest.raises(InputError, match="is not a socket; not removing it"),
        api_http._claim_socket_path(path),
    ):
        pass
    assert path.read_text() == "not a socket"


@pytest.mark.parametrize("taken", ["by a running daemon", "by a file"])
def test_a_daemon_whose_socket_path_is_taken_stops_with_a_clear_error(sites: Sites, taken: str) -> None:
    """A second daemon (another state directory) on Alice's socket path, or on a path where a file that is
    not a socket lies: exit status 2 (as for another qkdd on the state directory) and one line saying why,
    no traceback, nothing removed."""
    text = (sites.folder / "alice.toml").read_text()
    text = re.sub(r'(?m)^peer = ".*"$', 'peer = "127.0.0.1:1"', text)  # it must not reach Bob
    text = text.replace('state_dir = "alice"', 'state_dir = "alice-twin"')
    (sites.folder / "alice-twin").mkdir(exist_ok=True)
    if taken == "by a file":
        (sites.folder / "alice-twin" / "api.sock").write_text("mine")
        text = text.replace(f'unix_socket = "alice/{ETSI014_SOCKET}"', 'unix_socket = "alice-twin/api.sock"')
        why = "alice-twin/api.sock exists and is not a socket; not removing it"
    else:
        why = f"another process serves {sites.folder / 'alice' / ETSI014_SOCKET}"
    (sites.folder / "alice-twin.toml").write_text(text)
    twin = subprocess.run(
        [sys.executable, "-m", "qkdd", "run", "--config", str(sites.folder / "alice-twin.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert twin.returncode == 2 and why in twin.stderr and "Traceback" not in twin.stderr, twin.stderr
    if taken == "by a file":
        assert (sites.folder / "alice-twin" / "api.sock").read_text() == "mine"
    with sites.local("alice") as alice:  # Alice's socket is still hers
        assert alice.get("sae-bob/status").status_code == 200


def test_concurrent_masters_at_both_sites_never_share_key_material(sites: Sites) -> None:
    got: dict[str, list[tuple[str, bytes]]] = {"alice": [], "bob": []}
    errors: list[BaseException] = []

    def master(site: str, sae: str, slave: str) -> None:
        try:
            with sites.client(sae) as client:
                for _ in range(15):
                    got[site] += keys_of(client.post(f"{slave}/enc_keys", json={"number": 2}))
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=master, args=args)
        for args in (
            ("alice", "sae-alice", "sae-bob"),
            ("alice", "sae-alice2", "sae-bob"),
            ("bob", "sae-bob", "sae-alice"),
            ("bob", "sae-bob2", "sae-alice"),
        )
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    every = got["alice"] + got["bob"]
    assert len(every) == 4 * 15 * 2
    assert len({key_id for key_id, _ in every}) == len({key for _, key in every}) == len(every)
    # and the slaves fetch exactly what their masters got
    with sites.client("sae-bob") as bob, sites.client("sae-alice") as alice:
        mine = [k for k in got["alice"]][:30]
        fetched = []
        for key_id, _ in mine:
            for master_sae in ("sae-alice", "sae-alice2"):
                response = bob.get(f"{master_sae}/dec_keys", params={"key_ID": key_id})
                if response.status_code == 200:
                    fetched += keys_of(response)
        assert fetched == mine
        theirs = got["bob"][:2]
        for key_id, key in theirs:
            answers = [alice.get(f"{m}/dec_keys", params={"key_ID": key_id}) for m in ("sae-bob", "sae-bob2")]
            assert [keys_of(a) for a in answers if a.status_code == 200] == [[(key_id, key)]]


def test_the_openapi_document_lists_exactly_the_routes_served() -> None:
    documented = {
        (method.upper(), path.split("/")[-1])
        for path, item in OPENAPI["paths"].items()
        for method, operation in item.items()
        if "200" in operation["responses"]
    }
    assert documented == set(api_http._PARAMETERS)
    for path, item in OPENAPI["paths"].items():  # every other method is documented as 405
        refused = {
            method.upper() for method, operation in item.items() if "200" not in operation["responses"]
        }
        assert refused == set(HTTP_METHODS) - set(api_http._METHODS[path.split("/")[-1]]), path
        assert all(set(item[m.lower()]["responses"]) == {"401", "405"} for m in refused)
    for (method, action), parameters in api_http._PARAMETERS.items():
        path = next(p for p in OPENAPI["paths"] if p.endswith(f"/{action}"))
        query = {
            p["name"] for p in OPENAPI["paths"][path][method.lower()]["parameters"] if p["in"] == "query"
        }
        assert query == parameters
    fields = OPENAPI["components"]["schemas"]
    assert set(fields["KeyRequest"]["properties"]) == api_http._ENC_FIELDS
    assert set(fields["KeyIDs"]["properties"]) == api_http._DEC_FIELDS


def conforms(path: str, method: str, response: httpx.Response) -> None:
    """``response`` to ``method`` on ``path`` is one the OpenAPI document lists for that operation: its
    status, its headers (``Allow``: exactly the methods the document serves there) and its body's schema."""
    item = OPENAPI["paths"][path]
    documented = item[method.lower()]["responses"].get(str(response.status_code))
    assert documented is not None, (method, path, response.status_code, response.text)
    if "$ref" in documented:
        documented = OPENAPI["components"]["responses"][documented["$ref"].rsplit("/", 1)[1]]
    for name, header in documented.get("headers", {}).items():
        assert name.lower() in response.headers or not header.get("required"), (method, path, name)
        jsonschema.validate(response.headers[name], header["schema"])
    if "allow" in response.headers:
        served = [m.upper() for m, operation in item.items() if "200" in operation["responses"]]
        assert response.headers["allow"] == ", ".join(served)
    assert response.headers["content-type"] == "application/json"
    if method != "HEAD":  # a HEAD answer has the headers only
        schema = {"components": OPENAPI["components"], **documented["content"]["application/json"]["schema"]}
        jsonschema.validate(response.json(), schema, cls=jsonschema.Draft202012Validator)


def test_every_documented_operation_answers_as_documented_over_https_and_the_unix_socket(
    sites: Sites,
) -> None:
    """Each path and method of the OpenAPI document, served or 405, over HTTPS and over the Unix socket,
    with good requests and bad ones (oversize bodies included), and an unknown SAE's 401."""
    tls = sites.folder / "etsi014"
    if not (tls / "sae-eve.crt").exists():
        pki.issue("sae-eve", tls, tls, algorithm="ecdsa-p256", usage="client", days=1)
    paths = {path.rsplit("/", 1)[1]: path for path in OPENAPI["paths"]}
    seen: set[tuple[str, str, int]] = set()
    with (
        sites.client("sae-alice") as remote_alice,
        sites.client("sae-bob") as remote_bob,
        sites.local("alice") as local_alice,
        sites.local("bob") as local_bob,
        sites.client("sae-eve", "alice") as eve,
    ):

        def ask(client: httpx.Client, method: str, action: str, **kwargs: Any) -> None:
            other = "sae-alice" if client in (remote_bob, local_bob) else "sae-bob"
            response = client.request(method, f"{other}/{action}", **kwargs)
            conforms(paths[action], method, response)
            seen.add((method, action, response.status_code))

        for alice, bob in ((remote_alice, remote_bob), (local_alice, local_bob)):
            for action, path in paths.items():
                for method in OPENAPI["paths"][path]:
                    if "200" not in OPENAPI["paths"][path][method]["responses"]:
                        ask(alice, method.upper(), action)  # 405, HEAD included
            ask(alice, "GET", "status")
            ask(alice, "GET", "enc_keys", params={"number": 1})
            ask(alice, "POST", "enc_keys", json={"number": 2})
            key_id = keys_of(alice.post("sae-bob/enc_keys", json={"number": 2}))[0][0]
            ask(bob, "GET", "dec_keys", params={"key_ID": key_id})
            key_id = keys_of(alice.post("sae-bob/enc_keys", json={}))[0][0]
            ask(bob, "POST", "dec_keys", json={"key_IDs": [{"key_ID": key_id}]})
            # bad requests, oversize bodies among them
            ask(alice, "GET", "enc_keys", params={"number": "0"})
            ask(alice, "GET", "dec_keys", params={"key_ID": "not-a-uuid"})
            for action in ("enc_keys", "dec_keys"):
                ask(alice, "POST", action, content=BIG, headers={"content-type": "application/json"})
                ask(alice, "POST", action, content=b"{}", headers={"content-type": "text/plain"})
            response = alice.get("sae-nobody/status")
            conforms(paths["status"], "GET", response)
            assert response.status_code == 400
        for method in ("GET", "POST", "DELETE", "HEAD"):
            response = eve.request(method, "sae-bob/status")
            conforms(paths["status"], method, response)
            assert response.status_code == 401
    assert {status for _, _, status in seen} == {200, 400, 405}
    assert {(m, a) for m, a, status in seen if status == 405} == {
        (m, a) for a, path in paths.items() for m in HTTP_METHODS if m not in api_http._METHODS[a]
    }


def test_with_the_peer_down_enc_keys_is_503_and_consumes_nothing(tmp_path: Path) -> None:
    with delivery_demo.running_pair(tmp_path, SIM, 50, 180.0, rounds=1) as pair:
        alice = pair.clients["alice"]
        before = alice.status("sae-bob")["stored_key_count"]
        pair.processes["bob"].send_signal(signal.SIGKILL)
        pair.processes["bob"].wait(30)
        status, body = alice.request("POST", "sae-bob/enc_keys", {"number": 1})
        assert status == 503 and "unreachable" in body["message"]
        assert alice.request("GET", "sae-bob/status")[0] == 503
    store = KeyStore(tmp_path / "alice", None, create=False)
    try:
        ledger = store.ledger("alice")
        assert (ledger.available_bytes() + ledger.lease_bytes()) // 32 == before  # nothing consumed
    finally:
        store.close()


LEAKED_SSL_SOCKET = "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
"""A client connecting while its server dies can leak an ssl.SSLSocket inside the standard library
(CPython issue 113280: SSLSocket's "connected" check after a reset); only that warning is let pass."""


@pytest.mark.filterwarnings(LEAKED_SSL_SOCKET)
@pytest.mark.parametrize("victim", ["alice", "bob"])
def test_kill_9_during_key_delivery_never_hands_a_key_out_twice(tmp_path: Path, victim: str) -> None:
    """Masters at both sites ask for keys and their slaves at the other site fetch them as they come,
    while one daemon is killed and restarted: every key a master got is distinct, no slave gets a key
    twice, and each slave gets every key its master got with the same bytes — save one whose answer the
    kill cut off after the hand-out was recorded (the slave asked, the KME died before answering: that
    key is spent, and asking again says so)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # the link distils all along (rounds=0): a finite pool would run dry within the first second of the
    # masters' asking, and after a restart of Bob (Alice's run goes on, past its run.max_rounds) nothing
    # would refill it, so no master could get a key however well delivery recovered
    with delivery_demo.running_pair(tmp_path, SIM, 300, 180.0, bob_port=port) as pair:
        sites = Sites(tmp_path, {})
        got: dict[str, list[tuple[str, bytes]]] = {"sae-alice": [], "sae-bob": []}
        fetched: dict[str, list[tuple[str, bytes]]] = {"sae-alice": [], "sae-bob": []}  # by master
        in_flight: dict[str, list[str]] = {"sae-alice": [], "sae-bob": []}  # by master: asked, no answer yet
        cut_off: set[str] = set()  # key IDs whose dec_keys request got no answer (a kill)
        failures: list[str] = []
        stop = threading.Event()

        def master(sae: str, slave: str) -> None:
            while not stop.is_set():
                try:
                    sites.urls = _urls(tmp_path)
                    with sites.client(sae) as client:
                        while not stop.is_set():
                            response = client.post(f"{slave}/enc_keys", json={})
                            if response.status_code == 200:
                                got[sae] += keys_of(response)
                            elif response.status_code != 503:
                                failures.append(response.text)
                except (httpx.TransportError, AssertionError):
                    stop.wait(0.05)  # the API is down: reconnect to wherever it listens next

        def slave(sae: str, master_sae: str) -> None:
            """Fetch the master's keys in order, one or two at a time, as they come."""
            while not stop.is_set():
                try:
                    sites.urls = _urls(tmp_path)
                    with sites.client(sae) as client:
                        while not stop.is_set():
                            done = len(fetched[master_sae])
                            ids = [k for k, _ in got[master_sae][done : done + 2]]
                            if not ids:
                                stop.wait(0.01)
                                continue
                            in_flight[master_sae] = ids  # until an answer comes
                            response = client.post(
                                f"{master_sae}/dec_keys", json={"key_IDs": [{"key_ID": k} for k in ids]}
                            )
                            in_flight[master_sae] = []
                            if response.status_code == 200:
                                fetched[master_sae] += keys_of(response)
                            elif response.status_code != 503:
                                failures.append(response.text)
                                return
                except (httpx.TransportError, AssertionError):
                    stop.wait(0.05)
                    return  # the IDs in flight stay cut off: checked below

        threads = [
            threading.Thread(target=master, args=("sae-alice", "sae-bob")),
            threading.Thread(target=master, args=("sae-bob", "sae-alice")),
        ]
        slaves = [
            threading.Thread(target=slave, args=("sae-bob", "sae-alice")),
            threading.Thread(target=slave, args=("sae-alice", "sae-bob")),
        ]
        for thread in threads + slaves:
            thread.start()
        try:
            stop.wait(1.0)
            for _ in range(3):
                pair.processes[victim].send_signal(signal.SIGKILL)
                pair.processes[victim].wait(30)
                (tmp_path / victim / ETSI014_FILE).unlink()
                pair.processes[victim] = spawn(tmp_path / f"{victim}.toml", tmp_path / f"{victim}.log")
                # wait for the restarted daemon to serve keys again (a loaded machine takes its time): the
                # masters of both sites, so the victim's API is up (and its address file written) before
                # the next kill; Alice's alone could serve from her leases once the link is back
                served = {sae: len(keys) for sae, keys in got.items()}
                deadline = time.monotonic() + 60
                while any(len(got[sae]) < served[sae] + 10 for sae in got):
                    assert time.monotonic() < deadline, "no key served after the restart"
                    stop.wait(0.05)
                # a slave whose request the kill cut off starts again after the cut-off keys
                for index, thread in enumerate(slaves):
                    if not thread.is_alive():
                        sae, master_sae = ("sae-bob", "sae-alice") if index == 0 else ("sae-alice", "sae-bob")
                        lost, in_flight[master_sae] = in_flight[master_sae], []
                        cut_off.update(lost)
                        fetched[master_sae] += [(k, b"") for k in lost]  # settled below
                        slaves[index] = threading.Thread(target=slave, args=(sae, master_sae))
                        slaves[index].start()
        finally:
            stop.set()
            for thread in threads + slaves:
                thread.join(60)
        assert not failures and len(got["sae-alice"]) > 10 and len(fetched["sae-alice"]) > 10
        cut_off.update(in_flight["sae-alice"] + in_flight["sae-bob"])  # cut off by the last kill
        every = got["sae-alice"] + got["sae-bob"]
        assert len({k for k, _ in every}) == len({key for _, key in every}) == len(every)
        sites.urls = _urls(tmp_path)
        for master_sae, slave_sae in (("sae-alice", "sae-bob"), ("sae-bob", "sae-alice")):
            taken = fetched[master_sae]
            assert [k for k, _ in taken] == [k for k, _ in got[master_sae][: len(taken)]]  # once, in order
            rest = got[master_sae][len(taken) :]
            with sites.client(slave_sae) as slave_client:
                url = f"{master_sae}/dec_keys"
                for index, (key_id, key) in enumerate(taken + [(k, b"") for k, _ in rest]):
                    if key:
                        assert got[master_sae][index] == (key_id, key)
                        continue
                    deadline = time.monotonic() + 60
                    body = {"key_IDs": [{"key_ID": key_id}]}
                    while (answer := slave_client.post(url, json=body)).status_code == 503:
                        # the peer's notices of the last keys come once the link is back up
                        assert time.monotonic() < deadline, answer.text
                        stop.wait(0.05)
                    if answer.status_code == 200:
                        assert keys_of(answer) == [got[master_sae][index]]
                    else:  # cut off by a kill after the hand-out was recorded: spent, and said so
                        assert key_id in cut_off or index < len(taken), answer.text
                        assert "already delivered" in refused(answer, 400)


@pytest.mark.parametrize("victim", ["alice", "bob"])
def test_a_restart_of_either_side_while_alice_is_paused_on_a_full_store_is_over_in_seconds(
    tmp_path: Path, victim: str
) -> None:
    """Alice is paused (her key store holds max_key_count keys: the key channel is the only traffic)
    when one daemon restarts cleanly; the other notices at once (§13: it reads the connection while
    paused, and keepalives go both ways), the daemons reconnect, and ETSI 014 delivery works again
    both ways — within a minute on a loaded machine, where it used to take up to five."""
    full = {"max_key_count": 200}
    with delivery_demo.running_pair(tmp_path, SIM, 150, 180.0, etsi014_options=full) as pair:
        paused = ("paused", "key store full")
        wait_until(lambda: _link_state(tmp_path / "alice") == paused, 120, "Alice's pause on her full store")
        sites = Sites(tmp_path, _urls(tmp_path))
        assert _pair_of_keys_both_ways(sites) == 2
        pair.processes[victim].send_signal(signal.SIGTERM)
        pair.processes[victim].wait(30)
        (tmp_path / victim / ETSI014_FILE).unlink()
        restarted = time.monotonic()
        pair.processes[victim] = spawn(tmp_path / f"{victim}.toml", tmp_path / f"{victim}.log")
        while True:
            assert time.monotonic() < restarted + 60, "key delivery did not resume after the restart"
            try:
                sites.urls = _urls(tmp_path)
                if _pair_of_keys_both_ways(sites) == 2:
                    break
            except (AssertionError, httpx.TransportError):
                pass
            time.sleep(0.1)
        wait_until(lambda: _link_state(tmp_path / "alice") == paused, 60, "Alice's pause again")
        assert "within its timeout" not in (tmp_path / "alice.log").read_text()


def _pair_of_keys_both_ways(sites: Sites) -> int:
    """How many of the two directions (a master at one site, its slave at the other) deliver a key."""
    done = 0
    for master, slave in (("sae-alice", "sae-bob"), ("sae-bob", "sae-alice")):
        with sites.client(master) as m, sites.client(slave) as s:
            response = m.post(f"{slave}/enc_keys", json={})
            if response.status_code != 200:
                continue
            sent = keys_of(response)
            got = keys_of(s.post(f"{master}/dec_keys", json={"key_IDs": [{"key_ID": sent[0][0]}]}))
            assert got == sent
            done += 1
    return done


def _urls(folder: Path) -> dict[str, str]:
    """Where each site's API listens now (a restarted daemon listens on a new port)."""
    urls = {}
    for role in ("alice", "bob"):
        address = read_listen_address(folder / role, ETSI014_FILE)
        assert address is not None, f"{role}'s API is not up"
        urls[role] = f"https://{address}"
    return urls


def test_an_api_of_only_the_unix_socket_needs_no_tls(tmp_path: Path) -> None:
    """No etsi014.listen and no TLS files: the API serves its socket alone (the server's start hands back
    no HTTPS port), and the local SAE gets its status over it."""
    import os  # noqa: PLC0415

    import trio  # noqa: PLC0415

    from qkdd import config  # noqa: PLC0415

    raw = {
        "role": "bob",
        "link_id": "l",
        "state_dir": "state",
        "network": {"listen": "127.0.0.1:0"},
        "auth": {"psk_file": "psk"},
        "etsi014": {"unix_socket": "api.sock", "sae": [{"id": "local", "uid": os.getuid()}]},
    }
    settings = config.from_mapping(raw, tmp_path).etsi014
    assert settings is not None and settings.listen is None

    class Keys:
        async def status(self, caller: str, other: str) -> dict[str, Any]:
            return {"caller": caller, "other": other}

    async def main() -> None:
        server = api_http.ApiServer(Keys(), settings)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                assert await nursery.start(server.serve) is None
                stream = await trio.open_unix_socket(str(tmp_path / "api.sock"))
                await stream.send_all(b"GET /api/v1/keys/peer/status HTTP/1.1\r\nhost: kme\r\n\r\n")
                answer = b""
                while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                    answer += await stream.receive_some(1 << 16)
                await stream.aclose()
            assert answer.startswith(b"HTTP/1.1 200") and b'{"caller": "local", "other": "peer"}' in answer
            nursery.cancel_scope.cancel()

    trio.run(main)


def _link_state(state_dir: Path) -> tuple[str, str] | None:
    """The link and its reason, as the daemon of ``state_dir`` says on its control socket (None: none)."""
    try:
        answer = control.ask(state_dir)
    except control.ControlError:
        return None  # starting, or stopping: ask again
    return None if answer is None else (answer["link"], answer["reason"])


# -- the TLS server on a real socket: there it reads and writes the descriptor itself (_TlsStream)


@pytest.fixture(scope="module")
def api_tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return test_http.make_tls(tmp_path_factory.mktemp("tls"))


def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    client, server = trio.socket.socketpair()
    return trio.SocketStream(client), trio.SocketStream(server)


@pytest.mark.parametrize("name", test_http.HOSTILE)
def test_a_hostile_tls_client_on_a_socket_gets_its_connection_ended_and_the_server_goes_on(
    api_tls: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    scenario, args = test_http.HOSTILE[name]

    async def main() -> None:
        with trio.fail_after(60):
            await scenario(api_tls, _socket_pair, *args)

    with caplog.at_level(logging.WARNING, logger="qkdd"):
        trio.run(main)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_pipelined_requests_on_a_socket_leave_the_other_tasks_their_turn(api_tls: Path) -> None:
    """A client that sends many requests at once gets them answered one by one, with the event loop's
    other tasks (other clients, the key channel) run between two answers, not after all of them."""
    server = test_http.make_server(api_tls)
    answered = 0
    most = 0  # answers between two turns of the other task

    def observe(target: str, status: int, seconds: float) -> None:
        nonlocal answered
        answered += 1

    server.observe = observe
    requests = 300

    async def other_task() -> None:
        nonlocal most
        seen = 0
        while True:
            most, seen = max(most, answered - seen), answered
            await trio.lowlevel.checkpoint()

    async def main() -> None:
        client, stream = _socket_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_tls, stream, "192.0.2.8")
            nursery.start_soon(other_task)
            context = test_http.client_context(api_tls, "ca")
            tls_client = trio.SSLStream(client, context, server_hostname="kme")
            with trio.fail_after(60):
                await tls_client.send_all(b"GET /api/v1/keys/floor HTTP/1.1\r\nhost: kme\r\n\r\n" * requests)
                data = b""
                while data.count(b"HTTP/1.1 400 ") < requests:
                    data += await tls_client.receive_some(1 << 16)
            await tls_client.aclose()
            nursery.cancel_scope.cancel()
        assert answered == requests and most <= 2, most

    trio.run(main)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_tls_1_2_client_that_renegotiates_gets_no_renegotiation_and_the_server_goes_on(
    api_tls: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``openssl s_client -tls1_2``'s ``R`` asks for a new handshake on the connection: the server answers
    with the no_renegotiation alert, and then serves the next client as before."""
    server = test_http.make_server(api_tls)
    ca = api_tls / "ca"

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, server._tls_connection, listeners)
            command = [
                "openssl",
                "s_client",
                "-tls1_2",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "kme",
            ]
            command += [
                "-cert",
                str(ca / "sae-a.crt"),
                "-key",
                str(ca / "sae-a.key"),
                "-CAfile",
                str(ca / "ca.crt"),
            ]
            with trio.fail_after(30):
                renegotiating = await trio.run_process(
                    command, stdin=b"R\n", capture_stdout=True, capture_stderr=True, check=False
                )
                stream = trio.SSLStream(
                    await trio.open_tcp_stream("127.0.0.1", port),
                    test_http.client_context(api_tls, "ca"),
                    server_hostname="kme",
                )
                answer = await test_http._exchange(stream, test_http.STATUS)
                await stream.aclose()
            nursery.cancel_scope.cancel()
        assert b"RENEGOTIATING" in renegotiating.stdout + renegotiating.stderr
        assert b"no renegotiation" in renegotiating.stderr, renegotiating.stderr
        assert answer.status == 200

    with caplog.at_level(logging.WARNING, logger="qkdd"):
        trio.run(main)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
