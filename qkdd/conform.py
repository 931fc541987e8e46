"""``qkdd conform``: play one role of qkdp/1 against any implementation and check that it meets the
numbered requirements of protocol/qkdp-v2.md §21.

Each scenario opens its own connection (as Alice we connect to ``--peer``; as Bob we listen on
``--peer`` and the implementation under test connects to us), drives our engine, or deliberately breaks
the protocol, and judges what the peer does. Our side keeps its state in a temporary folder, so the
peer's key store sees ordinary rounds and aborted ones, never a mismatched key.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from qkdd import engine as engine_mod
from qkdd import policy, spec, wire
from qkdd.bits import SystemRandom
from qkdd.config import Config
from qkdd.daemon import credentials, engine_settings
from qkdd.delivery.channel import KeyChannel, is_key_message
from qkdd.delivery.ledger import make_key_id
from qkdd.engine import KEY_CHANNEL_CAPABILITY, SUPPORTED_VERSIONS, Engine, State
from qkdd.errors import QkddError, RemoteProtocolError
from qkdd.links import AliceLink, BobLink, open_link
from qkdd.stages.sifting import Detections
from qkdd.store import KeyStore

#: requirement ID -> what it says; protocol/qkdp-v2.md §21 lists the same (tests/test_conform.py)
REQUIREMENTS = {
    "QKDP-10.1": "With a protocol version in common, the handshake completes at the highest one.",
    "QKDP-10.2": "With no version in common, the peer sends error version-mismatch listing its versions, "
    "then closes.",
    "QKDP-10.3": "A hello of another protocol version, with that version's fields, gets error "
    "version-mismatch, not a complaint about its fields.",
    "QKDP-22.1": "A hello whose handshake keys were rewritten in transit fails the handshake and changes "
    "nothing: the next honest connection completes and runs a round.",
    "QKDP-22.2": "A key-channel frame before the handshake is over is refused with an error frame; it "
    "does not stall the connection.",
    "QKDP-9.1": "A frame length above the maximum is refused (bad-frame) before the body is buffered.",
    "QKDP-9.2": "A zero frame length is refused (bad-frame).",
    "QKDP-9.3": "A payload that is not msgpack, or not a map, is refused (bad-frame).",
    "QKDP-9.4": "An unknown message type is refused (bad-message).",
    "QKDP-9.5": "A missing, extra or ill-typed field is refused (bad-message).",
    "QKDP-9.6": "A value outside the bounds of qkdp-v2.toml is refused (bad-message).",
    "QKDP-9.7": "A stream that ends inside a frame closes the connection.",
    "QKDP-12.1": "After the handshake, a frame whose MAC does not verify is refused (bad-mac).",
    "QKDP-12.2": "A replayed frame (a sequence number already seen) is refused (bad-seq).",
    "QKDP-15.1": "A message not allowed in the receiver's state is refused (bad-state).",
    "QKDP-13.1": "Honest rounds commit at both sides with keys equal per confirmation.",
    "QKDP-4.1": "A round whose error rate exceeds the threshold aborts and stores no key; the link goes on.",
    "QKDP-11.1": "A silent peer is dropped with error timeout within the state's timeout.",
    "QKDP-13.2": "An abort in any round state where the spec allows it drops the round at both sides; the "
    "next round commits.",
    "QKDP-13.3": "A Bob whose hello lists keepalive takes keepalive in IDLE and stays there; the next round "
    "commits.",
    "QKDP-19.1": "A peer that offers the key channel opens it after the handshake with keys_hello, the "
    "channel's frame 0 under the channel's MAC key.",
    "QKDP-19.2": "A key_notice that is not the next entry of the sender's log is refused (bad-message).",
    "QKDP-19.3": "A key-channel frame whose MAC does not verify is refused (bad-mac).",
}

HONEST_ROUNDS = 2
NO_KEY_CHANNEL = f"the peer does not offer {KEY_CHANNEL_CAPABILITY}: nothing to check"
"""The result of a key-channel check (§19) against a peer that does not offer the channel."""
READ_TIMEOUT = 30.0


@dataclass
class Result:
    requirement: str
    scenario: str
    passed: bool
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "text": REQUIREMENTS[self.requirement]}


class Failed(Exception):
    """The peer did not do what the requirement asks."""


@dataclass
class Connection:
    """One connection to the implementation under test, with an engine of ours on it."""

    sock: socket.socket
    engine: Engine
    store: KeyStore
    link: Any
    decoder: wire.FrameDecoder = field(default_factory=wire.FrameDecoder)
    pending: list[bytes] = field(default_factory=list)
    closed: bool = False
    sent: list[bytes] = field(default_factory=list)
    channel_macs: dict[str, Any] | None = None  # the session's frame MACs, when the key channel is on

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def act(self, actions: list[engine_mod.Action]) -> None:
        work: list[engine_mod.Compute | engine_mod.FetchFrame] = []
        for action in actions:
            match action:
                case engine_mod.Send(frame=frame):
                    self.sent.append(frame)
                    self.send(frame)
                case engine_mod.ReserveRound(round=number):
                    self.store.reserve_round(number)
                case engine_mod.RoundEnded(
                    summary=summary, disposition=disposition, blocks=blocks, reserve=r
                ):
                    if disposition == "aborted":
                        self.store.record_aborted(summary, None)
                    else:
                        self.store.store_round(summary, blocks, disposition == "pending", None, r)
                case engine_mod.CommitRound(round=number):
                    self.store.commit_round(number)
                case engine_mod.ResolvePending(committed=committed):
                    self.store.resolve(committed)
                case engine_mod.ConsumeReserve(upto=upto):
                    self.store.reserve.consume(upto)
                case engine_mod.SetHandshakeKeys(keys=keys):
                    self.store.reserve.set_handshake_keys(keys)
                case engine_mod.RetirePsk():
                    self.store.retire_psk()
                case engine_mod.Ready(channel_macs=macs):
                    self.channel_macs = macs
                case engine_mod.Compute() | engine_mod.FetchFrame():
                    work.append(action)  # done here, at once, after the frames before it
        for each in work:
            self.act(self.engine.completed(each.job, each.run(self.link)))

    def frame(self, timeout: float = READ_TIMEOUT) -> bytes | None:
        """The next frame payload from the peer, or None once it closed the connection."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            if self.closed:
                return None
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise Failed(f"nothing from the peer within {timeout:.0f} s") from None
            except OSError:
                data = b""
            if not data:
                self.closed = True
                continue
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def step(self, timeout: float = READ_TIMEOUT) -> None:
        """Feed the peer's next frame to our engine and send what it answers."""
        payload = self.frame(timeout)
        if payload is None:
            raise Failed(f"the peer closed the connection in our state {self.engine.state.value}")
        self.act(self.engine.receive_frame(payload))

    def handshake(self) -> None:
        self.act(self.engine.initiate())
        while self.engine.state not in (State.IDLE, State.CLOSED):
            self.step()

    def run_until(self, done: Callable[[], bool], timeout: float = READ_TIMEOUT) -> None:
        while not done():
            self.step(timeout)

    def error_then_close(self, timeout: float = READ_TIMEOUT) -> str:
        """Read until the peer closes; return the code of the error frame it sent (the MAC unchecked)."""
        code = None
        while (payload := self.frame(timeout)) is not None:
            with suppress(RemoteProtocolError):
                message = wire.decode_message(wire.decode_envelope(payload).body)
                if message.type == "error":
                    code = str(message["code"])
        if code is None:
            raise Failed("the peer closed the connection without an error frame")
        return code


def _flip_quarter(bits: Any, indices: Any) -> Any:
    """The bits with those of every fourth pulse index flipped: a 25% error rate."""
    return bits ^ (indices % 4 == 0).astype(np.uint8)


class _NoisyAlice:
    """Alice's link with a quarter of her bits flipped: the QBER scenario."""

    def __init__(self, link: AliceLink) -> None:
        self.link = link
        self.info = link.info

    def preparation(self, frame: int) -> Any:
        inner = self.link.preparation(frame)

        class Noisy:
            pulses = inner.pulses

            @staticmethod
            def at(indices: Any) -> Any:
                bits, bases, classes = inner.at(indices)
                return _flip_quarter(bits, indices), bases, classes

        return Noisy()


class _NoisyBob:
    """Bob's link with a quarter of his bits flipped."""

    def __init__(self, link: BobLink) -> None:
        self.link = link
        self.info = link.info

    def detections(self, frame: int) -> Detections:
        d = self.link.detections(frame)
        return dataclasses.replace(d, bits=_flip_quarter(d.bits, d.indices))


class Conformance:
    """The scenarios, each on a connection of its own."""

    def __init__(self, config: Config, role: str, peer: tuple[str, int], state_dir: Path) -> None:
        self.config = config
        self.role = role
        self.peer = peer
        # window 1: each scenario drives one round at a time, and the peer must keep to the smaller window
        self.settings = dataclasses.replace(engine_settings(config, *credentials(config)), window=1)
        self.link = open_link(config.link_backend, role, config.link_options)
        self.store = KeyStore(state_dir, config.link_id)
        self.spec = spec.load()
        self._listener: socket.socket | None = None
        if role == "bob":
            self._listener = socket.create_server(peer)

    def close(self) -> None:
        self.store.close()
        if self._listener is not None:
            self._listener.close()

    def _socket(self) -> socket.socket:
        if self._listener is None:
            return socket.create_connection(self.peer, timeout=READ_TIMEOUT)
        self._listener.settimeout(READ_TIMEOUT + self.config.timeouts.reconnect_max)
        try:
            sock, _ = self._listener.accept()
        except TimeoutError:
            raise Failed("the peer did not connect") from None
        return sock

    @contextmanager
    def connection(self, *, link: Any = None, **overrides: Any) -> Iterator[Connection]:
        settings = dataclasses.replace(self.settings, **overrides)
        link = link or self.link
        engine = Engine(self.role, settings, info=link.info, store=self.store, random=SystemRandom())
        sock = self._socket()
        try:
            yield Connection(sock, engine, self.store, link)
        finally:
            sock.close()

    # -- scenarios: each returns a detail string or raises Failed

    def scenarios(self) -> list[tuple[str, str, Callable[[], str]]]:
        out: list[tuple[str, str, Callable[[], str]]] = [
            ("QKDP-10.1", "common version", self.common_version),
            ("QKDP-10.2", "no version in common", self.no_common_version),
        ]
        out += [
            ("QKDP-10.3", "a qkdp/1 hello", self.other_version_hello),
            ("QKDP-22.1", "hello keys rewritten, then an honest connection", self.rewritten_hello_keys),
            ("QKDP-22.2", "key-channel frame before the handshake", self.early_key_frame),
        ]
        for requirement, name, raw in self._malformed():
            out.append((requirement, name, partial(self.malformed_first_frame, raw)))
        for requirement, name, body in self._malformed_bodies():
            out.append((requirement, name, partial(self.malformed_sealed, body)))
        out += [
            ("QKDP-9.7", "stream ends inside a frame", self.truncated),
            ("QKDP-12.1", "bad MAC", self.bad_mac),
            ("QKDP-12.2", "replayed frame", self.replay),
            ("QKDP-15.1", "out-of-state message", self.out_of_state),
            ("QKDP-13.1", f"{HONEST_ROUNDS} honest rounds", self.honest_rounds),
            ("QKDP-4.1", "QBER above the threshold", self.qber_abort),
            ("QKDP-11.1", "silent after our hello", self.silent),
        ]
        for state in self.spec.states[self.role]:
            if state in self.spec.round_states and self.spec.allowed(self.role, state, "abort"):
                out.append(("QKDP-13.2", f"abort in {state}", partial(self.abort_in, state)))
        out += [
            ("QKDP-13.3", "keepalive in IDLE", self.keepalive),
            ("QKDP-19.1", "key channel opens", self.key_channel_opens),
            ("QKDP-19.2", "key_notice out of order", self.key_notice_out_of_order),
            ("QKDP-19.3", "key-channel frame with a bad MAC", self.key_frame_bad_mac),
        ]
        return out

    def run(self, report: Callable[[Result], None]) -> list[Result]:
        results = []
        for requirement, name, scenario in self.scenarios():
            try:
                result = Result(requirement, name, True, scenario())
            except Failed as failure:
                result = Result(requirement, name, False, str(failure))
            except (OSError, RemoteProtocolError, QkddError, ValueError) as error:
                result = Result(requirement, name, False, f"{type(error).__name__}: {error}")
            results.append(result)
            report(result)
        return results

    def common_version(self) -> str:
        ours = SUPPORTED_VERSIONS[-1]
        with self.connection(versions=(ours, 7)) as c:
            c.handshake()
            if c.engine.version != ours:
                raise Failed(f"negotiated version {c.engine.version}, expected {ours}")
            return f"handshake completed at version {ours} (we offered {ours} and 7)"

    def no_common_version(self) -> str:
        with self.connection(versions=(200,)) as c:
            c.act(c.engine.initiate())
            while (payload := c.frame()) is not None:
                message = wire.decode_message(wire.decode_envelope(payload).body)
                if message.type == "error":
                    if message["code"] != "version-mismatch" or not set(SUPPORTED_VERSIONS) & set(
                        message["versions"]
                    ):
                        raise Failed(f"error {message['code']} listing {message['versions']}")
                    if c.frame() is not None:
                        raise Failed("the peer sent more after its error frame")
                    return f"error version-mismatch listing {message['versions']}"
            raise Failed("the peer closed without an error frame")

    def other_version_hello(self) -> str:
        hello = {
            "type": "hello",
            "versions": [1],
            "capabilities": ["psk", "keepalive"],
            "role": self.role,
            "link_id": self.settings.link_id,
            "nonce": bytes(32),
            "reserve_total": 0,
            "reserve_consumed": 0,
        }
        with self.connection() as c:
            c.send(wire.encode_frame(0, msgpack.packb(hello, use_bin_type=True)))
            return self._expect(c, {"version-mismatch"})

    def rewritten_hello_keys(self) -> str:
        """Our hello lists handshake keys the peer cannot hold, as a man in the middle could rewrite
        them; we cut the connection once the peer answered it. Nothing of a hello may be stored, so the
        next honest connection completes and a round commits."""
        with self.connection() as c:
            c.engine._hs.keys = policy.HandshakeKeys(1 << 40, (1 << 40) + policy.HANDSHAKE_KEY_BITS, 0)
            c.act(c.engine.initiate())
            try:
                while c.engine.state is State.HELLO:
                    c.step()
                first = f"the peer answered in {c.engine.state.value}; cut"
            except RemoteProtocolError as error:
                first = f"refused ({error.code})"
        return f"{first}; then {self.honest_rounds()}"

    def early_key_frame(self) -> str:
        body = msgpack.packb(
            {"type": "keys_hello", "kme_id": "conform", "saes": [], "serial": 0, "applied": 0},
            use_bin_type=True,
        )
        with self.connection() as c:
            c.send(wire.encode_frame(0, body, b""))
            return self._expect(c, {"bad-state", "bad-message"})

    def _malformed(self) -> list[tuple[str, str, bytes]]:
        maximum = self.spec.max_frame_bytes

        def framed(payload: bytes) -> bytes:
            return struct.pack(">I", len(payload)) + payload

        def envelope(body: bytes) -> bytes:
            return framed(msgpack.packb({"seq": 0, "body": body, "mac": b"", "tag": b""}))

        return [
            ("QKDP-9.1", "oversize frame length", struct.pack(">I", maximum + 1)),
            ("QKDP-9.2", "zero frame length", struct.pack(">I", 0)),
            ("QKDP-9.3", "payload not msgpack", framed(b"\xc1\xc1\xc1")),
            ("QKDP-9.3", "payload not a map", framed(msgpack.packb([1, 2, 3]))),
            ("QKDP-9.4", "unknown message type", envelope(msgpack.packb({"type": "teleport"}))),
        ]

    def malformed_first_frame(self, raw: bytes) -> str:
        with self.connection() as c:
            c.send(raw)
            return self._expect(c, {"bad-frame", "bad-message"})

    def _malformed_bodies(self) -> list[tuple[str, str, bytes]]:
        """Bodies sent behind a valid MAC after the handshake, in IDLE."""
        if self.role == "alice":
            good = {"type": "round_start", "round": 1 << 40, "frame": 0, "pulses": 1, "auth": "psk"}
        else:
            good = {"type": "abort", "round": 1 << 40, "reason": "conformance"}
        missing = {k: v for k, v in good.items() if k != "round"}
        return [
            ("QKDP-9.5", "missing field", msgpack.packb(missing)),
            ("QKDP-9.5", "extra field", msgpack.packb({**good, "surplus": 1})),
            ("QKDP-9.5", "ill-typed field", msgpack.packb({**good, "round": "one"})),
            ("QKDP-9.6", "value out of bounds", msgpack.packb({**good, "round": 1 << 63})),
        ]

    def malformed_sealed(self, body: bytes) -> str:
        with self.connection() as c:
            c.handshake()
            c.send(c.engine.seal(body))
            return self._expect(c, {"bad-message"})

    def truncated(self) -> str:
        with self.connection() as c:
            c.send(struct.pack(">I", 100) + b"\x85" * 10)
            c.sock.shutdown(socket.SHUT_WR)
            while c.frame() is not None:
                pass
            return "the peer closed the connection"

    def bad_mac(self) -> str:
        with self.connection() as c:
            c.handshake()
            (payload,) = wire.FrameDecoder().feed(c.engine.seal(self._idle_message()))
            sealed = wire.decode_envelope(payload)
            forged = bytes([sealed.mac[0] ^ 1]) + sealed.mac[1:]
            c.send(wire.encode_frame(sealed.seq, sealed.body, forged))
            return self._expect(c, {"bad-mac"})

    def replay(self) -> str:
        with self.connection() as c:
            c.handshake()
            c.send(c.sent[-1])  # our last frame again
            return self._expect(c, {"bad-seq"})

    def out_of_state(self) -> str:
        with self.connection() as c:
            c.handshake()
            name = "sift_answer" if self.role == "alice" else "cascade_pass"
            body = wire.encode_message(name, **_sample(self.spec, name))
            c.send(c.engine.seal(body))
            return self._expect(c, {"bad-state"})

    # -- the key channel (§19): checked only against a peer that offers it

    def _key_channel(self, c: Connection) -> tuple[KeyChannel, wire.Message] | None:
        """Handshake offering the key channel; our end of it and the peer's keys_hello, or ``None`` if
        the peer does not offer the channel."""
        c.handshake()
        if KEY_CHANNEL_CAPABILITY not in c.engine.peer_capabilities:
            return None
        if c.channel_macs is None:
            raise Failed("both hellos offered the key channel, but the handshake did not open it")
        channel = KeyChannel(self.role, c.channel_macs)
        while True:  # round frames (a peer Alice may start a round at once) are left unanswered
            payload = c.frame()
            if payload is None:
                raise Failed("the peer closed the connection instead of sending keys_hello")
            envelope = wire.decode_envelope(payload)
            message = wire.decode_message(envelope.body)
            if is_key_message(message):
                if message.type != "keys_hello":
                    raise Failed(f"the key channel's first frame is {message.type}, not keys_hello")
                try:
                    return channel, channel.receive(envelope, message)
                except RemoteProtocolError as error:
                    raise Failed(f"keys_hello refused: {error}") from None

    def _open_key_channel(self, c: Connection) -> tuple[KeyChannel, wire.Message] | None:
        """As :meth:`_key_channel`, then our keys_hello: we claim to have written exactly what the peer
        applied of our log and to have applied all of its own, so it sends nothing again."""
        opened = self._key_channel(c)
        if opened is not None:
            channel, hello = opened
            c.send(
                channel.encode(
                    "keys_hello",
                    kme_id="qkdd-conform",
                    saes=[],
                    serial=hello["applied"],
                    applied=hello["serial"],
                )
            )
        return opened

    def key_channel_opens(self) -> str:
        with self.connection(key_channel=True) as c:
            opened = self._key_channel(c)
            if opened is None:
                return NO_KEY_CHANNEL
            hello = opened[1]
            return (
                f"keys_hello from KME {hello['kme_id']!r}: its log at {hello['serial']}, "
                f"ours applied up to {hello['applied']}"
            )

    def key_notice_out_of_order(self) -> str:
        with self.connection(key_channel=True) as c:
            opened = self._open_key_channel(c)
            if opened is None:
                return NO_KEY_CHANNEL
            channel, hello = opened
            serial = hello["applied"] + 2  # the next entry would be applied + 1
            fields = {**_sample(self.spec, "key_notice"), "serial": serial}
            fields["key_ids"] = uuid.UUID(make_key_id(self.role, serial, 0)).bytes
            c.send(channel.encode("key_notice", **fields))
            return self._expect(c, {"bad-message"})

    def key_frame_bad_mac(self) -> str:
        with self.connection(key_channel=True) as c:
            opened = self._open_key_channel(c)
            if opened is None:
                return NO_KEY_CHANNEL
            channel = opened[0]
            name = "key_lease" if self.role == "alice" else "key_notice"
            (payload,) = wire.FrameDecoder().feed(channel.encode(name, **_sample(self.spec, name)))
            sealed = wire.decode_envelope(payload)
            forged = bytes([sealed.mac[0] ^ 1]) + sealed.mac[1:]
            c.send(wire.encode_frame(sealed.seq, sealed.body, forged))
            return self._expect(c, {"bad-mac"})

    def _idle_message(self) -> bytes:
        return wire.encode_message("abort", round=1 << 40, reason="conformance")

    def _rounds(self, c: Connection, count: int) -> list[dict[str, Any]]:
        """Run ``count`` rounds on a connection past its handshake; the summaries of our side."""
        before = len(self.store.rounds())
        for _ in range(count):
            self._open_round(c)
            c.run_until(lambda: c.engine.state is State.IDLE)
        return self.store.rounds()[before:]

    def _open_round(self, c: Connection) -> None:
        """As Alice start a round; as Bob wait until the peer's round_start opens one (stale frames of an
        aborted round may come first)."""
        if self.role == "alice":
            c.act(c.engine.start_round())
        else:
            c.run_until(lambda: c.engine.round_number is not None)

    def honest_rounds(self) -> str:
        with self.connection() as c:
            c.handshake()
            rounds = self._rounds(c, HONEST_ROUNDS)
        states = [r["state"] for r in rounds]
        if states != ["committed"] * HONEST_ROUNDS:
            raise Failed(f"rounds ended {states}: {[r['reason'] for r in rounds]}")
        return f"rounds {[r['round'] for r in rounds]} committed, confirmation tags matched"

    def keepalive(self) -> str:
        if self.role == "bob":
            return "nothing to check as Bob: an Alice sends keepalive only while she starts no round"
        with self.connection() as c:
            c.handshake()
            if not c.engine.peer_takes_keepalive:
                return "the peer does not list keepalive: nothing to check"
            for _ in range(3):
                c.act(c.engine.keepalive())
            (after,) = self._rounds(c, 1)
        if after["state"] != "committed":
            raise Failed(f"the round after three keepalives ended {after['state']}: {after['reason']}")
        return f"three keepalives in IDLE, then round {after['round']} committed"

    def qber_abort(self) -> str:
        noisy = _NoisyAlice(self.link) if self.role == "alice" else _NoisyBob(self.link)  # type: ignore[arg-type]
        with self.connection(link=noisy) as c:
            c.handshake()
            (noisy_round,) = self._rounds(c, 1)
        if noisy_round["state"] != "aborted" or "exceeds threshold" not in (noisy_round["reason"] or ""):
            raise Failed(f"the round at 25% errors ended {noisy_round['state']}: {noisy_round['reason']}")
        with self.connection() as c:
            c.handshake()
            (after,) = self._rounds(c, 1)
        if after["state"] != "committed":
            raise Failed(f"the next honest round ended {after['state']}: {after['reason']}")
        return f"aborted: {noisy_round['reason']}; the next round committed"

    def silent(self) -> str:
        limit = self.config.timeouts.handshake
        with self.connection() as c:
            c.act(c.engine.initiate())  # our hello, then nothing
            started = time.monotonic()
            code = c.error_then_close(limit + 10.0)
            waited = time.monotonic() - started
        if code != "timeout":
            raise Failed(f"error {code}, expected timeout")
        return f"error timeout after {waited:.1f} s (handshake timeout {limit:g} s)"

    def abort_in(self, state: str) -> str:
        with self.connection() as c:
            c.handshake()
            self._open_round(c)
            c.run_until(lambda: c.engine.state.value in (state, "IDLE"))
            if c.engine.state.value != state:
                raise Failed(f"the round ended before reaching {state}")
            number = c.engine.round_number
            c.act(c.engine.abort_round(f"conformance: abort in {state}"))
            (after,) = self._rounds(c, 1)
        if after["state"] != "committed":
            raise Failed(f"the round after the abort ended {after['state']}: {after['reason']}")
        return f"round {number} aborted in {state}; round {after['round']} committed"

    def _expect(self, c: Connection, codes: set[str]) -> str:
        code = c.error_then_close()
        if code not in codes:
            raise Failed(f"error {code}, expected {' or '.join(sorted(codes))}")
        return f"error {code}, then the connection closed"


