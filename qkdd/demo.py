"""``qkdd demo`` and ``qkdd bench e2e``: Alice and Bob as two OS processes over 127.0.0.1.

The demo writes two configs and a PSK into a state folder, starts Bob (on a free port it picks) and Alice
at once (she retries until he listens); both stop after ``--rounds`` rounds. It then
reads both key stores, prints one row per round from Alice's round log, and checks that both stores hold
the same key IDs with the same bytes.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdd import config as config_mod
from qkdd.auth import pki
from qkdd.auth.psk import generate_psk, write_psk
from qkdd.daemon import read_listen_address
from qkdd.errors import QkddError
from qkdd.relay import DelayRelay
from qkdd.store import KeyStore, finished_rounds

LINK_ID = "demo-link"


@dataclass
class DemoResult:
    rounds: list[dict[str, Any]]
    keys_match: bool
    secret_bits_total: int
    alice_keys: int
    bob_keys: int
    seconds: float
    first_key_seconds: float | None
    peak_rss_bytes: int = 0  # the larger of the two daemons' peak resident memory
    cpu_samples: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # ProcessWatch.cpu

    def as_json(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "keys_match": self.keys_match,
            "secret_bits_total": self.secret_bits_total,
        }


SAES = {"alice": "sae-alice", "bob": "sae-bob"}
"""The demo's one SAE per site (ETSI 014): named by its certificate's common name."""
ETSI014_SOCKET = "etsi014.sock"
"""In each state directory: the key delivery API for the SAE of :data:`SAES`, as this process's user."""
HOSTS = ("127.0.0.1", "localhost")  # the names the demo KMEs' certificates are valid for
DEMO_PULSES = 1 << 26
"""Pulses per frame of ``qkdd bench e2e`` (``--pulses``), and the fewest of the demo's, whose link is tuned
to its distance (longer frames at long distance). With the sim's fixed intensities, 2^26 at 10 km is 2.9
million detections and 1.95 million sifted bits per round (tuned: 3.5 and 2.6 million). Larger frames
amortise each round's fixed costs (Cascade's round trips, the commits) and come closer to what a link
runs (10^8 pulses and more per frame); each daemon then holds about 0.4-0.5 GB, and the first round takes
about 2 s.
"""


def write_etsi014_files(state_dir: Path, saes: Mapping[str, Sequence[str]]) -> Path:
    """A throwaway ECDSA CA, a server certificate per KME and a client certificate per SAE."""
    folder = state_dir / "etsi014"
    if not (folder / "ca.crt").exists():
        pki.init_ca(folder, algorithm="ecdsa-p256", name="qkdd demo ETSI 014 CA", days=2)
        for role in ("alice", "bob"):
            pki.issue(
                f"{role}-kme", folder, folder, algorithm="ecdsa-p256", days=2, usage="server", hosts=HOSTS
            )
            for sae in saes[role]:
                pki.issue(sae, folder, folder, algorithm="ecdsa-p256", days=2, usage="client")
    return folder


def etsi014_section(role: str, saes: Sequence[str], options: Mapping[str, int] | None = None) -> str:
    """The ``[etsi014]`` table of ``role``: HTTPS for ``saes`` (by certificate), and its state directory's
    ``etsi014.sock`` for the first of them, as this process's user (by uid); ``options``: more keys of
    it (integers)."""
    entries = "".join(
        f'\n[[etsi014.sae]]\nid = "{sae}"\ncommon_name = "{sae}"\n'
        + (f"uid = {os.getuid()}\n" if i == 0 else "")
        for i, sae in enumerate(saes)
    )
    entries = "".join(f"{name} = {int(value)}\n" for name, value in (options or {}).items()) + entries
    return f"""
[etsi014]
listen = "127.0.0.1:0"
unix_socket = "{role}/{ETSI014_SOCKET}"
kme_id = "{role}-kme"
certificate_file = "etsi014/{role}-kme.crt"
key_file = "etsi014/{role}-kme.key"   # mode 0600
ca_file = "etsi014/ca.crt"           # the CA of SAE client certificates
{entries}"""


