"""ETSI GS QKD 014 at both sites: two `qkdd run` processes, a real HTTPS client (httpx) with client
certificates, the OpenAPI document checked against what the server answers."""

from __future__ import annotations

import base64
import json
import signal
import socket
import ssl
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

from qkdd.admin import read_status_file
from qkdd.auth import pki
from qkdd.daemon import ETSI014_FILE, read_listen_address
from qkdd.delivery import demo as delivery_demo
from qkdd.delivery import http as api_http
from qkdd.demo import spawn
from qkdd.spec import SPEC_PATH
from qkdd.store import KeyStore

SIM = {"pulses_per_frame": 1 << 20, "z_probability": 0.7, "seed": 5, "single_photon": True}
ROUNDS = 6
EXTRA = {"alice": ["sae-alice2"], "bob": ["sae-bob2"]}
OPENAPI = json.loads((SPEC_PATH.parent / "etsi014-openapi.json").read_text())
pytestmark = pytest.mark.timeout(240)


@dataclass
class Sites:
    folder: Path
    urls: dict[str, str]

    def client(self, sae: str, site: str | None = None, *, certificate: bool = True) -> httpx.Client:
        """An httpx client of ``sae`` talking to its own site's KME (or ``site``'s)."""
        site = site or ("alice" if sae.startswith("sae-alice") else "bob")
        tls = self.folder / "etsi014"
        context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
        if certificate:
            context.load_cert_chain(str(tls / f"{sae}.crt"), str(tls / f"{sae}.key"))
        return httpx.Client(base_url=self.urls[site] + "/api/v1/keys/", verify=context, timeout=30)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    folder = tmp_path_factory.mktemp("etsi014")
    with delivery_demo.running_pair(folder, SIM, 600, 180.0, rounds=ROUNDS, extra_saes=EXTRA):
        yield Sites(folder, _urls(folder))


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
        (method.upper(), path.split("/")[-1]) for path, item in OPENAPI["paths"].items() for method in item
    }
    assert documented == set(api_http._PARAMETERS)
    for (method, action), parameters in api_http._PARAMETERS.items():
        path = next(p for p in OPENAPI["paths"] if p.endswith(f"/{action}"))
        query = {
            p["name"] for p in OPENAPI["paths"][path][method.lower()]["parameters"] if p["in"] == "query"
        }
        assert query == parameters
    fields = OPENAPI["components"]["schemas"]
    assert set(fields["KeyRequest"]["properties"]) == api_http._ENC_FIELDS
    assert set(fields["KeyIDs"]["properties"]) == api_http._DEC_FIELDS


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


@pytest.mark.parametrize("victim", ["alice", "bob"])
def test_kill_9_during_key_delivery_never_hands_a_key_out_twice(tmp_path: Path, victim: str) -> None:
    """Masters at both sites ask for keys while one daemon is killed and restarted: every key a master
    got is distinct, and the slave's site still hands out exactly those bytes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # the link distils all along (rounds=0): a finite pool would run dry within the first second of the
    # masters' asking, and after a restart of Bob (Alice's run goes on, past its run.max_rounds) nothing
    # would refill it, so no master could get a key however well delivery recovered
    with delivery_demo.running_pair(tmp_path, SIM, 300, 180.0, bob_port=port) as pair:
        sites = Sites(tmp_path, {})
        got: dict[str, list[tuple[str, bytes]]] = {"sae-alice": [], "sae-bob": []}
        failures: list[int] = []
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
                            else:
                                failures.append(response.status_code)
                except (httpx.TransportError, AssertionError):
                    stop.wait(0.05)  # the API is down: reconnect to wherever it listens next

        threads = [
            threading.Thread(target=master, args=("sae-alice", "sae-bob")),
            threading.Thread(target=master, args=("sae-bob", "sae-alice")),
        ]
        for thread in threads:
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
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert set(failures) <= {503} and len(got["sae-alice"]) > 10
        every = got["sae-alice"] + got["sae-bob"]
        assert len({k for k, _ in every}) == len({key for _, key in every}) == len(every)
        sites.urls = _urls(tmp_path)
        for master_sae, slave_sae in (("sae-alice", "sae-bob"), ("sae-bob", "sae-alice")):
            ids = [{"key_ID": key_id} for key_id, _ in got[master_sae]]
            with sites.client(slave_sae) as slave:
                for start in range(0, len(ids), 100):
                    chunk = ids[start : start + 100]
                    deadline = time.monotonic() + 60
                    url = f"{master_sae}/dec_keys"
                    while (answer := slave.post(url, json={"key_IDs": chunk})).status_code == 503:
                        # the peer's notices of the last keys come once the link is back up
                        assert time.monotonic() < deadline, answer.text
                        stop.wait(0.05)
                    assert keys_of(answer) == got[master_sae][start : start + 100]


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
        deadline = time.monotonic() + 120
        while read_status_file(tmp_path / "alice").get("link") != "paused: key store full":
            assert time.monotonic() < deadline, "Alice never paused on her full key store"
            time.sleep(0.1)
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
        while read_status_file(tmp_path / "alice").get("link") != "paused: key store full":
            assert time.monotonic() < restarted + 60, "Alice did not pause again on her full key store"
            time.sleep(0.1)
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
