"""The systemd notification protocol (sd_notify(3)), the part qkdd needs: READY, STOPPING, WATCHDOG, STATUS.

Messages go as one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the
abstract namespace). Without that variable every call does nothing, so the daemon runs the same under
systemd, in a terminal and in tests.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        watchdog = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        applies = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_seconds: float | None = (
            int(watchdog) / 1e6 if watchdog.isdigit() and int(watchdog) > 0 and applies else None
        )

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields; returns whether a datagram was sent."""
        if not self._address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), self._address)
            except OSError:
                return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")
