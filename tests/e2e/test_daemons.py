"""Two `qkdd run` processes over real sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from qkdd import demo
from qkdd.daemon import read_listen_address

SIM = {"pulses_per_frame": 1 << 19, "z_probability": 0.7, "seed": 3, "single_photon": True}
pytestmark = pytest.mark.timeout(180)


def test_two_daemons_store_identical_keys(tmp_path: Path) -> None:
    result = demo.run_demo(tmp_path, 4, SIM, timeout=120)
    assert result.keys_match
    assert [r["round"] for r in result.rounds] == [0, 1, 2, 3]
    # the first rounds fill the key reserve under the PSK, the later ones authenticate from it
    assert result.rounds[0]["auth"] == "psk" and result.rounds[-1]["auth"] == "reserve"
    assert all(not r["aborted"] and r["bob_state"] == "committed" for r in result.rounds)
    assert result.secret_bits_total > 0 and result.alice_keys == result.bob_keys
    log = (tmp_path / "alice.log").read_text()
    assert "round 2 committed" in log and "key" not in log.replace("keys", "").lower().replace("secret=", "")


def test_two_daemons_with_rounds_in_flight_store_identical_keys_in_order(tmp_path: Path) -> None:
    result = demo.run_demo(tmp_path, 6, SIM, timeout=150, window=3)
    assert result.keys_match and result.secret_bits_total > 0
    assert [r["round"] for r in result.rounds] == list(range(6))
    assert all(not r["aborted"] and r["bob_state"] == "committed" for r in result.rounds)
    assert result.rounds[-1]["auth"] == "reserve"
    # rounds overlapped: some round started before the one before it ended
    spans = [(r["finished_at"] - r["seconds"], r["finished_at"]) for r in result.rounds]
    assert any(start < previous_end for (_, previous_end), (start, _) in itertools.pairwise(spans))
    finished = [r["finished_at"] for r in result.rounds]
    assert finished == sorted(finished)  # committed in order


def test_eavesdropper_on_every_pulse_aborts_every_round(tmp_path: Path) -> None:
    result = demo.run_demo(tmp_path, 2, {**SIM, "eve_fraction": 1.0}, timeout=120)
    assert result.keys_match and result.alice_keys == result.bob_keys == 0
    assert all(r["aborted"] and "exceeds threshold" in r["reason"] for r in result.rounds)


def frames(data: bytearray) -> list[bytes]:
    out = []
    while len(data) >= 4:
        (length,) = struct.unpack_from(">I", data)
        if len(data) < 4 + length:
            break
        out.append(bytes(data[: 4 + length]))
        del data[: 4 + length]
    return out


def message_type(frame: bytes) -> str:
    envelope = msgpack.unpackb(frame[4:], raw=False)
    return str(msgpack.unpackb(envelope["body"], raw=False)["type"])


class CuttingProxy:
    """Forwards frames between Alice and Bob; on the first connection, cuts it when ``cut`` says so."""

    def __init__(self, target: str, cut: Callable[[str, str, int], bool]) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.cut = cut
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        self.cut_done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=30)
            except OSError:  # Bob is gone (e.g. done): refuse Alice's reconnect like Bob would
                client.close()
                continue
            self.connections += 1
            armed = self.connections == 1
            counts = {"alice": 0, "bob": 0}
            for source, sink, sender in ((client, upstream, "alice"), (upstream, client, "bob")):
                threading.Thread(
                    target=self._pump,
                    args=(source, sink, sender, counts, armed, (client, upstream)),
                    daemon=True,
                ).start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        sender: str,
        counts: dict[str, int],
        armed: bool,
        both: tuple[socket.socket, socket.socket],
    ) -> None:
        buffer = bytearray()
        try:
            while data := source.recv(65536):
                buffer += data
                for frame in frames(buffer):
                    kind = message_type(frame)
                    counts[sender] += 1
                    if armed and not self.cut_done.is_set() and self.cut(sender, kind, counts[sender]):
                        self.cut_done.set()
                        raise OSError("cut")
                    sink.sendall(frame)
        except OSError:
            pass
        for s in both:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.server.close()


def run_with_proxy(
    tmp_path: Path, rounds: int, cut: Callable[[str, str, int], bool]
) -> tuple[demo.DemoResult, CuttingProxy]:
    alice_config, bob_config = demo.write_configs(tmp_path, rounds, SIM)
    bob = demo.spawn(bob_config, tmp_path / "bob.log")
    alice = None
    try:
        address = demo.wait_for_listen_address(tmp_path / "bob", bob)
        proxy = CuttingProxy(address, cut)
        alice_config.write_text(
            alice_config.read_text().replace('peer = "127.0.0.1:0"', f'peer = "{proxy.address}"')
        )
        alice = demo.spawn(alice_config, tmp_path / "alice.log")
        assert alice.wait(120) == 0 and bob.wait(120) == 0
    finally:
        for process in (alice, bob):
            if process is not None and process.poll() is None:
                process.kill()
    proxy.close()
    return demo.compare_stores(tmp_path, 0.0), proxy


@pytest.mark.parametrize(
    ("where", "cut"),
    [
        # mid-Cascade of the first round: both abandon it
        ("cascade", lambda sender, kind, n: sender == "alice" and kind == "cascade_parities" and n > 8),
        # Bob holds the round pending and Alice committed it, but "committed" is lost: resolved on reconnect
        ("committed", lambda sender, kind, n: sender == "alice" and kind == "committed"),
        # Bob holds the round pending, Alice never saw "commit": dropped on reconnect
        ("commit", lambda sender, kind, n: sender == "bob" and kind == "commit"),
    ],
)
def test_a_cut_connection_leaves_nothing_half_stored_and_the_link_goes_on(
    tmp_path: Path, where: str, cut: Callable[[str, str, int], bool]
) -> None:
    result, proxy = run_with_proxy(tmp_path, 2, cut)
    assert proxy.cut_done.is_set() and proxy.connections >= 2
    assert result.keys_match and result.alice_keys > 0
    committed = [r["round"] for r in result.rounds if not r["aborted"]]
    assert len(committed) == 2
    if where == "committed":
        assert 0 in committed  # Alice's commit decided it, and Bob followed on reconnect
        assert "pending rounds resolved: committed [0]" in (tmp_path / "bob.log").read_text()
    else:
        assert 0 not in committed


def test_garbage_on_bobs_port_does_not_disturb_the_link(tmp_path: Path) -> None:
    alice_config, bob_config = demo.write_configs(tmp_path, 4, {**SIM, "pulses_per_frame": 1 << 20})
    bob = demo.spawn(bob_config, tmp_path / "bob.log")
    alice = None
    try:
        address = demo.wait_for_listen_address(tmp_path / "bob", bob)
        alice_config.write_text(
            alice_config.read_text().replace('peer = "127.0.0.1:0"', f'peer = "{address}"')
        )
        alice = demo.spawn(alice_config, tmp_path / "alice.log")
        host, _, port = address.rpartition(":")
        replies = []
        for junk in (b"\xff\xff\xff\xff", b"GET / HTTP/1.1\r\n\r\n", struct.pack(">I", 3) + b"abc"):
            with socket.create_connection((host, int(port)), timeout=10) as garbage:
                garbage.sendall(junk)
                received = bytearray()
                while data := garbage.recv(65536):
                    received += data
                replies.append([message_type(f) for f in frames(received)])
        assert alice.wait(120) == 0 and bob.wait(120) == 0
    finally:
        for process in (alice, bob):
            if process is not None and process.poll() is None:
                process.kill()
    for reply in replies:
        assert reply == ["hello", "error"]
    result = demo.compare_stores(tmp_path, 0.0)
    assert result.keys_match and len([r for r in result.rounds if not r["aborted"]]) == 4


def test_sigterm_stops_a_daemon_cleanly(tmp_path: Path) -> None:
    _, bob_config = demo.write_configs(tmp_path, 0, SIM)
    bob = demo.spawn(bob_config, tmp_path / "bob.log")
    try:
        demo.wait_for_listen_address(tmp_path / "bob", bob)
        bob.send_signal(signal.SIGTERM)
        assert bob.wait(20) == 0
    finally:
        if bob.poll() is None:
            bob.kill()
    assert "stopping: SIGTERM" in (tmp_path / "bob.log").read_text()
    assert read_listen_address(tmp_path / "bob")
