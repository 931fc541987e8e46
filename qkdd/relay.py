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
from types import TracebackType


class DelayRelay:
    """Listens on 127.0.0.1; every connection is relayed to ``target`` ("host:port") with ``one_way``
    seconds of delay each way (the round trip adds twice that)."""

    def __init__(self, target: str, one_way: float) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.one_way = one_way
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

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
                # the relay goes on accepting (it used to stop, leaving later clients unanswered)
                client.close()
                continue
            upstream.settimeout(None)
            for source, sink in ((client, upstream), (upstream, client)):
                chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(target=self._read, args=(source, chunks), daemon=True).start()
                threading.Thread(target=self._write, args=(sink, chunks), daemon=True).start()

    def _read(self, source: socket.socket, chunks: queue.Queue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                chunks.put((time.monotonic() + self.one_way, data))
        chunks.put((time.monotonic() + self.one_way, b""))  # end of stream, delayed like the data

    @staticmethod
    def _write(sink: socket.socket, chunks: queue.Queue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)

    def close(self) -> None:
        self._server.close()

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
