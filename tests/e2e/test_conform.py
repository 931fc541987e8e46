"""`qkdd conform` against our own daemon, for both roles; and against a peer that is no qkdp at all."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qkdd import demo, spec
from qkdd.conform import REQUIREMENTS

SIM = {"pulses_per_frame": 1 << 19, "z_probability": 0.7, "seed": 5, "single_photon": True}
TIMEOUTS = (
    "[timeouts]\nhandshake = 2.0\nround = 4.0\nidle = 30.0\nshutdown_grace = 1.0\nreconnect_max = 0.3\n"
)


def configs(tmp_path: Path, key_delivery: bool = True) -> tuple[Path, Path]:
    """Both roles' configs, by default with key delivery on, so that the key-channel requirements are
    exercised."""
    paths = demo.write_configs(tmp_path, 0, SIM, etsi014=key_delivery)
    for path in paths:
        head, _, tail = path.read_text().partition("[timeouts]")
        path.write_text(head + TIMEOUTS + "\n[run]" + tail.split("[run]", 1)[1])
    return paths


def conform_command(role: str, peer: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "qkdd", "conform", "--peer", peer, "--as", role, "--config", str(config)]


def conform(role: str, peer: str, config: Path) -> subprocess.Popen[str]:
    command = [*conform_command(role, peer, config), "--json"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def finish(suite: subprocess.Popen[str], daemon: subprocess.Popen[bytes], key_delivery: bool = True) -> None:
    """Wait for the suite, stop the daemon under test, and check that every requirement passed."""
    try:
        out, err = suite.communicate(timeout=240)
    finally:
        daemon.kill()
        daemon.wait()
    results = [json.loads(line) for line in out.splitlines()]
    assert {r["requirement"] for r in results} == set(REQUIREMENTS)
    failed = [r for r in results if not r["passed"]]
    assert not failed, failed
    assert suite.returncode == 0, err
    key_channel = [r["detail"] for r in results if r["requirement"].startswith("QKDP-19.")]
    assert key_channel and all(("nothing to check" in d) != key_delivery for d in key_channel), key_channel


@pytest.mark.timeout(300)
@pytest.mark.parametrize("key_delivery", [True, False], ids=["key delivery", "no key delivery"])
def test_our_bob_meets_every_requirement(tmp_path: Path, key_delivery: bool) -> None:
    alice_config, bob_config = configs(tmp_path, key_delivery)
    bob = demo.spawn(bob_config, tmp_path / "bob.log")
    try:
        address = demo.wait_for_listen_address(tmp_path / "bob", bob)
    except BaseException:
        bob.kill()
        raise
    finish(conform("alice", address, alice_config), bob, key_delivery)


@pytest.mark.timeout(300)
def test_our_alice_meets_every_requirement(tmp_path: Path) -> None:
    alice_config, bob_config = configs(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    alice_config.write_text(alice_config.read_text().replace('peer = "127.0.0.1:0"', f'peer = "{address}"'))
    suite = conform("bob", address, bob_config)
    finish(suite, demo.spawn(alice_config, tmp_path / "alice.log"))


@pytest.mark.timeout(120)
def test_a_peer_that_speaks_no_qkdp_fails_and_the_exit_status_says_so(tmp_path: Path) -> None:
    alice_config, _ = configs(tmp_path)
    server = socket.create_server(("127.0.0.1", 0))

    def hang_up() -> None:  # accepts every connection and closes it at once
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    peer = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        done = subprocess.run(
            conform_command("alice", peer, alice_config),
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
        )
    finally:
        server.close()
    assert done.returncode == 1
    for requirement in ("QKDP-10.1", "QKDP-10.2", "QKDP-12.1", "QKDP-13.1", "QKDP-4.1"):
        assert re.search(rf"^FAIL {re.escape(requirement)} ", done.stdout, re.M), done.stdout


def test_the_spec_lists_exactly_the_requirements_conform_checks() -> None:
    doc = spec.SPEC_PATH.with_suffix(".md").read_text()
    listed = dict(re.findall(r"^\| (QKDP-[\d.]+) \| (.*) \|$", doc, re.M))
    assert listed == REQUIREMENTS


def test_a_config_of_the_other_role_is_refused(tmp_path: Path) -> None:
    alice_config, _ = configs(tmp_path)
    done = subprocess.run(
        conform_command("bob", "127.0.0.1:1", alice_config),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "alice's config given to play bob" in done.stderr
