"""A TCP relay that holds every byte back by a fixed time in each direction: ``qkdd bench e2e`` uses it
to measure the secret-key throughput against the round-trip time on one machine, without root (netem
needs CAP_NET_ADMIN and a kernel that has it). Bytes keep their order and nothing is lost; a chunk's
delay runs from when the relay read it, so data in flight overlaps like on a real link."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType


class DelayRelay:
    """Listens on 127.0.0.1; every connection is relayed to ``target`` ("host:port") with ``one_way``
    seconds of delay each way (the round trip adds twice that). The relay owns every socket it opens: the
    last of a connection's four threads closes its pair, and :meth:`close` ends every connection."""

    def __init__(self, target: str, one_way: float) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.one_way = one_way
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # the relay was closed
                return
            try:
                upstream = socket.create_connection(self.target, timeout=30)
            except OSError:
                # the target does not listen (yet): this connection fails like a direct one would, and
                # the relay goes on accepting (stopping would leave later clients unanswered)
                client.close()
                continue
            upstream.settimeout(None)
            for each in (client, upstream):  # no Nagle wait on top of the delay (the daemons set it too)
                each.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
            self._relay(client, upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        """Starts a reader and a writer per direction; the last of the four to end closes both sockets."""
        left = [4]

        def run(work: Callable[..., None], *args: object) -> None:
            try:
                work(*args)
            finally:
                with self._lock:
                    left[0] -= 1
                    last = not left[0]
                    if last:
                        self._open.difference_update((client, upstream))
                if last:
                    client.close()
                    upstream.close()

        for source, sink in ((client, upstream), (upstream, client)):
            chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
            threading.Thread(target=run, args=(self._read, source, chunks), daemon=True).start()
            threading.Thread(target=run, args=(self._write, sink, source, chunks), daemon=True).start()

    def _read(self, source: socket.socket, chunks: queue.Queue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                chunks.put((time.monotonic() + self.one_way, data))
        chunks.put((time.monotonic() + self.one_way, b""))  # end of stream, delayed like the data

    @staticmethod
    def _write(sink: socket.socket, source: socket.socket, chunks: queue.Queue[tuple[float, bytes]]) -> None:
        try:
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except OSError:  # the sink is gone: stop reading what can no longer be delivered
            with contextlib.suppress(OSError):
                source.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        """Stops accepting and ends every relayed connection; returns once nothing is accepted anymore
        (each connection's threads close its sockets as they wake)."""
        with self._lock:
            self._closed = True
            live = list(self._open)
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept thread (closing alone does not)
        self._acceptor.join(timeout=5)
        self._server.close()
        for each in live:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
