"""`qkdd demo` runs Alice and Bob as two processes and prints what the issue names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qkdd import demo
from qkdd.demo import scratch_folder
from qkdd.errors import QkddError
from qkdd.store import finished_rounds

FIELDS = {
    "round",
    "aborted",
    "reason",
    "pulses",
    "detections",
    "sifted_bits",
    "qber",
    "phase_error",
    "disclosed_bits",
    "secret_bits",
    "seconds",
    "auth",
}


def run_demo(*args: str, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    """``qkdd demo`` with these arguments, as a user runs it (a process of its own)."""
    command = [sys.executable, "-m", "qkdd", "demo", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.timeout(180)
def test_the_demo_gives_key_at_100_km_by_default(tmp_path: Path) -> None:
    """The link is tuned to the distance (intensities, probabilities, basis bias, frame size)."""
    done = run_demo("--distance-km", "100", "--rounds", "2", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["keys_match"] is True
    assert all(row["secret_bits"] > 0 and not row["aborted"] for row in report["rounds"])


@pytest.mark.timeout(180)
def test_demo_json(tmp_path: Path) -> None:
    # weak coherent pulses: the decoy bound needs a few 10^5 detections
    done = run_demo("--rounds", "2", "--pulses", str(1 << 23), "--json", "--state-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["keys_match"] is True and report["secret_bits_total"] > 0
    assert len(report["rounds"]) == 2 and all(set(row) >= FIELDS for row in report["rounds"])
    assert report["rounds"][0]["auth"] == "psk"
    status = subprocess.run(
        [sys.executable, "-m", "qkdd", "status", "--config", str(tmp_path / "bob.toml"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(status.stdout)["stored_key_bits"] == report["secret_bits_total"]


@pytest.mark.timeout(180)
def test_demo_table_with_an_eavesdropper(tmp_path: Path) -> None:
    done = run_demo("--rounds", "1", "--pulses", str(1 << 19), "--eve", "1")
    assert done.returncode == 0, done.stderr
    assert "aborted" in done.stdout and "identical" in done.stdout


@pytest.mark.timeout(180)
def test_demo_with_pki_bootstrap(tmp_path: Path) -> None:
    pulses = str(1 << 23)  # weak coherent pulses: the decoy bound needs a few 10^5 detections
    done = run_demo(
        "--rounds", "4", "--pulses", pulses, "--bootstrap", "pki", "--json", "--state-dir", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["keys_match"] is True
    auths = [row["auth"] for row in report["rounds"]]
    assert auths[0] == "pki" and auths[-1] == "reserve"


class _Seen(Exception):
    """Raised by the row callback to end the run as soon as the first row arrives."""


@pytest.mark.timeout(120)
def test_the_demo_reports_each_round_when_it_ends(tmp_path: Path) -> None:
    """Rows come while the daemons still run: the callback ends a run of 1,000 rounds at its first row."""
    rows: list[dict[str, object]] = []

    def first_row(row: dict[str, object]) -> None:
        rows.append(row)
        raise _Seen

    with pytest.raises(_Seen):
        demo.run_demo(tmp_path, 1000, {"pulses_per_frame": 1 << 16}, timeout=100, on_round=first_row)
    assert rows[0]["round"] == 0 and set(rows[0]) >= FIELDS
    assert len(finished_rounds(tmp_path / "alice")) < 1000  # the daemons were stopped early


@pytest.mark.timeout(120)
def test_a_demo_without_key_says_why_and_what_would_give_key() -> None:
    done = run_demo("--rounds", "1", "--pulses", str(1 << 16))
    assert done.returncode == 0, done.stderr
    hint = done.stdout.splitlines()[-1]
    assert hint.startswith("no key: frames of 65536 pulses at 10 km hold too few detections")
    assert f"--pulses {1 << 26}" in hint


def test_the_no_key_hint_names_the_cause() -> None:
    too_noisy = [{"reason": "no secret key: phase error rate 0.2500 exceeds threshold 0.1100"}]
    assert "eavesdropper (--eve 1)" in demo.no_key_hint(too_noisy, {"eve_fraction": 1.0})
    assert "this noisy" in demo.no_key_hint(too_noisy, {})
    mixed = [*too_noisy, {"reason": "frame too large"}]
    assert "reasons are in the table" in demo.no_key_hint(mixed, {})


def test_demo_rejects_bad_parameters() -> None:
    done = run_demo("--eve", "2", timeout=60)
    assert done.returncode == 2 and "link.sim.eve_fraction" in done.stderr


def test_a_failed_run_keeps_the_logs_its_error_points_to() -> None:
    with scratch_folder("qkdd-test-") as done:
        (done / "alice.log").write_text("fine")
    assert not done.exists()  # a run that succeeds leaves nothing behind
    with pytest.raises(QkddError), scratch_folder("qkdd-test-") as failed:
        (failed / "alice.log").write_text("why it failed")
        raise QkddError(f"alice exited with status 1; see {failed / 'alice.log'}")
    try:
        assert (failed / "alice.log").read_text() == "why it failed"
    finally:
        shutil.rmtree(failed)


def _bench_e2e(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdd", "bench", "e2e", "--quick", *arguments],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )


@pytest.mark.timeout(180)
def test_bench_e2e_reports_the_rates_overall_and_once_running() -> None:
    done = _bench_e2e("--json", "--rounds", "3", "--pulses", str(1 << 23), "--rtt", "10")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["e2e"]
    assert [(row["distance_km"], row["rtt_ms"]) for row in rows] == [(10.0, 0.0), (10.0, 10.0)]
    for row in rows:
        assert row["keys_match"] is True and row["rounds"] == 3
        assert 0 < row["first_key_seconds"] < row["wall_seconds"]
        assert row["sifted_bps"] > 0 and row["secret_bps"] > 0
        # three rounds measure a window of one in steady state: rounds 1 and 2, about the overall rate
        # (round 0 also starts up, but these frames are small)
        assert row["window"] == 1 and row["steady_rounds"] == 2
        assert row["steady_sifted_bps"] > 0.5 * row["sifted_bps"] and row["steady_secret_bps"] > 0
        assert row["cpu_seconds"] > 0 and row["cpu_seconds_per_secret_mbit"] > 0 and row["peak_rss_mib"] > 10
        # the CPU of the steady rounds alone: no start-up in it
        assert 0 < row["steady_cpu_seconds_per_secret_mbit"] < row["cpu_seconds_per_secret_mbit"]


@pytest.mark.timeout(180)
def test_bench_e2e_with_one_round_has_no_rate_once_running() -> None:
    done = _bench_e2e("--rounds", "1", "--pulses", str(1 << 23), "--rtt", "0")
    assert done.returncode == 0, done.stderr
    header, units, row = done.stdout.splitlines()
    assert "steady state" in header and "sifted Mbit/s" in units
    cells = row.split()
    assert cells[:4] == ["10", "0", "1", "1"] and cells[6:8] == ["-", "-"] and cells[-1] == "True"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(("--pulses", "0"), "pulses_per_frame"), (("--rounds", "0"), "--rounds must be at least 1")],
)
def test_bench_e2e_rejects_bad_parameters_before_starting(arguments: tuple[str, ...], message: str) -> None:
    done = _bench_e2e(*arguments)
    assert done.returncode != 0 and message in done.stderr
    assert done.stdout == ""
