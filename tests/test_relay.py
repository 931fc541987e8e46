"""The delay relay of `qkdd bench e2e --rtt`: bytes arrive in order, whole, and late by the delay."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest

from qkdd.cli import main
from qkdd.relay import DelayRelay


@pytest.mark.timeout(30)
def test_the_relay_delays_each_way_and_keeps_order_and_end_of_stream() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def echo() -> None:
            connection, _ = server.accept()
            with connection:
                while data := connection.recv(65536):
                    connection.sendall(data)

        threading.Thread(target=echo, daemon=True).start()
        with DelayRelay(f"127.0.0.1:{port}", 0.05) as relay:
            host, _, relay_port = relay.address.rpartition(":")
            with socket.create_connection((host, int(relay_port)), timeout=10) as client:
                payload = bytes(range(256)) * 4096  # 1 MiB, many chunks
                started = time.monotonic()
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)
                received = bytearray()
                while data := client.recv(65536):
                    received += data
                elapsed = time.monotonic() - started
    assert received == payload
    assert 0.1 <= elapsed < 5.0  # one round trip through the relay: twice the one-way delay


@pytest.mark.timeout(30)
def test_a_relay_started_before_its_target_listens_serves_once_it_does() -> None:
    # the demo starts Bob, Alice and the relay at once: Alice may come before Bob listens
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here yet
    with DelayRelay(f"127.0.0.1:{port}", 0.0) as relay:
        host, _, relay_port = relay.address.rpartition(":")
        with socket.create_connection((host, int(relay_port)), timeout=10) as early:
            assert early.recv(1) == b""  # refused upstream: closed, like a direct connection would be
        with (
            socket.create_server(("127.0.0.1", port)) as server,
            socket.create_connection((host, int(relay_port)), timeout=10) as client,
        ):
            server.settimeout(10)
            connection, _ = server.accept()  # the relay connected upstream: it still serves
            with connection:
                client.sendall(b"hello")
                assert connection.recv(5) == b"hello"


def _our_sockets_on(*ports: int) -> int:
    """How many of this process's open TCP sockets have one of ``ports`` at either end."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            ends = {int(address.split(":")[1], 16) for address in fields[1:3]}
            count += fields[9] in inodes and not ends.isdisjoint(ports)
    return count


@pytest.mark.timeout(30)
def test_the_relay_closes_every_socket_it_opened() -> None:
    # it once left each connection's two sockets to the garbage collector: a ResourceWarning that
    # pytest's unraisable-exception hook then pinned on whichever later test happened to collect them
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(10)
        with DelayRelay(f"127.0.0.1:{port}", 0.01) as relay:
            host, _, relay_port = relay.address.rpartition(":")
            for _ in range(3):  # connections that end on their own: the client hangs up
                with socket.create_connection((host, int(relay_port)), timeout=10) as client:
                    connection, _ = server.accept()
                    with connection:
                        client.sendall(b"ping")
                        assert connection.recv(4) == b"ping"
            # one still open when the relay closes: close() ends it, the client reads the end
            live = socket.create_connection((host, int(relay_port)), timeout=10)
            connection, _ = server.accept()
        with live, connection:
            assert live.recv(1) == b""
            assert connection.recv(1) == b""
        relay_port_number = int(relay_port)
        deadline = time.monotonic() + 10
        while _our_sockets_on(port, relay_port_number) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _our_sockets_on(port, relay_port_number) == 1  # the test's own listening server alone


def test_bench_rejects_a_bad_round_trip_list(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "e2e", "--rtt", "ten"])
    assert exit_info.value.code == 2
    assert "not a comma-separated list of milliseconds" in capsys.readouterr().err
