"""Operating two `qkdd run` processes: `qkdd status` (live, watched, after kill -9 and after SIGTERM, its
JSON errors) and a scrape of `/metrics` that `promtool check metrics` accepts.

promtool comes from the Debian package `prometheus` (.ci/run installs it). Without it the promtool check
skips, unless QKDD_REQUIRE_PROMTOOL is set (as .ci/run does): then it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qkdd import demo
from qkdd.daemon import ETSI014_FILE, METRICS_FILE, read_listen_address
from qkdd.delivery.client import Client
from qkdd.metrics import NAMES
from tests.helpers import wait_until

SIM = {"pulses_per_frame": 1 << 19, "z_probability": 0.7, "seed": 9, "single_photon": True}
pytestmark = pytest.mark.timeout(240)
LIVE_FIELDS = {
    "running",
    "pid",
    "role",
    "link",
    "reason",
    "peer",
    "link_since",
    "started_at",
    "uptime_seconds",
    "rounds_this_run",
    "secret_bits_per_second_1m",
    "secret_bits_per_second_1h",
    "reconciliation_efficiency",
    "state_dir",
    "link_id",
    "rounds_committed",
    "rounds_aborted",
    "rounds_pending",
    "last_round",
    "last_round_at",
    "last_qber",
    "last_phase_error",
    "reserve_bits",
    "psk_retired",
    "psk_fingerprint",
    "epoch",
    "delivery_available_bits",
    "delivery_leased_bits",
    "delivery_waiting_keys",
    "delivery_assignments",
    "delivery_stored_keys",
}


@dataclass
class Pair:
    folder: Path
    processes: dict[str, subprocess.Popen[bytes]]

    def config(self, role: str) -> Path:
        return self.folder / f"{role}.toml"


def qkdd(*argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdd", *argv], capture_output=True, text=True, timeout=60, check=check
    )


def status(pair: Pair, role: str) -> dict[str, Any]:
    done = qkdd("status", "--config", str(pair.config(role)), "--json")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    folder = tmp_path_factory.mktemp("operate")
    configs = demo.write_configs(folder, 0, SIM, etsi014=True)
    for path in configs:  # metrics on an ephemeral port; a pause between rounds spares the CPU
        text = path.read_text().replace("max_rounds = 0", "max_rounds = 0\nround_pause = 0.2", 1)
        path.write_text(text + '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    processes = dict(zip(("alice", "bob"), demo.start_pair(*configs), strict=True))
    running = Pair(folder, processes)
    try:

        def committed() -> bool:
            for role, process in processes.items():
                assert process.poll() is None, f"{role} exited; see {folder / (role + '.log')}"
            reports = [status(running, role) for role in processes]
            return all(r.get("link") == "up" and r.get("rounds_committed", 0) >= 2 for r in reports)

        wait_until(committed, 120, "two committed rounds at both sides")
        yield running
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(30)


def test_status_of_a_running_daemon_is_live_in_json_and_text(pair: Pair) -> None:
    for role in ("alice", "bob"):
        report = status(pair, role)
        assert set(report) >= LIVE_FIELDS, LIVE_FIELDS - set(report)
        assert report["running"] is True and report["pid"] == pair.processes[role].pid
        assert report["link"] == "up" and report["reason"] is None and report["role"] == role
        assert report["uptime_seconds"] > 0 and report["secret_bits_per_second_1m"] > 0
        assert report["last_round_at"].endswith("+00:00") and 0 < report["last_qber"] < 0.05
        done = qkdd("status", "--config", str(pair.config(role)))
        assert done.returncode == 0 and done.stderr == ""
        lines = dict(line.strip().split(": ", 1) for line in done.stdout.splitlines())
        assert set(lines) == set(status(pair, role))  # the same fields as the JSON
        assert lines["running"] == "yes" and lines["link"] == "up" and lines["last_qber"].endswith("%")


def test_watch_reports_again_until_interrupted(pair: Pair) -> None:
    argv = ["status", "--config", str(pair.config("bob")), "--json", "--watch", "--interval", "0.2"]
    with subprocess.Popen([sys.executable, "-m", "qkdd", *argv], stdout=subprocess.PIPE, text=True) as watch:
        try:
            assert watch.stdout is not None
            reports = [json.loads(watch.stdout.readline()) for _ in range(3)]
            assert all(r["running"] and r["role"] == "bob" for r in reports)
            assert reports[0]["uptime_seconds"] < reports[2]["uptime_seconds"]
        finally:
            watch.send_signal(signal.SIGINT)
            assert watch.wait(30) == 0


def test_a_scrape_of_each_daemon_passes_promtool(pair: Pair) -> None:
    folder = pair.folder / "etsi014"
    address = read_listen_address(pair.folder / "alice", ETSI014_FILE)
    assert address is not None
    host, _, port = address.rpartition(":")
    sae = Client(host, int(port), folder / "sae-alice.crt", folder / "sae-alice.key", folder / "ca.crt")
    try:
        sae.enc_keys("sae-bob", number=1)
        assert sae.request("GET", "sae-bob/nothing")[0] == 400
    finally:
        sae.close()
    for role in ("alice", "bob"):
        address = read_listen_address(pair.folder / role, METRICS_FILE)
        assert address is not None
        response = httpx.get(f"http://{address}/metrics", timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        text = response.text
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert found[("qkdd_link_up", ())] == 1 and found[("qkdd_secret_bytes_total", ())] > 0
        assert found[("qkdd_rounds_total", (("outcome", "committed"),))] >= 2
        if role == "alice":
            assert found[("qkdd_etsi014_requests_total", (("route", "enc_keys"), ("status", "200")))] == 1
            assert found[("qkdd_etsi014_requests_total", (("route", "other"), ("status", "400")))] == 1
        families = {family.name for family in text_string_to_metric_families(text)}
        assert families == {name.removesuffix("_total") for name in NAMES}
        promtool = shutil.which("promtool")
        if promtool is None:
            if os.environ.get("QKDD_REQUIRE_PROMTOOL"):
                pytest.fail("promtool (Debian package `prometheus`) is required")
            pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
        checked = subprocess.run(
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_status_says_not_running_after_kill_9_and_after_sigterm(pair: Pair, tmp_path: Path) -> None:
    alice, bob = pair.processes["alice"], pair.processes["bob"]
    alice.kill()  # SIGKILL: no stop file, a stale socket file
    alice.wait(30)
    report = status(pair, "alice")
    assert report["running"] is False and report["stopped_cleanly"] is False
    assert report["pid"] == alice.pid and report["since"] and report["stop_reason"] is None
    assert report["rounds_committed"] >= 2 and "link" not in report
    text = qkdd("status", "--config", str(pair.config("alice")))
    assert text.returncode == 0 and text.stdout.startswith("not running since ")
    assert "did not stop cleanly" in text.stdout.splitlines()[0]
    bob.send_signal(signal.SIGTERM)
    assert bob.wait(60) == 0
    report = status(pair, "bob")
    assert report["running"] is False and report["stopped_cleanly"] is True
    assert report["stop_reason"] == "SIGTERM" and report["pid"] == bob.pid
    # errors under --json are JSON, and the exit status says so
    for argv, error in (
        (["--state-dir", str(tmp_path / "none")], "no key store"),
        (["--config", str(tmp_path / "none.toml")], "cannot read"),
    ):
        done = qkdd("status", *argv, "--json")
        assert done.returncode == 2 and error in json.loads(done.stdout)["error"] and done.stderr == ""
