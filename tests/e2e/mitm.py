"""A man in the middle between a real Alice and a real Bob (issue 21 §3), and what it saw.

Theory of operation
-------------------
:class:`Proxy` listens on 127.0.0.1 (Alice's ``network.peer`` points at it) and opens one connection to
Bob for every connection Alice makes. Two threads per connection relay frames (4-byte big-endian length +
msgpack envelope ``{seq, body, mac, tag}``), parsing each one. Every frame passes through the armed
:class:`Attack`, if any: it fires on the first frame of its sender and message type and drops,
duplicates, reorders, replays (a frame of an earlier connection), rewrites a body field or the envelope's
transcript tag, or cuts the connection after the frame. Every other frame goes through unchanged.

A *gate* decides which connections of Alice reach Bob: open (all), closed (accepted and closed at once:
Alice sees a lost connection and retries), or a number of connections still allowed. The tests close it
to bring both daemons to rest and read their stores, and allow exactly one connection for an attack.

:class:`Ledger` keeps what the invariants need from the frames the daemons *sent* (before any attack):
for every frame carrying a Wegman–Carter transcript tag, the transcript it covers (qkdp-v2.md §16: the
frames of that direction since the round began or since its previous tag, each as 8-byte seq, 4-byte body
length, body), every handshake key position a hello or resolve named (§17), and every 16-byte ``auth``
proof (qkdp/1 made those with a one-time pad, over the hash of both hellos). Given the hash keys and the
reserve stream read from a store afterwards, :meth:`Ledger.pad_uses` recovers the reserve position of
the pad of each tag (pad = tag − hash mod p): I1 is then checked on what went over the wire.

Sockets: only 127.0.0.1; every socket has a timeout and is closed by :meth:`Proxy.close`; every loop is
bounded by a stop flag checked at least every :data:`POLL` seconds. Thread failures are kept and raised
by :meth:`Proxy.check`, never lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from qkdd.auth import wegman_carter as wc

POLL = 0.1
"""Seconds between checks of a stop flag in every loop."""
SEND_TIMEOUT = 10.0
LENGTH = struct.Struct(">I")
ROLES = ("alice", "bob")


def peer_of(role: str) -> str:
    return "bob" if role == "alice" else "alice"


def frame_bytes(envelope: dict[str, Any]) -> bytes:
    payload: bytes = msgpack.packb(envelope, use_bin_type=True)
    return LENGTH.pack(len(payload)) + payload


@dataclasses.dataclass
class Frame:
    """One frame as its sender wrote it."""

    sender: str
    connection: int
    raw: bytes
    envelope: dict[str, Any]
    body: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.body.get("type"))

    @property
    def seq(self) -> int:
        return int(self.envelope["seq"])

    def with_body(self, **fields: Any) -> bytes:
        """The frame with body fields replaced; seq, MAC and tag kept (so a MAC no longer verifies)."""
        body = {**self.body, **fields}
        return frame_bytes({**self.envelope, "body": msgpack.packb(body, use_bin_type=True)})

    def with_tag(self, tag: bytes) -> bytes:
        return frame_bytes({**self.envelope, "tag": tag})


def parse(sender: str, connection: int, raw: bytes) -> Frame:
    envelope = msgpack.unpackb(raw[LENGTH.size :], raw=False)
    body = msgpack.unpackb(envelope["body"], raw=False)
    return Frame(sender, connection, raw, envelope, body if isinstance(body, dict) else {})


def flipped(value: Any) -> Any:
    """A different value of the same type (what an attacker rewriting one field would send)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1 if value < 2**62 else value - 1
    if isinstance(value, float):
        return value / 2 if value else 0.25
    if isinstance(value, bytes):
        return bytes([value[0] ^ 1]) + value[1:] if value else b"\x00"
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] if value else [0]
    raise TypeError(f"cannot rewrite a {type(value).__name__}")


@dataclasses.dataclass
class Attack:
    """One attack on the first frame ``sender`` sends of type ``name`` after it is armed.

    kind: ``drop``, ``drop-cut`` (dropped, and the connection cut), ``duplicate``, ``reorder`` (held
    back until the sender's next frame has gone), ``replay`` (the same message of an earlier connection
    instead), ``modify`` (body ``field`` set to ``value``, or to :func:`flipped` of it; added if the
    message lacks it), ``tag`` (a bit of the envelope's transcript tag flipped: the frame MAC does not
    cover it) or ``cut`` (delivered, then the connection is cut). ``times``: how many
    frames it fires on (each on a connection of its own for ``cut``).
    """

    sender: str
    name: str
    kind: str
    field: str | None = None
    value: Any = None
    times: int = 1
    fired: int = 0
    fired_at: float | None = None  # time.monotonic() of the first firing
    held: bytes | None = None

    def __str__(self) -> str:
        what = f"{self.kind} {self.field}" if self.field else self.kind
        return f"{what} {self.sender}'s {self.name}"


class Connection:
    """One connection of Alice, relayed to Bob."""

    def __init__(self, index: int, client: socket.socket, upstream: socket.socket) -> None:
        self.index = index
        self.sockets = {"alice": client, "bob": upstream}  # keyed by the side the socket talks to
        self.opened = time.monotonic()
        self.names: list[tuple[str, str, float]] = []  # (sender, message type, when) of every frame read
        self.last: dict[tuple[str, str], bytes] = {}  # the last frame of each (sender, type)
        self.delivered_hellos: dict[str, bytes] = {}  # hello body as delivered to its receiver
        self.sent_hellos: dict[str, bytes] = {}
        self.cut = threading.Event()
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._ended = 0

    def close(self) -> None:
        self.cut.set()
        for sock in self.sockets.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _direction_ended(self) -> None:
        with self._lock:
            self._ended += 1
            if self._ended == 2:
                for sock in self.sockets.values():
                    sock.close()
                self.done.set()


