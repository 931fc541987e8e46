"""The delay relay of `qkdd bench e2e --rtt`: bytes arrive in order, whole, and late by the delay."""

from __future__ import annotations

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


def test_bench_rejects_a_bad_round_trip_list(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "e2e", "--rtt", "ten"])
    assert exit_info.value.code == 2
    assert "not a comma-separated list of milliseconds" in capsys.readouterr().err