def write_configs(
    state_dir: Path,
    rounds: int,
    sim: dict[str, Any],
    bob_port: int = 0,
    bootstrap: str = "psk",
    etsi014: bool = False,
    extra_saes: Mapping[str, Sequence[str]] | None = None,
    window: int = 1,
    etsi014_options: Mapping[str, int] | None = None,
) -> tuple[Path, Path]:
    """Configs for both roles in ``state_dir``, with a fresh PSK or (``bootstrap="pki"``) a fresh CA
    and node certificates; with ``etsi014``, each daemon also serves the key delivery API to the SAE of
    :data:`SAES` and those of ``extra_saes`` (by role), ``etsi014_options`` set in both ``[etsi014]``
    tables (e.g. ``max_key_count``); ``window`` rounds in flight (the demo runs one
    round after another, so that each row shows one round and the switch to reserve authentication)."""
    saes = {role: [sae, *(extra_saes or {}).get(role, ())] for role, sae in SAES.items()}
    state_dir.mkdir(parents=True, exist_ok=True)
    psk = state_dir / "psk"
    if bootstrap == "psk" and not psk.exists():
        write_psk(psk, generate_psk())
    if bootstrap == "pki" and not (state_dir / "pki" / "ca.crt").exists():
        pki.init_ca(state_dir / "pki")
        for role in ("alice", "bob"):
            pki.issue(role, state_dir / "pki", state_dir / "pki")
    paths = []
    for role in ("alice", "bob"):
        (state_dir / role).mkdir(exist_ok=True)
        peer_role = "bob" if role == "alice" else "alice"
        files = (
            (f"pki/{role}.crt", f"pki/{role}.key", "pki/ca.crt", peer_role) if bootstrap == "pki" else None
        )
        path = state_dir / f"{role}.toml"
        path.write_text(
            config_mod.render(
                role,
                link_id=LINK_ID,
                state_dir=role,
                psk_file="psk",
                listen=f"127.0.0.1:{bob_port}" if role == "bob" else None,
                peer="127.0.0.1:0" if role == "alice" else None,
                sim=sim,
                max_rounds=rounds,
                pki=files,
                window=window,
            )
            + (etsi014_section(role, saes[role], etsi014_options) if etsi014 else "")
        )
        paths.append(path)
    if etsi014:
        write_etsi014_files(state_dir, saes)
    return paths[0], paths[1]


def spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            # -P: the installed qkdd, not a qkdd/ folder in the working directory
            [sys.executable, "-P", "-m", "qkdd", "run", "--config", str(config)],
            stdout=sink,
            stderr=sink,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_for_listen_address(state_dir: Path, process: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        address = read_listen_address(state_dir)
        if address:
            return address
        if process.poll() is not None:
            raise QkddError(f"bob exited with status {process.returncode} before listening")
        time.sleep(0.02)
    raise QkddError("bob did not start listening within 20 s")


def start_pair(
    alice_config: Path, bob_config: Path, via: Callable[[str], str] | None = None
) -> list[subprocess.Popen[bytes]]:
    """Start both daemons at once, Bob on a port chosen here and Alice aimed at it (or at
    ``via(that address)``, a relay); returns [alice, bob]. Each daemon takes about a second to start (its
    imports); started one after the other, that second came before every first key. Alice retries until
    Bob listens (her reconnect backoff starts at 0.1 s). Should another program take the port in the
    meantime, Bob's bind fails and the demo says so (``wait_for_listen_address``)."""
    state_dir = bob_config.parent
    for role in ("alice", "bob"):
        for name in ("listen-address", "etsi014-address"):
            (state_dir / role / name).unlink(missing_ok=True)
    listen = 'listen = "127.0.0.1:0"'
    text = bob_config.read_text()
    if listen in text:
        with socket.socket() as probe:  # a free port now; Bob binds it a moment later
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        text = text.replace(listen, f'listen = "127.0.0.1:{port}"', 1)
        bob_config.write_text(text)
    bob_address = next(line.split('"')[1] for line in text.splitlines() if line.startswith("listen = "))
    address = via(bob_address) if via is not None else bob_address
    alice_config.write_text(alice_config.read_text().replace('peer = "127.0.0.1:0"', f'peer = "{address}"'))
    bob = spawn(bob_config, state_dir / "bob.log")
    try:
        alice = spawn(alice_config, state_dir / "alice.log")
    except BaseException:
        bob.kill()
        bob.wait()
        raise
    try:
        wait_for_listen_address(state_dir / "bob", bob)
    except BaseException:
        for process in (alice, bob):
            process.kill()
            process.wait()
        raise
    return [alice, bob]


def run_demo(
    state_dir: Path,
    rounds: int,
    sim: dict[str, Any],
    timeout: float | None = None,
    bootstrap: str = "psk",
    rtt: float = 0.0,
    window: int = 1,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> DemoResult:
    """Run both daemons to completion and compare their stores; with ``rtt`` (seconds), Alice reaches
    Bob through a relay that adds that round-trip time. ``on_round`` is called with each of Alice's rounds
    (a row of :attr:`DemoResult.rounds`, without Bob's state) soon after it ends."""
    alice_config, bob_config = write_configs(state_dir, rounds, sim, bootstrap=bootstrap, window=window)
    started = time.monotonic()
    relays: list[DelayRelay] = []

    def relay(address: str) -> str:
        relays.append(DelayRelay(address, rtt / 2))
        return relays[-1].address

    alice, bob = start_pair(alice_config, bob_config, relay if rtt > 0 else None)
    watch = ProcessWatch((alice.pid, bob.pid))
    try:
        limit = timeout if timeout is not None else 60.0 + 60.0 * rounds
        reported = -1
        for process, name in ((alice, "alice"), (bob, "bob")):
            while True:
                try:
                    status = process.wait(ROW_POLL_SECONDS if on_round is not None else 1.0)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() - started > limit:
                        raise QkddError(
                            f"{name} did not finish within {limit:.0f} s; see {state_dir / (name + '.log')}"
                        ) from None
                if on_round is not None:
                    reported = _report_rounds(state_dir / "alice", reported, on_round)
            if status != 0:
                raise QkddError(f"{name} exited with status {status}; see {state_dir / (name + '.log')}")
        if on_round is not None:
            _report_rounds(state_dir / "alice", reported, on_round)
    finally:
        for leftover in (alice, bob):
            if leftover.poll() is None:
                leftover.kill()
                leftover.wait()
        for each in relays:
            each.close()
        watch.stop()
    seconds = time.monotonic() - started
    return dataclasses.replace(
        compare_stores(state_dir, seconds), peak_rss_bytes=watch.bytes, cpu_samples=watch.cpu
    )


ROW_POLL_SECONDS = 0.2
"""How often ``qkdd demo`` looks for rounds that ended, to print their rows."""


def _report_rounds(state_dir: Path, after: int, on_round: Callable[[dict[str, Any]], None]) -> int:
    """Hand ``on_round`` each round of the store in ``state_dir`` numbered above ``after`` that ended;
    the number of the last one handed (``after`` if none: the store may not exist yet)."""
    try:
        ended = finished_rounds(state_dir, after)
    except sqlite3.Error:  # not created yet, or busy: the next look finds the rounds
        return after
    for record in ended:
        on_round(_row(record))
        after = record["round"]
    return after


def _row(record: dict[str, Any], bob_state: str | None = None) -> dict[str, Any]:
    """One row of the demo's table (and of its JSON) from a round record of Alice's store."""
    return {
        "round": record["round"],
        "aborted": record["state"] != "committed",
        "reason": record["reason"],
        "pulses": record["pulses"],
        "detections": record["detections"],
        "sifted_bits": record["sifted_bits"],
        "qber": record["qber"],
        "phase_error": record["phase_error"],
        "disclosed_bits": record["disclosed_bits"],
        "secret_bits": record["secret_bits"] if record["state"] == "committed" else 0,
        "seconds": record["seconds"],
        "finished_at": record["finished_at"],
        "auth": record["auth"],
        "bob_state": bob_state,
    }


class ProcessWatch:
    """Some processes, read until they end (Linux ``/proc``): their peak resident memory (the larger
    VmHWM) and, every :data:`WATCH_SECONDS`, the CPU seconds they have used together, with the time (the
    clock of the stores' ``finished_at``), so that the CPU of any stretch of the run can be read."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.bytes = 0
        self.cpu: list[tuple[float, float]] = []  # (time.time(), CPU seconds of all of them so far)
        self._pids = pids
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="qkdd-process-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        # a process that ended counts with its last reading, so the samples go on covering the run's end
        last = dict.fromkeys(self._pids, 0.0)
        while not self._done.wait(WATCH_SECONDS):
            for pid in self._pids:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.bytes = max(self.bytes, int(line.split()[1]) * 1024)
                    last[pid] = max(last[pid], cpu_seconds(pid))
            self.cpu.append((time.time(), sum(last.values())))

    @staticmethod
    def between(samples: Sequence[tuple[float, float]], start: float, end: float) -> float | None:
        """CPU seconds used from ``start`` to ``end`` by :attr:`cpu` ``samples`` (interpolated between
        them); None when they do not cover that stretch."""
        if not samples or start < samples[0][0] or end > samples[-1][0] or end <= start:
            return None

        def at(moment: float) -> float:
            after = bisect.bisect_left(samples, (moment, -math.inf))  # the first sample at or after it
            t1, c1 = samples[after]
            if t1 == moment or after == 0:
                return c1
            t0, c0 = samples[after - 1]
            return c0 + (c1 - c0) * (moment - t0) / (t1 - t0)

        return at(end) - at(start)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) process ``pid`` has used so far (Linux's ``/proc``).

    Raises:
        OSError: no such process (any more).
    """
    # utime and stime, fields 14 and 15 of stat (after the parenthesised command name)
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


WATCH_SECONDS = 0.05
"""How often :class:`ProcessWatch` reads the daemons' CPU: a steady window of a few seconds is then
read to about a percent."""


def compare_stores(state_dir: Path, seconds: float) -> DemoResult:
    stores = [KeyStore(state_dir / role, LINK_ID, create=False) for role in ("alice", "bob")]
    try:
        alice_keys, bob_keys = (dict(store.committed_keys()) for store in stores)
        log = stores[0].rounds()
        bob_rounds = {r["round"]: r for r in stores[1].rounds()}
    finally:
        for store in stores:
            store.close()
    rows = [_row(r, bob_rounds.get(r["round"], {}).get("state")) for r in log]
    first_key: float | None = None
    for r in log:
        if r["state"] == "committed" and first_key is None:
            first_key = float(r["finished_at"])
    match = alice_keys == bob_keys and all(
        row["bob_state"] == ("aborted" if row["aborted"] else "committed") for row in rows
    )
    return DemoResult(
        rows,
        match,
        8 * sum(len(k) for k in alice_keys.values()),
        len(alice_keys),
        len(bob_keys),
        seconds,
        first_key,
    )


def _format_row(row: dict[str, Any]) -> str:
    def rate(value: float | None) -> str:
        return "     -" if value is None else f"{100 * value:5.2f}%"

    seconds = row["seconds"] or 0.0
    key_rate = row["secret_bits"] / seconds if seconds else 0.0
    text = (
        f"{row['round']:>5} {row['pulses']:>10} {row['detections']:>10} {row['sifted_bits']:>9} "
        f"{rate(row['qber'])} {rate(row['phase_error'])} {row['disclosed_bits']:>9} {row['secret_bits']:>9} "
        f"{key_rate / 1e3:>9.1f} {seconds:>7.2f}"
    )
    return text + (f"  aborted: {row['reason']}" if row["aborted"] else "")


HEADER = "round     pulses detections    sifted   QBER(Z) phase(X) disclosed    secret  key kb/s seconds"


@contextlib.contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A temporary folder for a run's state, removed when the run succeeds and kept when it fails, so
    that the daemons' logs its error message points to are still there."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    yield folder  # an exception propagates from here and skips the removal
    shutil.rmtree(folder, ignore_errors=True)


def link_options(distance_km: float, pulses: int | None) -> dict[str, Any]:
    """The simulator's intensities, probabilities, basis bias and frame size for ``distance_km`` from
    ``qkdd keyrate``'s optimiser (frames of at least :data:`DEMO_PULSES` unless ``pulses`` fixes them);
    without scipy, the simulator's fixed defaults and a hint."""
    from qkdd import keyrate  # noqa: PLC0415

    if importlib.util.find_spec("scipy") is not None:
        return keyrate.sim_options(distance_km, pulses_per_frame=pulses, min_pulses=DEMO_PULSES)
    print(
        "qkdd demo: the link keeps its fixed intensities (0.5/0.2/0): pip install 'qkdd[keyrate]' "
        "to tune them, and the frame size, to the distance",
        file=sys.stderr,
    )
    return {"distance_km": distance_km, "pulses_per_frame": DEMO_PULSES if pulses is None else pulses}


def main(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise QkddError("--rounds must be at least 1")
    sim = {**link_options(args.distance_km, args.pulses), "eve_fraction": args.eve}
    from qkdd.links.sim import SimParameters  # noqa: PLC0415

    SimParameters.from_options(sim)  # check the link parameters before starting anything

    def print_row(row: dict[str, Any]) -> None:
        print(_format_row(row), flush=True)

    on_round = None if args.json else print_row
    if not args.json:
        print(HEADER, flush=True)
    if args.state_dir is not None:
        result = run_demo(
            args.state_dir.resolve(), args.rounds, sim, bootstrap=args.bootstrap, on_round=on_round
        )
    else:
        with scratch_folder("qkdd-demo-") as folder:
            result = run_demo(folder, args.rounds, sim, bootstrap=args.bootstrap, on_round=on_round)
    hint = no_key_hint(result.rounds, sim) if result.secret_bits_total == 0 else None
    if args.json:
        print(json.dumps({**result.as_json(), **({"hint": hint} if hint else {})}))
    else:
        verdict = "identical" if result.keys_match else "DIFFERENT"
        print(
            f"keys: Alice {result.alice_keys} blocks, Bob {result.bob_keys} blocks — {verdict}; "
            f"{result.secret_bits_total} secret bits in {result.seconds:.1f} s"
        )
        if hint:
            print(f"no key: {hint}")
    return 0 if result.keys_match else 1


_TOO_FEW_DETECTIONS = (
    "certified",
    "finite-size",
    "no key-basis",
    "no test-basis",
    "no Z-basis",
    "no X-basis",
)
"""Abort reasons of a frame too short for the finite-key bound (decoy.decoy_key_length, estimation)."""
_TOO_MANY_ERRORS = ("exceeds threshold", "phase error bound reaches")
"""Abort reasons of an error rate that leaves no secret key."""


def no_key_hint(rows: Sequence[dict[str, Any]], sim: Mapping[str, Any]) -> str:
    """Why no round of the demo yielded key, and what would, from the rounds' abort reasons."""
    reasons = [row["reason"] or "" for row in rows]
    if reasons and all(any(part in reason for part in _TOO_MANY_ERRORS) for reason in reasons):
        if sim.get("eve_fraction"):
            return (
                f"every round's error rate was too high: the eavesdropper (--eve {sim['eve_fraction']:g}) "
                "disturbs the link, as she must; without --eve the link yields key"
            )
        return "every round's error rate was too high: a link this noisy yields no secret key"
    if reasons and all(any(part in reason for part in _TOO_FEW_DETECTIONS) for reason in reasons):
        distance = float(sim.get("distance_km", 10.0))
        pulses = int(sim.get("pulses_per_frame", DEMO_PULSES))
        needed = _tuned_pulses(distance)
        advice = (
            f"the demo tunes frames to {needed} pulses at this distance: leave out --pulses, or set "
            f"--pulses {needed}"
            if needed is not None and needed > pulses
            else "longer frames (--pulses) collect them; pip install 'qkdd[keyrate]' to have the demo "
            "tune the frame size to the distance"
        )
        return (
            f"frames of {pulses} pulses at {distance:g} km hold too few detections for the finite-key "
            f"bound; {advice}"
        )
    return "no round yielded secret key; the reasons are in the table above (and in the daemons' logs)"


def _tuned_pulses(distance_km: float) -> int | None:
    """The frame size ``qkdd keyrate``'s tuning picks for the sim at ``distance_km``, if scipy is here."""
    if importlib.util.find_spec("scipy") is None:
        return None
    from qkdd import keyrate  # noqa: PLC0415

    return keyrate.sim_settings(distance_km, min_pulses=DEMO_PULSES).pulses_per_frame


def rounds_in_flight(rounds: Sequence[dict[str, Any]]) -> int:
    """The most ``rounds`` that were open at once, each from its start (``finished_at − seconds``) to its
    end: what Alice kept open (``policy.rounds_to_open`` of the round trip she measured, within the
    window), read from the run itself."""
    # at equal times an end comes first: a round that ends as another starts never overlaps it
    events = sorted(
        [(r["finished_at"] - (r["seconds"] or 0.0), 1) for r in rounds]
        + [(r["finished_at"], -1) for r in rounds]
    )
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def steady_rounds(rounds: Sequence[dict[str, Any]], window: int) -> tuple[list[dict[str, Any]], float | None]:
    """The rounds that ended while the pipeline was full, and when the round before them ended: with
    ``window`` rounds in flight, the first ``window`` rounds to end also paid for filling it (and round 0
    for starting up: imports, kernels, the first frame), and the last ``window − 1`` ended while it
    drained, with the machine less busy. Nothing (``[]``) when the run is too short to have such rounds:
    at least ``2·window + 1`` rounds are needed."""
    ordered = sorted(rounds, key=lambda r: r["finished_at"])
    first, last = window, len(ordered) - window
    if last < first + 1:
        return [], None
    return ordered[first : last + 1], ordered[first - 1]["finished_at"]


def _totals(rounds: Sequence[dict[str, Any]], since: float | None = None) -> tuple[int, int, float]:
    """Sifted bits, secret bits (of committed rounds) of ``rounds``, and the seconds they took: from
    ``since`` (default: the first one's start) to the last one's end. Rounds may overlap (several in
    flight), so their own durations do not add up."""
    if not rounds:
        return 0, 0, 0.0
    start = since if since is not None else min(r["finished_at"] - (r["seconds"] or 0.0) for r in rounds)
    return (
        sum(r["sifted_bits"] for r in rounds),
        sum(r["secret_bits"] for r in rounds),
        max(r["finished_at"] for r in rounds) - start,
    )


def bench_e2e(
    quick: bool,
    as_json: bool,
    rounds: int,
    rtts_ms: Sequence[float] | None = None,
    pulses: int | None = None,
    window: int = 1,
) -> int:
    """Sifted and secret key processed end to end per second, overall and in steady state (the rounds
    that ended while the pipeline was full, :func:`steady_rounds`),
    the time to the first stored key, and the CPU seconds both daemons spent per secret Mbit: at several
    distances on loopback, and at 10 km against the round-trip time (a delay relay)."""
    if rounds < 1:
        raise QkddError("--rounds must be at least 1")
    pulses = DEMO_PULSES if pulses is None else pulses
    from qkdd.links.sim import SimParameters  # noqa: PLC0415

    SimParameters.from_options({"pulses_per_frame": pulses})  # a bad --pulses fails before any daemon
    if rtts_ms is None:
        rtts_ms = [10.0] if quick else [10.0, 50.0]
    runs = [(10.0, 0.0)] if quick else [(10.0, 0.0), (25.0, 0.0), (50.0, 0.0)]
    runs += [(10.0, float(rtt)) for rtt in rtts_ms if rtt > 0]
    rows = []
    for distance, rtt_ms in runs:
        with scratch_folder("qkdd-bench-") as folder:
            sim = {"distance_km": distance, "pulses_per_frame": pulses}
            started = time.time()
            cpu = _children_cpu()
            result = run_demo(folder, rounds, sim, rtt=rtt_ms / 1e3, window=window)
            cpu = _children_cpu() - cpu
        open_rounds = rounds_in_flight(result.rounds)
        sifted, _, round_seconds = _totals(result.rounds)
        steady, since = steady_rounds(result.rounds, open_rounds)
        steady_sifted, steady_secret, steady_seconds = _totals(steady, since)
        steady_cpu = None
        if steady and since is not None:
            end = max(r["finished_at"] for r in steady)
            steady_cpu = ProcessWatch.between(result.cpu_samples, since, end)
        rows.append(
            {
                "distance_km": distance,
                "rtt_ms": rtt_ms,
                "window": window,
                "open_rounds": open_rounds,
                "rounds": len(result.rounds),
                "sifted_bits": sifted,
                "secret_bits": result.secret_bits_total,
                "sifted_bps": sifted / round_seconds if round_seconds else 0.0,
                "secret_bps": result.secret_bits_total / round_seconds if round_seconds else 0.0,
                "steady_rounds": len(steady),
                "steady_sifted_bps": steady_sifted / steady_seconds if steady_seconds else None,
                "steady_secret_bps": steady_secret / steady_seconds if steady_seconds else None,
                "wall_seconds": result.seconds,
                "first_key_seconds": None
                if result.first_key_seconds is None
                else result.first_key_seconds - started,
                "keys_match": result.keys_match,
                "cpu_seconds": cpu,
                "peak_rss_mib": result.peak_rss_bytes / 2**20,
                "cpu_seconds_per_secret_mbit": cpu / (result.secret_bits_total / 1e6)
                if result.secret_bits_total
                else None,
                # both daemons' CPU while the steady rounds ran (no start-up, no pipeline filling)
                "steady_cpu_seconds_per_secret_mbit": steady_cpu / (steady_secret / 1e6)
                if steady_cpu is not None and steady_secret
                else None,
            }
        )
    if as_json:
        print(json.dumps({"e2e": rows}))
    else:
        print(
            f"{'km':>5} {'RTT ms':>6} {'window':>6} {'rounds':>6} {'sifted Mbit/s':>14} "
            f"{'secret kbit/s':>14} {'steady state':>14} {'':>14} {'first key s':>12} "
            f"{'CPU s/Mbit':>10} {'':>10} match"
        )
        print(
            f"{'':>5} {'':>6} {'':>6} {'':>6} {'':>14} {'':>14} {'sifted Mbit/s':>14} {'secret kbit/s':>14} "
            f"{'':>12} {'whole run':>10} {'steady':>10}"
        )

        def rate(value: float | None, unit: float, digits: int) -> str:
            return "-" if value is None else f"{value / unit:.{digits}f}"

        for row in rows:
            first = "-" if row["first_key_seconds"] is None else f"{row['first_key_seconds']:.2f}"
            per_mbit = row["cpu_seconds_per_secret_mbit"]
            steady_per_mbit = row["steady_cpu_seconds_per_secret_mbit"]
            print(
                f"{row['distance_km']:>5.0f} {row['rtt_ms']:>6.0f} {row['window']:>6} {row['rounds']:>6} "
                f"{rate(row['sifted_bps'], 1e6, 2):>14} {rate(row['secret_bps'], 1e3, 1):>14} "
                f"{rate(row['steady_sifted_bps'], 1e6, 2):>14} {rate(row['steady_secret_bps'], 1e3, 1):>14} "
                f"{first:>12} {'-' if per_mbit is None else f'{per_mbit:.2f}':>10} "
                f"{'-' if steady_per_mbit is None else f'{steady_per_mbit:.2f}':>10} {row['keys_match']!s:>6}"
            )
    return 0 if all(row["keys_match"] for row in rows) else 1


def _children_cpu() -> float:
    """User and system CPU seconds of this process's waited-for children (the daemons)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