class Ledger:
    """What the invariants need from the frames the daemons sent, across every connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # each round's transcript of each direction on each connection (rounds may be in flight together)
        self._transcripts: dict[tuple[int, str, object], list[bytes] | None] = {}
        self.tagged: list[tuple[str, bytes, bytes]] = []  # (sender, transcript, tag) not yet located
        self.proofs: list[tuple[str, bytes, bytes]] = []  # (sender, hash of both hellos, 16-byte proof)
        self.handshake_keys: set[int] = set()
        self.uses: list[tuple[int, str, bytes]] = []  # (pad position, sender, digest of the message)

    def record(self, connection: Connection, frame: Frame) -> None:
        with self._lock:
            key = (connection.index, frame.sender, frame.body.get("round"))
            start = "round_start" if frame.sender == "alice" else "sift_announce"
            if frame.name == start:
                self._transcripts[key] = []
            parts = self._transcripts.get(key)
            body = frame.envelope["body"]
            if (
                parts is not None
                and frame.name not in ("keepalive", "error")
                and not frame.name.startswith("key")
            ):
                parts.append(frame.seq.to_bytes(8, "big") + len(body).to_bytes(4, "big") + body)
            tag = frame.envelope.get("tag") or b""
            if tag:
                if parts is None:
                    raise AssertionError(f"{frame.sender}'s {frame.name} carries a tag outside a round")
                self.tagged.append((frame.sender, b"".join(parts), bytes(tag)))
                self._transcripts[key] = []
            if frame.name == "abort":
                self._transcripts[key] = None
            if frame.name == "hello":
                keys = frame.body.get("keys")
                if isinstance(keys, list):
                    self.handshake_keys.update(k for k in keys if isinstance(k, int) and k >= 128)
            if frame.name == "resolve":
                keys = frame.body.get("key_next")
                if isinstance(keys, list):
                    self.handshake_keys.update(k for k in keys if isinstance(k, int) and k >= 128)
            if frame.name == "auth" and len(frame.body.get("proof", b"")) == wc.TAG_BYTES:
                # a qkdp/1 reserve proof: a Wegman–Carter tag over T with a one-time pad
                own, other = (
                    connection.sent_hellos.get(frame.sender),
                    connection.delivered_hellos.get(frame.sender),
                )
                if own is not None and other is not None:
                    alice, bob = (own, other) if frame.sender == "alice" else (other, own)
                    transcript = hashlib.sha256(
                        hashlib.sha256(alice).digest() + hashlib.sha256(bob).digest()
                    ).digest()
                    self.proofs.append((frame.sender, transcript, bytes(frame.body["proof"])))

    def pad_uses(self, hash_keys: list[int], stream: bytes, bits: int) -> list[tuple[int, str, bytes]]:
        """Locate the pad of every tag recorded since the last call in the reserve ``stream`` (packed
        bits, ``bits`` of them); returns every use located so far: (position, sender, message digest).

        Raises:
            AssertionError: a tag whose pad is nowhere in the reserve.
        """
        with self._lock:
            pending = [(s, m, t, "tag") for s, m, t in self.tagged] + [
                (s, m, t, "proof") for s, m, t in self.proofs
            ]
            self.tagged, self.proofs = [], []
        if not pending:
            return list(self.uses)
        values = pad_values(stream, bits)
        hashes = [wc.PolynomialHash(k) for k in hash_keys]
        missing = []
        for sender, message, tag, what in pending:
            first, second = (
                (int.from_bytes(tag[8 * j : 8 * j + 8], "big") - h(message)) % wc.PRIME
                for j, h in enumerate(hashes)
            )
            found = [
                int(q)
                for q in np.flatnonzero(values[: max(len(values) - wc.PAD_BITS, 0)] == np.uint64(first))
                if q >= 128 and int(values[q + wc.PAD_BITS]) == second
            ]
            if not found:
                missing.append(f"{sender}'s {what} over {len(message)} bytes")
                continue
            self.uses.append((found[0], sender, hashlib.sha256(message).digest()))
        assert not missing, f"tags whose one-time pad is not in the reserve: {missing}"
        return list(self.uses)


def pad_values(stream: bytes, bits: int) -> np.ndarray:
    """For every reserve position q, the 61-bit value of bits [q, q + 61) reduced mod p: the pad at q is
    (values[q], values[q + 61])."""
    array = np.unpackbits(np.frombuffer(stream, dtype=np.uint8), count=bits).astype(np.uint64)
    count = max(bits - wc.PAD_BITS + 1, 0)
    values = np.zeros(count, dtype=np.uint64)
    for i in range(wc.PAD_BITS):
        values = (values << np.uint64(1)) | array[i : i + count]
    return values % np.uint64(wc.PRIME)


class Proxy:
    """The man in the middle: Alice connects here; each connection is relayed to ``bob``."""

    def __init__(self, bob: tuple[str, int]) -> None:
        self.bob = bob
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(POLL)
        self.port = int(self.server.getsockname()[1])
        self.ledger = Ledger()
        self.connections: list[Connection] = []
        self.errors: list[BaseException] = []
        self.attack: Attack | None = None
        self._allowed: int | None = None  # None: gate open; else connections still allowed
        self._accepting = 0  # connections let through and not yet relayed
        self.attempts: list[float] = []  # when Alice's connections came in, refused ones included
        self._earlier: dict[tuple[str, str], bytes] = {}  # last frame per (sender, type) of ended connections
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._guarded, args=(self._accept,), daemon=True)]
        self._threads[0].start()

    # -- control

    def open_gate(self) -> None:
        with self._lock:
            self._allowed = None

    def allow(self, connections: int) -> None:
        """Let exactly this many more connections through, then refuse every other."""
        with self._lock:
            self._allowed = connections

    def arm(self, attack: Attack) -> None:
        with self._lock:
            self.attack = attack

    def disarm(self) -> Attack | None:
        with self._lock:
            attack, self.attack = self.attack, None
            return attack

    def live(self) -> list[Connection]:
        return [c for c in self.connections if not c.done.is_set()]

    def quiet(self) -> bool:
        """No connection is relayed or about to be."""
        with self._lock:
            return not self._accepting and not self.live()

    def last_frame(self, sender: str, name: str) -> Frame | None:
        """The last ``name`` that ``sender`` sent on a connection that has ended."""
        with self._lock:
            raw = self._earlier.get((sender, name))
        return None if raw is None else parse(sender, -1, raw)

    def cut_all(self) -> None:
        for connection in self.live():
            connection.close()

    def wait_idle(self, timeout: float) -> None:
        """Wait until every connection has ended (they end by themselves, by a cut or a daemon's close)."""
        deadline = time.monotonic() + timeout
        for connection in list(self.connections):
            left = deadline - time.monotonic()
            assert connection.done.wait(max(left, 0)), f"connection {connection.index} did not end"

    def check(self) -> None:
        """Raise (once) what failed in the proxy's threads since the last check."""
        errors, self.errors = self.errors, []
        assert not errors, f"the proxy failed: {errors!r}"

    def close(self) -> None:
        self._stop.set()
        self.cut_all()
        for thread in self._threads:
            thread.join(SEND_TIMEOUT + 5)
        self.server.close()
        for connection in self.connections:
            for sock in connection.sockets.values():
                sock.close()

    # -- threads

    def _guarded(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except BaseException as error:  # kept for check(): a thread's failure must not go unseen
            self.errors.append(error)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            with self._lock:
                self.attempts.append(time.monotonic())
                refuse = self._allowed is not None and self._allowed <= 0
                if self._allowed is not None and not refuse:
                    self._allowed -= 1
                self._accepting += not refuse
            if refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.bob, timeout=SEND_TIMEOUT)
            except OSError:  # Bob is not listening (restarting): Alice sees a lost connection
                client.close()
                with self._lock:
                    self._accepting -= 1
                continue
            client.settimeout(POLL)
            upstream.settimeout(POLL)
            connection = Connection(len(self.connections), client, upstream)
            with self._lock:
                self.connections.append(connection)
                self._accepting -= 1
            for sender in ROLES:
                thread = threading.Thread(
                    target=self._guarded, args=(self._relay, connection, sender), daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _relay(self, connection: Connection, sender: str) -> None:
        source, sink = connection.sockets[sender], connection.sockets[peer_of(sender)]
        buffer = bytearray()
        try:
            while not connection.cut.is_set() and not self._stop.is_set():
                try:
                    data = source.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                buffer += data
                for raw in _split(buffer):
                    if not self._forward(connection, sender, raw, sink):
                        return
        finally:
            connection.close()  # either side's end ends the connection
            with self._lock:
                self._earlier.update(connection.last)
                connection.last = {}
            connection._direction_ended()

    def _forward(self, connection: Connection, sender: str, raw: bytes, sink: socket.socket) -> bool:
        frame = parse(sender, connection.index, raw)
        connection.names.append((sender, frame.name, time.monotonic()))
        if frame.name == "hello":
            connection.sent_hellos[sender] = frame.envelope["body"]
        self.ledger.record(connection, frame)
        with self._lock:
            connection.last[(sender, frame.name)] = raw
            attack = self.attack
            fire = (
                attack is not None
                and attack.fired < attack.times
                and (attack.sender, attack.name) == (sender, frame.name)
            )
            if fire:
                assert attack is not None
                attack.fired += 1
                if attack.fired_at is None:
                    attack.fired_at = time.monotonic()
            earlier = self._earlier.get((sender, frame.name))
        out: list[bytes] = [raw]
        cut = False
        if attack is not None and attack.held is not None and attack.sender == sender:
            out, attack.held = [raw, attack.held], None
        if fire:
            assert attack is not None
            match attack.kind:
                case "drop":
                    out = []
                case "drop-cut":
                    out, cut = [], True
                case "duplicate":
                    out = [raw, raw]
                case "reorder":
                    attack.held, out = raw, []
                case "replay":
                    assert earlier is not None, f"no {sender}'s {frame.name} of an earlier connection"
                    out = [earlier]
                case "modify":  # a field the message lacks is added: the attacker injects it
                    assert attack.field is not None
                    value = attack.value
                    if value is None:
                        assert attack.field in frame.body, f"{frame.name} has no field {attack.field}"
                        value = flipped(frame.body[attack.field])
                    out = [frame.with_body(**{attack.field: value})]
                case "tag":
                    tag = frame.envelope.get("tag") or b""
                    assert tag, f"{sender}'s {frame.name} carries no transcript tag"
                    out = [frame.with_tag(flipped(bytes(tag)))]
                case "cut":
                    cut = True
                case _:
                    raise AssertionError(f"unknown attack {attack.kind}")
        for data in out:
            delivered = parse(sender, connection.index, data)
            if delivered.name == "hello":
                connection.delivered_hellos[peer_of(sender)] = delivered.envelope["body"]
            sink.settimeout(SEND_TIMEOUT)
            try:
                sink.sendall(data)
            except OSError:
                return False
            finally:
                sink.settimeout(POLL)
        if cut:
            connection.close()
            return False
        return True


def _split(buffer: bytearray) -> list[bytes]:
    """Take every complete frame (length prefix included) off the front of ``buffer``."""
    out = []
    while len(buffer) >= LENGTH.size:
        (length,) = LENGTH.unpack_from(buffer)
        if len(buffer) < LENGTH.size + length:
            break
        out.append(bytes(buffer[: LENGTH.size + length]))
        del buffer[: LENGTH.size + length]
    return out
