"""The systemd notification helper."""

from __future__ import annotations

import socket
from pathlib import Path

from qkdd.sdnotify import Notifier


def test_disabled_without_notify_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.ready() and notifier.watchdog_seconds is None


def test_sends_datagrams(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
        assert notifier.watchdog_seconds == 2.0
        assert notifier.ready("up")
        assert server.recv(4096) == b"READY=1\nSTATUS=up"
        assert notifier.watchdog() and server.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping() and server.recv(4096) == b"STOPPING=1"


def test_watchdog_for_another_pid_is_ignored() -> None:
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_seconds is None
