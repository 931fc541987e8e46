"""``qkdd demo --etsi014`` and ``qkdd bench etsi014``: both daemons with their key delivery APIs.

The daemons run rounds continuously (as in production) while SAEs fetch keys: Alice's SAE ``sae-alice``
asks its KME for keys with enc_keys, Bob's ``sae-bob`` fetches the same keys from his with dec_keys, and
the other way round.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdd import control
from qkdd.daemon import ETSI014_FILE, read_listen_address
from qkdd.delivery.client import ApiError, Client
from qkdd.demo import SAES, cpu_seconds, scratch_folder, start_pair, write_configs
from qkdd.errors import QkddError
from qkdd.store import read_only

ROLES = ("alice", "bob")


@dataclass
class Pair:
    clients: dict[str, Client]  # by role: the client of that site's SAE of SAES
    processes: dict[str, subprocess.Popen[bytes]]  # by role


@contextlib.contextmanager
def running_pair(
    state_dir: Path,
    sim: dict[str, Any],
    keys_needed: int,
    timeout: float,
    rounds: int = 0,
    extra_saes: Mapping[str, Sequence[str]] | None = None,
    bob_port: int = 0,
    etsi014_options: Mapping[str, int] | None = None,
) -> Iterator[Pair]:
    """Both daemons with their APIs, until each site can hand out ``keys_needed`` 256-bit keys;
    yields them with one client per site (its SAE's), then stops the daemons with SIGTERM. ``rounds`` > 0: the
    link stops distilling after that many rounds (the daemons go on serving keys). ``etsi014_options``:
    more keys of both ``[etsi014]`` tables (``max_key_count``: the link pauses on a full store)."""
    alice_config, bob_config = write_configs(
        state_dir,
        rounds,
        sim,
        bob_port=bob_port,
        etsi014=True,
        extra_saes=extra_saes,
        etsi014_options=etsi014_options,
    )
    processes = start_pair(alice_config, bob_config)
    clients: dict[str, Client] = {}
    pair = Pair(clients, dict(zip(ROLES, processes, strict=True)))  # a caller may restart a daemon
    try:
        deadline = time.monotonic() + timeout
        for role, process in zip(ROLES, processes, strict=True):
            while read_listen_address(state_dir / role, ETSI014_FILE) is None:
                _check_alive(process, role, state_dir, deadline)
                time.sleep(0.05)
            clients[role] = client_of(state_dir, role)
        peer_sae = {"alice": SAES["bob"], "bob": SAES["alice"]}
        for role, process in zip(ROLES, processes, strict=True):
            while True:
                _check_alive(process, role, state_dir, deadline)
                try:
                    if clients[role].status(peer_sae[role])["stored_key_count"] >= keys_needed:
                        break
                except ApiError as error:
                    if error.status != 503:  # 503: the key channel is not open yet
                        raise
                time.sleep(0.2)
        while rounds and min(_rounds_finished(state_dir / role) for role in ROLES) < rounds:
            _check_alive(processes[0], "alice", state_dir, deadline)
            time.sleep(0.2)
        yield pair
    finally:
        for client in clients.values():
            client.close()
        for process in pair.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in pair.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _site(state_dir: Path, role: str) -> tuple[str, int, Path, Path, Path]:
    """``role``'s API address (host, port), and the certificate, key and CA certificate of its SAE of
    :data:`SAES`: what a client of that site needs."""
    address = read_listen_address(state_dir / role, ETSI014_FILE)
    if address is None:
        raise QkddError(f"{role}'s key delivery API is not up")
    host, _, port = address.rpartition(":")
    folder, sae = state_dir / "etsi014", SAES[role]
    return host, int(port), folder / f"{sae}.crt", folder / f"{sae}.key", folder / "ca.crt"


def client_of(state_dir: Path, role: str) -> Client:
    """A new client (its own connection) of ``role``'s SAE of :data:`SAES` to its site's API."""
    return Client(*_site(state_dir, role))


def _rounds_finished(state_dir: Path) -> int:
    with read_only(state_dir) as db:
        return int(db.execute("SELECT COUNT(*) FROM rounds WHERE state != 'pending'").fetchone()[0])


def _check_alive(process: subprocess.Popen[bytes], role: str, state_dir: Path, deadline: float) -> None:
    if process.poll() is not None:
        raise QkddError(f"{role} exited with status {process.returncode}; see {state_dir / (role + '.log')}")
    if time.monotonic() > deadline:
        raise QkddError(f"no key to deliver in time; see {state_dir}/alice.log and bob.log")


def run(state_dir: Path | None, sim: dict[str, Any], as_json: bool) -> int:
    """``qkdd demo --etsi014``."""
    with _folder(state_dir) as folder, running_pair(folder, sim, 2, 120.0) as pair:
        clients = pair.clients
        results = []
        for master, slave in (("alice", "bob"), ("bob", "alice")):
            [(key_id, key)] = clients[master].enc_keys(SAES[slave], number=1, size=256)
            [(got_id, got)] = clients[slave].dec_keys(SAES[master], [key_id])
            results.append(
                {
                    "master": SAES[master],
                    "slave": SAES[slave],
                    "key_ID": key_id,
                    "match": got_id == key_id and got == key,
                }
            )
    if as_json:
        print(json.dumps({"etsi014": results}))
    else:
        for r in results:
            verdict = "identical" if r["match"] else "DIFFERENT"
            print(
                f"{r['master']} got key {r['key_ID']} with enc_keys, {r['slave']} the same ID with dec_keys: "
                f"256 bits, {verdict}"
            )
    return 0 if all(r["match"] for r in results) else 1


@contextlib.contextmanager
def _folder(state_dir: Path | None) -> Iterator[Path]:
    if state_dir is not None:
        yield state_dir.resolve()
        return
    with scratch_folder("qkdd-etsi014-") as folder:
        yield folder


PAIR_CLIENTS = 6
"""Application pairs at once in the "pair" rows (half with the master at each site): each its own
kept-alive connection to each site. More slaves asking at once share more of each site's dec_keys
commits; past 6 the waits add up to a p99 over 20 ms on the 2-core machine."""


def bench(quick: bool, as_json: bool) -> int:
    """``qkdd bench etsi014``: 256-bit keys per second over one kept-alive mTLS connection per SAE,
    first while the link distils key (both daemons busy with rounds), then with the link idle (its
    rounds done); and the "pair" rows: :data:`PAIR_CLIENTS` applications at once, each getting a key at
    one site and fetching it at the other, in those two states and on a full key store (the link paused,
    resuming for a round as the keys taken make room for one)."""
    count = 200 if quick else 500
    pairs = 2000 if quick else 6000
    sim = {"distance_km": 10.0, "pulses_per_frame": 1 << 24}
    rows = []
    # enough rounds for every row of the idle link (a round of this link brings about 500 keys)
    for link, rounds in (("rounds running", 0), ("link idle", 10 + pairs // 300)):
        needed = 3 * count + 20 + pairs + 200
        with _folder(None) as folder, running_pair(folder, sim, needed, 600.0, rounds) as pair:
            clients = pair.clients
            fetched: dict[str, list[str]] = {}
            for master, slave in (("alice", "bob"), ("bob", "alice")):
                fetched[slave] = []
                call = _encrypt(clients[master], slave, fetched[slave])
                rows.append(_measure(f"enc_keys at {master}", link, count, call))
            for slave, master in (("bob", "alice"), ("alice", "bob")):
                call = _decrypt(clients[slave], master, fetched[slave])
                rows.append(_measure(f"dec_keys at {slave}", link, count, call))
            call = _encrypt(clients["alice"], "bob", [], 10)
            rows.append(_measure("enc_keys at alice, 10 per call", link, count // 10, call, keys_per_call=10))
            rows.append(_measure("HTTPS floor at alice (a 400)", link, count, _unrouted(clients["alice"])))
            rows.append(_measure_pairs(link, folder, pairs, list(pair.processes.values())))
    # max_key_count above what the row takes: the link fills its store and pauses before it starts
    full = {"max_key_count": pairs + 4000}
    with (
        _folder(None) as folder,
        running_pair(folder, sim, pairs + 200, 600.0, 0, etsi014_options=full) as pair,
    ):
        _wait_for_pause(folder, 600.0)
        rows.append(_measure_pairs("store full", folder, pairs, list(pair.processes.values())))
    if as_json:
        print(json.dumps({"etsi014": rows}))
    else:
        head = ("operation (256-bit keys)", "link", "calls", "keys/s", "median ms", "p99 ms")
        wide = max(len(head[0]), *(len(row["operation"]) for row in rows))
        print(f"{head[0]:<{wide}} {head[1]:<15} {head[2]:>6} {head[3]:>7} {head[4]:>10} {head[5]:>7}")
        for row in rows:
            print(
                f"{row['operation']:<{wide}} {row['link']:<15} {row['calls']:>6} "
                f"{row['keys_per_second']:>7.0f} {row['median_ms']:>10.2f} {row['p99_ms']:>7.2f}"
            )
    return 0


def _wait_for_pause(folder: Path, timeout: float) -> None:
    """Until Alice says her key store is full (the link paused)."""
    deadline = time.monotonic() + timeout
    while _link_state(folder / "alice") != ("paused", "key store full"):
        if time.monotonic() > deadline:
            raise QkddError(f"the link did not pause on a full key store; see {folder}/alice.log")
        time.sleep(0.2)


def _link_state(state_dir: Path) -> tuple[str, str] | None:
    """The link and its reason, as the daemon of ``state_dir`` says on its control socket."""
    try:
        answer = control.ask(state_dir)
    except control.ControlError:
        return None  # starting: ask again
    return None if answer is None else (str(answer["link"]), str(answer["reason"]))


def _measure_pairs(
    link: str, folder: Path, pairs: int, daemons: Sequence[subprocess.Popen[bytes]]
) -> dict[str, Any]:
    """:data:`PAIR_CLIENTS` application pairs at once, half with the master at Alice, half at Bob: each
    gets one key with enc_keys and its slave fetches it at the other site with dec_keys, ``pairs`` in
    all. Keys per second count pairs (a key both sides have); the latencies are those of single calls,
    enc and dec alike. Each application is its own process (:func:`qkdd.delivery.client.application`,
    with :class:`LeanClient`), so that the clients neither share one interpreter's lock nor cost more CPU
    than they must on the cores the daemons use; what they cost is reported beside what the daemons
    (``daemons``) cost, per pair."""
    each = pairs // PAIR_CLIENTS
    # an application imports only the client module: it is ready in a few hundredths of a second
    command = [sys.executable, "-P", "-m", "qkdd.delivery.client"]
    with contextlib.ExitStack() as stack:  # each Popen's exit closes its pipes and waits for it
        applications = [
            stack.enter_context(
                subprocess.Popen(
                    [*command, json.dumps(_application(folder, ROLES[i % 2], each))],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
            for i in range(PAIR_CLIENTS)
        ]
        stack.callback(_kill_running, applications)  # first, on an error: none is left waiting for "go"
        for application in applications:  # connected, both handshakes done
            assert application.stdout is not None and application.stdin is not None
            line = application.stdout.readline()
            if line != b"ready\n":
                raise QkddError(f"an application of the pair row did not start: {_error_of(line)}")
        daemon_cpu = [cpu_seconds(daemon.pid) for daemon in daemons]
        for application in applications:
            assert application.stdin is not None
            application.stdin.write(b"go\n")
            application.stdin.close()
        results = []
        for application in applications:
            assert application.stdout is not None
            results.append(json.loads(application.stdout.read() or b"{}"))
            application.wait()
        daemon_seconds = sum(cpu_seconds(d.pid) - cpu for d, cpu in zip(daemons, daemon_cpu, strict=True))
    failed = [r.get("error", "no answer") for r in results if "error" in r or "enc" not in r]
    if failed or len(results) < PAIR_CLIENTS:
        raise QkddError(f"an application of the pair row failed: {failed[0] if failed else 'no result'}")
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    enc = [latency for r in results for latency in r["enc"]]
    dec = [latency for r in results for latency in r["dec"]]
    every = sorted(enc + dec)

    def p99(values: list[float]) -> float:
        ordered = sorted(values)
        return 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    return {
        "operation": f"pair: enc + dec at the other site, {PAIR_CLIENTS} apps",
        "link": link,
        "calls": len(every),
        "keys_per_second": len(dec) / seconds,
        "median_ms": 1e3 * statistics.median(every),
        "p99_ms": p99(every),
        "enc_p99_ms": p99(enc),
        "dec_p99_ms": p99(dec),
        "client_cpu_ms_per_pair": 1e3 * sum(r["cpu_seconds"] for r in results) / len(dec),
        "daemon_cpu_ms_per_pair": 1e3 * daemon_seconds / len(dec),
    }


def _application(folder: Path, master: str, pairs: int) -> dict[str, Any]:
    """What :func:`qkdd.delivery.client.application` needs to be the application whose master SAE is at
    ``master``'s site: both sites' API addresses and SAE certificates, the SAE IDs, ``pairs``."""
    slave = "bob" if master == "alice" else "alice"
    sites = {}
    for end, role in (("master", master), ("slave", slave)):
        host, port, *files = _site(folder, role)
        sites[end] = [host, port, *map(str, files)]
    return {**sites, "master_sae": SAES[master], "slave_sae": SAES[slave], "pairs": pairs}


def _error_of(line: bytes) -> str:
    """The error an application printed (see :func:`qkdd.delivery.client.main`), or what it printed
    instead."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        return str(json.loads(line)["error"])
    return line.decode(errors="replace").strip() or "no output (its error is above)"


def _kill_running(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()


def _encrypt(client: Client, slave: str, ids: list[str], number: int = 1) -> Callable[[], object]:
    return lambda: ids.extend(key_id for key_id, _ in client.enc_keys(SAES[slave], number=number))


def _decrypt(client: Client, master: str, ids: list[str]) -> Callable[[], object]:
    pending = iter(ids)
    return lambda: client.dec_keys(SAES[master], [next(pending)])


def _unrouted(client: Client) -> Callable[[], object]:
    """A request the API answers 400 without reaching the key manager: what TLS, HTTP and JSON cost on
    their own (with the client's share), the floor under every row above."""

    def call() -> object:
        status, body = client.request("GET", "/api/v1/keys/floor")
        if status != 400:
            raise ApiError(status, body)
        return body

    return call


def _measure(
    operation: str, link: str, calls: int, call: Callable[[], object], keys_per_call: int = 1
) -> dict[str, Any]:
    latencies = []
    started = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "operation": operation,
        "link": link,
        "calls": calls,
        "keys_per_second": calls * keys_per_call / seconds,
        "median_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }
