"""Two hosts: Alice and Bob in two network namespaces joined by a veth pair, plain and with netem (10 ms
delay and 1% loss on each end). Skipped where `ip netns` is unavailable or not permitted (it needs
CAP_NET_ADMIN), and the netem case where the kernel has no netem qdisc (sch_netem)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdd import demo

SIM = {"pulses_per_frame": 1 << 20, "z_probability": 0.7, "seed": 3, "single_photon": True}
ADDRESSES = {"alice": "10.231.0.1", "bob": "10.231.0.2"}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture(params=["veth", "netem"])
def namespaces(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) is not installed")
    tag = f"qkdd{os.getpid() % 100000}"
    names = {"alice": f"{tag}a", "bob": f"{tag}b"}
    try:
        _ip("netns", "add", names["alice"])
    except (subprocess.CalledProcessError, OSError) as error:
        pytest.skip(f"ip netns is not permitted here: {error}")
    try:
        _ip("netns", "add", names["bob"])
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for role, veth in (("alice", f"{tag}va"), ("bob", f"{tag}vb")):
            _ip("link", "set", veth, "netns", names[role])
            ns = ("netns", "exec", names[role])
            _ip(*ns, "ip", "addr", "add", f"{ADDRESSES[role]}/24", "dev", veth)
            _ip(*ns, "ip", "link", "set", veth, "up")
            _ip(*ns, "ip", "link", "set", "lo", "up")
            if request.param == "netem":
                netem = ["tc", "qdisc", "add", "dev", veth, "root", "netem", "delay", "10ms", "loss", "1%"]
                done = subprocess.run(
                    ["ip", *ns, *netem], check=False, capture_output=True, text=True, timeout=20
                )
                if done.returncode != 0:
                    pytest.skip(f"no netem qdisc in this kernel: {done.stderr.strip()}")
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True, timeout=20)


def _spawn(namespace: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "qkdd", "run", "--config", str(config)]
    with log.open("ab") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=sink)


@pytest.mark.timeout(300)
def test_two_hosts_store_matching_keys(tmp_path: Path, namespaces: dict[str, str]) -> None:
    alice_config, bob_config = demo.write_configs(tmp_path, 3, SIM)
    bob_config.write_text(
        bob_config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "{ADDRESSES["bob"]}:0"')
    )
    bob = _spawn(namespaces["bob"], bob_config, tmp_path / "bob.log")
    alice = None
    try:
        address = demo.wait_for_listen_address(tmp_path / "bob", bob)
        assert address.startswith(ADDRESSES["bob"] + ":")
        alice_config.write_text(
            alice_config.read_text().replace('peer = "127.0.0.1:0"', f'peer = "{address}"')
        )
        alice = _spawn(namespaces["alice"], alice_config, tmp_path / "alice.log")
        assert alice.wait(240) == 0 and bob.wait(60) == 0
    finally:
        for process in (alice, bob):
            if process is not None and process.poll() is None:
                process.kill()
    result = demo.compare_stores(tmp_path, 0.0)
    assert result.keys_match and result.alice_keys > 0
    assert len([r for r in result.rounds if not r["aborted"]]) == 3