def _sample(loaded: spec.Spec, name: str) -> dict[str, Any]:
    """Valid values for every field of a message: its minimum, or a short string."""
    values: dict[str, Any] = {}
    for f in loaded.messages[name].fields:
        values[f.name] = {
            "uint": int(f.min),
            "float": float(f.min),
            "bool": False,
            "str": (f.one_of[0] if f.one_of else ""),
            "bin": b"\x00" * (f.min_len or 0),
            "uints": [],
            "strs": [],
        }[f.type]
    return values


def main(config: Config, role: str, peer: tuple[str, int], as_json: bool) -> int:
    if config.role != role:
        raise QkddError(f"{config.role}'s config given to play {role}: pass the config of the role played")

    def report(result: Result) -> None:
        if as_json:
            print(json.dumps(result.as_json()), flush=True)
        else:
            verdict = "PASS" if result.passed else "FAIL"
            print(f"{verdict} {result.requirement:<10} {result.scenario:<28} {result.detail}", flush=True)

    with tempfile.TemporaryDirectory(prefix="qkdd-conform-") as folder:
        suite = Conformance(config, role, peer, Path(folder))
        try:
            results = suite.run(report)
        finally:
            suite.close()
    failed = [r for r in results if not r.passed]
    if not as_json:
        passed = len({r.requirement for r in results} - {r.requirement for r in failed})
        print(f"{passed} of {len(REQUIREMENTS)} requirements pass; {len(failed)} scenario(s) failed")
    return 0 if not failed and {r.requirement for r in results} == set(REQUIREMENTS) else 1
