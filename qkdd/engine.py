"""The qkdp/2 protocol engine of one connection, for either role (protocol/qkdp-v2.md §9–§16).

Theory of operation
-------------------
Layers, each knowing only the one below: :mod:`qkdd.wire` (framing: the only code that sees bytes) →
:mod:`qkdd.session` (sequence numbers and frame MACs) → :mod:`qkdd.handshake` (version, authentication,
the agreement on rounds and the reserve; it hands over the authenticated session) → the rounds below,
from ``round_start`` to ``committed``, with their transcripts and tags → :mod:`qkdd.policy` (pure
decisions).
States, actions and settings live in :mod:`qkdd.interface`.

Bytes in, actions out. The daemon feeds complete frame payloads to :meth:`Engine.receive_frame` and
local events to :meth:`Engine.start_round` / :meth:`Engine.abort_round`; each returns a list of
:data:`Action` to carry out *in order*: frames to send, rounds to reserve, keys to store or commit. The
engine opens no socket or file, reads no clock and draws randomness only from the source it is given.

Every transition is looked up in ``protocol/qkdp-v2.toml`` (:mod:`qkdd.spec`) *before* its handler
runs — a message the table does not allow in the current state is a ``bad-state`` error — and checked
against the table after it ran: the new state and every message sent must be ones the table lists, or
we raise :class:`LocalProtocolError`. So the engine cannot do what the spec does not say.

A :class:`RemoteProtocolError` from any layer moves the engine to CLOSED (final, as in h11) and carries
the error frame to send (``error.frame``); the round under way, if any, is dropped with nothing stored.
Key material leaves the engine only in a :class:`RoundEnded` action, after confirmation matched and
both sides computed the same secret length; Bob's copy is stored *pending* until Alice confirms that she
committed (§13).
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from qkdd import messages, policy, spec, wire
from qkdd.auth import psk as psk_auth
from qkdd.auth import wegman_carter as wc
from qkdd.bits import Bits, RandomSource, pack_bits
from qkdd.errors import LocalProtocolError, QkddError, RemoteProtocolError
from qkdd.handshake import Handshake, version_mismatch
from qkdd.interface import (
    DURABLE_ACTIONS,
    KEEPALIVE_CAPABILITY,
    KEY_CHANNEL_CAPABILITY,
    NONCE_BYTES,
    SUPPORTED_VERSIONS,
    Action,
    CommitRound,
    Compute,
    ConsumeReserve,
    EngineSettings,
    FetchFrame,
    Outcome,
    Ready,
    ReserveRound,
    ReserveView,
    ResolvePending,
    RetirePsk,
    RoundEnded,
    Send,
    SetHandshakeKeys,
    State,
    StoreView,
    persist_kind,
)
from qkdd.session import FrameSession

__all__ = [
    "DURABLE_ACTIONS",
    "KEEPALIVE_CAPABILITY",
    "KEY_CHANNEL_CAPABILITY",
    "NONCE_BYTES",
    "SUPPORTED_VERSIONS",
    "Action",
    "CommitRound",
    "Compute",
    "ConsumeReserve",
    "Engine",
    "EngineSettings",
    "FetchFrame",
    "Outcome",
    "PeerError",
    "Ready",
    "ReserveExhausted",
    "ReserveRound",
    "ReserveView",
    "ResolvePending",
    "RetirePsk",
    "RoundEnded",
    "Send",
    "SetHandshakeKeys",
    "State",
    "StoreView",
    "persist_kind",
]
from qkdd.links import LinkInfo
from qkdd.records import RoundSummary, key_blocks, key_ids
from qkdd.stages import amplify, cascade, confirm, estimation, keylength, secrecy, sifting

T = TypeVar("T")
ROUND_TAGS = 3  # amplify (Alice), commit (Bob), committed (Alice) close a reserve round's transcripts
ROUND_RESERVE_BITS = ROUND_TAGS * wc.OTP_BITS
"""One-time-pad bits a reserve-authenticated round consumes (§16)."""
_TAGGED = {"amplify", "commit", "committed"}


class ReserveExhausted(QkddError):
    """Alice cannot start a round: the reserve cannot pay for it and the PSK may not be used (§17)."""


@dataclass(frozen=True)
class _Job:
    """Work handed out in a :class:`Compute` or :class:`FetchFrame` action, until its outcome is back."""

    round: _Round
    kind: str
    needed_by: frozenset[str]  # the messages whose handling must wait for it
    apply: Callable[[Outcome], None]


_TAG_WORK = frozenset(_TAGGED | {"confirm_result"})  # the frames whose handling tags or checks a transcript


@dataclass
class _Round:
    number: int
    frame: int
    pulses: int = 0
    detections: int = 0
    sifted_bits: int = 0
    qber: float | None = None
    phase_error: float | None = None
    disclosed_bits: int = 0
    preparation: sifting.Preparation | None = None
    detected: sifting.Detections | None = None
    sifted: sifting.SiftedKey | None = None
    estimate_request: estimation.EstimateRequest | None = None
    estimate: estimation.Estimate | None = None
    key: Bits | None = None
    alice: cascade.CascadeAlice | None = None
    bob: cascade.CascadeBob | None = None
    bound: int = 0  # the key-length bound (§8), before the reserve share and whole blocks
    blocks: tuple[tuple[str, bytes], ...] = ()
    auth: str = "psk"
    reserve: tuple[bytes, int] = (b"", 0)
    # this direction's transcript since its last tag, and the peer's (§16); hashed as they grow
    sent: wc.Transcript = field(default_factory=lambda: wc.Transcript(None))
    received: wc.Transcript = field(default_factory=lambda: wc.Transcript(None))
    # the outcomes of the work handed out (Compute), by kind: "hash" (Alice's key hashed to the longest
    # output she may need, §7), "key_ids" (as many as §8's bound could allow), "blocks" (Alice's cut key),
    # "amplification" (Bob's prepared transform)
    results: dict[str, Outcome] = field(default_factory=dict)
    seed: Bits | None = None  # Alice: the seed for any output length (§7)
    output: tuple[int, int] | None = None  # Alice: output and reserve bits, once amplify is out
    pending: bool = False  # Bob: stored as pending, until Alice's committed or the next resolve (§13)


# ------------------------------------------------------------------------------------------- engine


class Engine:
    """One connection's protocol state machine, for ``role`` ``"alice"`` or ``"bob"``."""

    def __init__(
        self,
        role: str,
        settings: EngineSettings,
        *,
        info: LinkInfo,
        store: StoreView,
        random: RandomSource,
    ) -> None:
        if role not in spec.ROLES:
            raise LocalProtocolError(f"unknown role {role!r}")
        self.role = role
        self.peer_role = "bob" if role == "alice" else "alice"
        self.settings = settings
        self._spec = spec.load()
        self._info = info
        self._store = store
        self._random = random
        self.state = State.HELLO
        self._wc: wc.Mac | None = None
        self._frame = wire.Envelope(0, b"", b"")
        self._last_qber: float | None = None  # the previous round's exact Z error rate (Cascade's guess)
        self._frames = FrameSession(role)  # §9, §12: sequence numbers and frame MACs
        # §10-§13: the handshake, until it hands over the authenticated session (version, method, MACs,
        # reserve position, next round); its sends go through ours (sequence numbers, MACs)
        self._hs = Handshake(
            role, settings, store, random, send=self._send, act=self._act, macs=self._frames.macs
        )
        self._round: _Round | None = None
        self._jobs: dict[int, _Job] = {}  # handed out, outcome not back yet
        self._job_ids = itertools.count(1)
        self._held: list[tuple[wire.Envelope, messages.Message]] = []  # frames waiting for work (in order)
        self._out: list[Action] = []
        self._sent: list[str] = []

    # -- public interface

    @property
    def timeout(self) -> float | None:
        """Seconds the current state may wait for the peer (``None``: no limit)."""
        if self.state in (State.HELLO, State.AUTH, State.SYNC, State.RESOLVING):
            return self.settings.handshake_timeout
        if self.state is State.IDLE:
            return self.settings.idle_timeout if self.role == "bob" else None
        if self.state is State.CLOSED:
            return None
        return self.settings.round_timeout

    @property
    def unfinished_round(self) -> tuple[int, bool] | None:
        """The round open now, or open when the engine closed: its number, and whether Bob holds it
        pending (then the next connection's resolve commits or drops it, §13; otherwise nothing of it
        is stored). ``None``: no round was under way."""
        if self._round is not None:
            return self._round.number, self._round.pending
        return self._failed

    @property
    def cheap_frames(self) -> bool:
        """Whether the frames expected now are handled in well under a millisecond (Cascade's), so that
        a driver may handle them on its event loop instead of a worker thread."""
        return self.state is State.RECONCILING

    @property
    def round_number(self) -> int | None:
        return None if self._round is None else self._round.number

    def initiate(self) -> list[Action]:
        """The opening hello (§10). Call once, right after connecting."""
        if self._frames.send_seq:
            raise LocalProtocolError("initiate() called twice")
        self._emit("hello", self._hs.hello())
        return self._flush()

    # the session the handshake agreed (read by the rounds, the driver and the tests)

    @property
    def version(self) -> int | None:
        return self._hs.version

    @property
    def auth(self) -> str:
        """How this connection was authenticated: psk, pki or reserve (a handshake key, §17)."""
        return self._hs.auth

    @property
    def peer_capabilities(self) -> tuple[str, ...]:
        return self._hs.peer_capabilities

    @property
    def _macs(self) -> dict[str, psk_auth.FrameMac]:
        return self._frames.macs

    @property
    def _send_seq(self) -> int:
        return self._frames.send_seq

    @_send_seq.setter
    def _send_seq(self, value: int) -> None:
        self._frames.send_seq = value

    @property
    def _recv_seq(self) -> int:
        return self._frames.recv_seq

    @property
    def _pointer(self) -> int:
        """The first unused reserve bit, as agreed with the peer (§17) and advanced by every pad taken."""
        return self._hs.pointer

    @_pointer.setter
    def _pointer(self, value: int) -> None:
        self._hs.pointer = value

    @property
    def _next_round(self) -> int:
        return self._hs.next_round

    @_next_round.setter
    def _next_round(self, value: int) -> None:
        self._hs.next_round = value

    def _act(self, action: Action) -> None:
        self._out.append(action)

    def receive_frame(
        self, payload: bytes | wire.Envelope, message: wire.Message | None = None
    ) -> list[Action]:
        """Process one complete frame payload from the peer (or its envelope and message, when the
        caller decoded them already to tell the key channel's frames from the rounds').

        Raises:
            RemoteProtocolError: the frame breaks the protocol; the engine is CLOSED and ``error.frame``
                holds the error frame to send before closing.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("receive_frame() after CLOSED")
        try:
            envelope = payload if isinstance(payload, wire.Envelope) else wire.decode_envelope(payload)
            self._frames.check(envelope)
            message = message or self._decode(envelope)
            if self.peer_role not in self._spec.messages[message.type].senders:
                raise RemoteProtocolError(f"{self.peer_role} may not send {message.type}", code="bad-message")
            typed = messages.parse(message.type, dict(message.fields))
            if isinstance(typed, messages.Error):
                self._round = None
                self.state = State.CLOSED
                raise PeerError(typed.code, typed.message, list(typed.versions))
            if message.type == "hello":
                self._hs.received_hello(envelope.body)
            if self._held or self._needs_work(typed.type):
                self._held.append((envelope, typed))  # handled once the work is back, in order
            else:
                self._handle(envelope, typed)
            return self._flush()
        except RemoteProtocolError as error:
            self._fail(error)
            raise

    def completed(self, job: int, outcome: Outcome) -> list[Action]:
        """Take back the outcome of the work a :class:`Compute` or :class:`FetchFrame` action handed out,
        and handle the frames that waited for it. Work of a round that is gone is dropped.

        Raises:
            RemoteProtocolError: as :meth:`receive_frame` (a frame that waited breaks the protocol, or the
                link's frame does not match the peer's).
        """
        entry = self._jobs.pop(job, None)
        if self.state is State.CLOSED:
            return []
        try:
            if entry is not None and entry.round is self._round:
                entry.apply(outcome)
            self._release()
            return self._flush()
        except RemoteProtocolError as error:
            self._fail(error)
            raise

    def _needs_work(self, message_type: str) -> bool:
        return any(job.round is self._round and message_type in job.needed_by for job in self._jobs.values())

    def _release(self) -> None:
        """Handle the frames held for work, in order, as far as the work they need is back."""
        while self._held and self.state is not State.CLOSED and not self._needs_work(self._held[0][1].type):
            self._handle(*self._held.pop(0))

    def _handle(self, envelope: wire.Envelope, message: messages.Message) -> None:
        if self._is_stale(message):
            # §13: the peer sent it before it learnt that we dropped that round. §16: it spent a
            # one-time pad on the frame's transcript tag, so we skip that pad too, unverified:
            # both sides then take the same pad for the next tag.
            if envelope.tag and self._dropped_auth == "reserve":
                self._take_pads()
            return
        if envelope.tag and message.type not in _TAGGED:
            raise RemoteProtocolError(f"{message.type} carries no transcript tag", code="bad-message")
        self._frame = envelope
        self._transition(f"recv:{message.type}", lambda: self._dispatch(message))

    def _decode(self, envelope: wire.Envelope) -> wire.Message:
        try:
            return wire.decode_message(envelope.body)
        except RemoteProtocolError:
            versions = wire.hello_versions(envelope.body) if envelope.seq == 0 else None
            if versions is not None and not set(versions) & set(self.settings.versions):
                raise version_mismatch(self.settings.versions, versions) from None
            raise

    @property
    def peer_takes_keepalive(self) -> bool:
        """Whether the peer's hello said it takes ``keepalive`` (§13)."""
        return KEEPALIVE_CAPABILITY in self.peer_capabilities

    def keepalive(self) -> list[Action]:
        """Alice, in IDLE and starting no round for now: tell Bob she is there, so his IDLE timeout does
        not end a connection that is only waiting (and the next handshake need not be paid for)."""
        if self.role != "alice" or not self.peer_takes_keepalive:
            raise LocalProtocolError("keepalive: only Alice sends it, and only to a peer that takes it")

        def send() -> State:
            self._send("keepalive")
            return State.IDLE

        self._transition("keepalive", send)
        return self._flush()

    def start_round(self) -> list[Action]:
        """Alice, in IDLE: open the next round on the next frame of the link."""
        if self.role != "alice":
            raise LocalProtocolError("only Alice starts rounds")
        self._transition("start_round", self._start_round)
        return self._flush()

    def abort_round(self, reason: str) -> list[Action]:
        """Abandon the round under way (e.g. the link failed), telling the peer."""

        def abort() -> State:
            r = self._round
            assert r is not None
            self._send("abort", round=r.number, reason=reason[:256])
            # §13: Bob in COMMITTING holds the round pending and Alice may have committed it already;
            # it stays pending until the next connection's resolve says which
            pending = self.role == "bob" and self.state is State.COMMITTING
            return self._end_aborted(reason, record=not pending)

        self._transition("abort", abort)
        self._release()  # frames held for the round's work: now stale, or of no round
        return self._flush()

    def seal(self, body: bytes) -> bytes:
        """Frame ``body`` as our next frame, sequenced and MAC'd, whatever it holds: ``qkdd conform``
        sends malformed messages this way to reach the peer's checks behind the MAC."""
        return self._frames.seal(body)

    def close(self, code: str, message: str) -> bytes:
        """Move to CLOSED and return the error frame to send (timeouts, shutdown, replacement)."""
        if code not in self._spec.errors:
            raise LocalProtocolError(f"unknown error code {code!r}")
        frame = self._error_frame(code, message)
        self.state = State.CLOSED
        self._keep_unfinished()
        self._held = []
        return frame

    # -- plumbing

    def _transition(self, on: str, handler: Callable[[], State]) -> None:
        allowed = self._spec.allowed(self.role, self.state.value, on)
        if allowed is None:
            if on.startswith("recv:"):
                raise RemoteProtocolError(
                    f"{on[5:]} is not allowed in state {self.state.value}", code="bad-state"
                )
            raise LocalProtocolError(f"{on} is not allowed in state {self.state.value}")
        self._sent = []
        written = len(self._out)
        new_state = handler()
        persisted = {kind for action in self._out[written:] if (kind := persist_kind(action)) is not None}
        if (
            new_state.value not in allowed.targets
            or any(m not in allowed.sends for m in self._sent)
            or not persisted <= set(allowed.persist)
        ):
            raise LocalProtocolError(
                f"{self.role} {self.state.value} --{on}--> {new_state.value} sending {self._sent} and "
                f"persisting {sorted(persisted)} "
                "is not in protocol/qkdp-v2.toml"
            )
        self.state = new_state

    def _emit(self, name: str, body: bytes, *, tagged: bool = False) -> None:
        tag = b""
        if self._round is not None:
            _record(self._round.sent, self._frames.send_seq, body)
            if tagged and self._round.auth == "reserve":
                tag = self._round_tag(self._round.sent)
                self._round.sent = wc.Transcript(self._mac())  # the next tag covers the frames after this
        self._sent.append(name)
        self._out.append(Send(self._frames.seal(body, tag), name))

    def _send(self, name: str, *, tagged: bool = False, **fields: Any) -> None:
        self._emit(name, wire.encode_message(name, **fields), tagged=tagged)

    # -- reserve-based authentication (§16-§17)

    def _reserve_pays_for_a_round(self, total: int) -> bool:
        """Whether a reserve of ``total`` bits, from the agreed position on, pays for a round's tags."""
        return total >= self.settings.reserve_switch_bits and total - self._pointer >= ROUND_RESERVE_BITS

    def _mac(self) -> wc.Mac:
        if self._wc is None:
            self._wc = wc.Mac(self._store.reserve.hash_keys())
        return self._wc

    def _take_pads(self) -> list[int]:
        """The next one-time pad; consumed durably before anything using it is sent."""
        pads = self._store.reserve.pads(self._pointer)
        self._pointer += wc.OTP_BITS
        self._out.append(ConsumeReserve(self._pointer))
        return pads

    def _round_tag(self, transcript: wc.Transcript) -> bytes:
        if transcript.length > wc.MAX_TRANSCRIPT_BYTES:
            raise LocalProtocolError("round transcript over the authenticated maximum")
        return transcript.tag(self._take_pads())

    def _check_round_tag(self, r: _Round) -> None:
        """Verify the peer's transcript tag on the frame just received (reserve rounds, §16)."""
        tag = self._frame.tag
        if r.auth != "reserve":
            if tag:
                raise RemoteProtocolError("a transcript tag in a PSK round", code="bad-message")
            return
        if len(tag) != wc.TAG_BYTES or r.received.length > wc.MAX_TRANSCRIPT_BYTES:
            raise RemoteProtocolError("missing or malformed transcript tag", code="bad-mac")
        expected = r.received.tag(self._take_pads())
        if not hmac.compare_digest(expected, tag):
            raise RemoteProtocolError(f"round {r.number}: the transcript tag does not verify", code="bad-mac")
        r.received = wc.Transcript(self._mac())

    def _flush(self) -> list[Action]:
        r = self._round
        if r is not None and max(r.sent.unabsorbed, r.received.unabsorbed) >= wc.Transcript.CHUNK_BYTES:
            self._hash_transcripts(r)  # while waiting for the peer, not when the tag is due
        out, self._out = self._out, []
        return out

    def _hand_out(
        self,
        r: _Round,
        kind: str,
        function: Callable[[], Any],
        *,
        needed_by: frozenset[str],
        apply: Callable[[Outcome], None] | None = None,
        urgent: bool = False,
    ) -> None:
        """Hand ``function`` out as a Compute action; the frames in ``needed_by`` wait for its outcome,
        which ``apply`` takes (by default: into the round's results)."""
        job = next(self._job_ids)
        self._jobs[job] = _Job(r, kind, needed_by, apply or (lambda outcome: self._got(r, kind, outcome)))
        self._out.append(Compute(job, kind, function, urgent))

    def _got(self, r: _Round, kind: str, outcome: Outcome) -> None:
        r.results[kind] = outcome
        if kind in ("hash", "key_ids"):
            self._cut_blocks(r)

    def _hash_transcripts(self, r: _Round) -> None:
        sent, received = r.sent, r.received  # a tag replaces them, but not while this work is out
        if sent.hashing or received.hashing:
            return
        works = sent.take_chunks(), received.take_chunks()
        if works == (None, None):
            return

        def absorb(outcome: Outcome) -> None:
            for transcript, values in zip((sent, received), outcome.get(), strict=True):
                if values is not None:
                    transcript.absorbed(values)

        self._hand_out(
            r,
            "transcripts",
            lambda: [None if work is None else work() for work in works],
            needed_by=_TAG_WORK,
            apply=absorb,
        )

    def _fetch_frame(self, r: _Round) -> None:
        """Ask the driver for the link's record of the round's frame; the round goes on when it is back."""
        job = next(self._job_ids)

        def ready(outcome: Outcome) -> None:
            self._transition("link_frame", lambda: self._frame_ready(r, outcome.get()))

        self._jobs[job] = _Job(r, "frame", frozenset(), ready)
        self._out.append(FetchFrame(job, self.role, r.frame))

    def _error_frame(self, code: str, message: str) -> bytes:
        body = wire.encode_message(
            "error", code=code, message=message[:1024], versions=list(self.settings.versions)
        )
        return self._frames.seal(body, mac_if_keyed=True)

    _failed: tuple[int, bool] | None = None  # the unfinished round when the engine closed

    def _keep_unfinished(self) -> None:
        """Close the open round's books: remember what became of it (for the driver's log)."""
        if self._round is not None:
            self._failed = self._round.number, self._round.pending
        self._round = None

    def _fail(self, error: RemoteProtocolError) -> None:
        self._out = []
        self._keep_unfinished()
        if self.state is not State.CLOSED and not isinstance(error, PeerError):
            error.frame = self._error_frame(error.code, str(error))
        self.state = State.CLOSED

    # -- handshake (§10–§13)

    def _dispatch(self, message: messages.Message) -> State:
        handler = getattr(self, f"_on_{message.type}", None)
        if handler is None:  # pragma: no cover - the spec check above makes this unreachable
            raise LocalProtocolError(f"no handler for {message.type}")
        number = getattr(message, "round", None)
        if self._round is not None and number is not None and number != self._round.number:
            raise RemoteProtocolError(
                f"{message.type} names round {number}, the open round is {self._round.number}"
            )
        if self._round is not None:
            _record(self._round.received, self._frame.seq, self._frame.body)
        new_state: State = handler(message)
        return new_state

    def _on_hello(self, message: messages.Hello) -> State:
        return self._hs.on_hello(message)

    def _on_auth(self, message: messages.Auth) -> State:
        return self._hs.on_auth(message)

    def _on_sync(self, message: messages.Sync) -> State:
        return self._hs.on_sync(message)

    def _on_resolve(self, message: messages.Resolve) -> State:
        return self._hs.on_resolve(message)

    # -- a round, Alice's and Bob's handlers interleaved in protocol order

    def _start_round(self) -> State:
        auth = self._round_auth()
        number = self._next_round
        self._next_round += 1
        self._round = self._new_round(number, number, auth=auth)
        self._out.append(ReserveRound(number))
        self._fetch_frame(self._round)
        return State.SIFTING

    def _frame_ready(self, r: _Round, record: sifting.Preparation | sifting.Detections) -> State:
        """The link's record of the round's frame is here: Alice opens the round, Bob announces."""
        if self.role == "alice":
            assert not isinstance(record, sifting.Detections)
            r.preparation, r.pulses = record, record.pulses
            self._send("round_start", round=r.number, frame=r.frame, pulses=r.pulses, auth=r.auth)
            return State.SIFTING
        assert isinstance(record, sifting.Detections)
        detected = sifting.resolve_double_clicks(record, self._random)
        if detected.pulses != r.pulses:
            raise RemoteProtocolError(
                f"frame of {r.pulses} pulses; Bob's link has {detected.pulses}", code="config-mismatch"
            )
        r.detected, r.detections = detected, int(detected.indices.size)
        self._send("sift_announce", round=r.number, **_fields_of(sifting.bob_announce(detected)))
        return State.SIFTING

    def _round_auth(self) -> str:
        """How the next round is authenticated (§17): from the reserve once it holds enough bits."""
        total = self._store.reserve.total_bits
        if self.auth == "reserve" or total >= self.settings.reserve_switch_bits:
            if self._reserve_pays_for_a_round(total):
                return "reserve"
            if self.settings.fallback_to_psk:
                return self._session_auth()
            raise ReserveExhausted(
                f"the key reserve holds {max(0, total - self._pointer)} unused bits, a round needs "
                f"{ROUND_RESERVE_BITS}; the link pauses (set auth.fallback_to_psk to use the PSK instead)"
            )
        return self.auth  # the bootstrap method: psk or pki

    def _session_auth(self) -> str:
        """A round that takes no pad is authenticated by the connection's frame MACs alone: by the
        bootstrap method, or ``session`` on a connection authenticated by a reserve handshake key."""
        return "session" if self.auth == "reserve" else self.auth

    def _on_round_start(self, message: messages.RoundStart) -> State:
        number = message.round
        if number < self._next_round:
            raise RemoteProtocolError(f"round {number} was used before (next is {self._next_round})")
        if message.auth == "reserve" and not self._reserve_pays_for_a_round(self._store.reserve.total_bits):
            raise RemoteProtocolError(
                "a reserve round, but Bob's reserve cannot pay for it", code="reserve-exhausted"
            )
        if message.auth != "reserve" and message.auth != self._session_auth():
            raise RemoteProtocolError(
                f"a {message.auth} round on a {self.auth}-authenticated connection", code="bad-message"
            )
        if message.auth == "session" and not self.settings.fallback_to_psk:
            raise RemoteProtocolError(
                "a round without a reserve tag on a reserve-authenticated connection; Bob allows it only "
                "with auth.fallback_to_psk",
                code="config-mismatch",
            )
        self._next_round = number + 1
        self._out.append(ReserveRound(number))
        self._round = self._new_round(number, message.frame, pulses=message.pulses, auth=message.auth)
        _record(self._round.received, self._frame.seq, self._frame.body)
        self._fetch_frame(self._round)
        return State.SIFTING

    def _on_sift_announce(self, message: messages.SiftAnnounce) -> State:
        r = self._open_round()
        assert r.preparation is not None
        if message.pulses != r.pulses:
            raise RemoteProtocolError(
                f"sift_announce is for {message.pulses} pulses, the frame has {r.pulses}"
            )
        announce = _build(sifting.SiftAnnounce, message)
        answer, r.sifted = sifting.alice_answer(r.preparation, announce)
        r.detections = announce.detections
        r.sifted_bits = int(r.sifted.bits.size)
        self._send("sift_answer", round=r.number, **_fields_of(answer))
        return State.ESTIMATING

    def _on_sift_answer(self, message: messages.SiftAnswer) -> State:
        r = self._open_round()
        assert r.detected is not None
        r.sifted = sifting.bob_sift(r.detected, _build(sifting.SiftAnswer, message))
        r.sifted_bits = int(r.sifted.bits.size)
        request = estimation.bob_request(
            r.sifted, self._random, z_sample_fraction=self.settings.z_sample_fraction
        )
        r.estimate_request = request
        self._send("estimate_request", round=r.number, **_fields_of(request))
        return State.ESTIMATING

    def _on_estimate_request(self, message: messages.EstimateRequest) -> State:
        r = self._open_round()
        assert r.sifted is not None
        request = _build(estimation.EstimateRequest, message)
        answer, estimate = estimation.alice_answer(r.sifted, request, threshold=self.settings.qber_threshold)
        self._send("estimate_answer", round=r.number, **_fields_of(answer))
        reason = self._take_estimate(r, estimate)
        if reason:
            return self._end_aborted(reason)
        assert r.key is not None
        r.alice = cascade.CascadeAlice(r.key)
        self._speculate(r)
        return State.RECONCILING

    def _speculate(self, r: _Round) -> None:
        """Alice: hash her key while Bob reconciles (her key no longer changes). The output length is
        not known yet, but it cannot exceed the §8 bound with nothing disclosed but the confirmation
        tag, and the hash to fewer bits is a prefix of the hash to more (:func:`amplify.longest_seed`)."""
        assert r.key is not None
        key, n = r.key, int(r.key.size)
        seed = r.seed = amplify.longest_seed(self._random, n)
        longest_output = self._longest_output(r)

        def hash_longest() -> tuple[int, Bits]:
            longest = longest_output()
            if longest <= 0:
                return 0, np.zeros(0, dtype=np.uint8)
            return longest, amplify.toeplitz_hash(key, seed[: n + longest - 1], longest, threads=1)

        self._hand_out(r, "hash", hash_longest, needed_by=frozenset({"commit"}))
        self._early_key_ids(r, needed_by="commit")

    def _early_key_ids(self, r: _Round, *, needed_by: str) -> None:
        """Either side, as Cascade starts: the IDs of as many key blocks as §8's bound allows with nothing
        disclosed but the confirmation tag — at least as many as the round will have — handed out to be
        computed while Cascade runs, so that neither side's key split waits for them (a few thousand
        SHA-1 hashes, 6–20 ms) once the output length is known."""
        longest_output, link_id, number = self._longest_output(r), self.settings.link_id, r.number
        block_bits = self.settings.key_block_bits

        def ids() -> list[str]:
            return key_ids(link_id, number, max(0, longest_output()) // block_bits)

        self._hand_out(r, "key_ids", ids, needed_by=frozenset({needed_by}))

    def _longest_output(self, r: _Round) -> Callable[[], int]:
        """The most output bits the round's key can have, as a function to run anywhere: §8's bound with
        nothing disclosed but the confirmation tag (bounds only fall as disclosure grows), at most the
        key's size. Known as Cascade starts, so that work sized by the output can begin then."""
        assert r.key is not None and r.sifted is not None and r.estimate is not None
        size, sifted, estimate = int(r.key.size), r.sifted, r.estimate
        info, settings, disclosed = self._info, self.settings, confirm.TAG_BITS
        return lambda: min(size, _length_bound(info, settings, sifted, estimate, disclosed).secret_bits)

    def _take_estimate(self, r: _Round, estimate: estimation.Estimate) -> str | None:
        """Both sides: record §4's estimate and cut the key, or say why the round must stop."""
        assert r.sifted is not None
        r.estimate = estimate
        r.phase_error = estimate.phase_error_rate if estimate.x_bits else None
        reason = estimate.abort_reason or _key_size_problem(estimate)
        if reason is None:
            r.key = estimate.z_key(r.sifted)
        return reason

    def _on_estimate_answer(self, message: messages.EstimateAnswer) -> State:
        r = self._open_round()
        assert r.sifted is not None and r.estimate_request is not None
        answer = _build(estimation.EstimateAnswer, message)
        estimate = estimation.bob_estimate(
            r.sifted, r.estimate_request, answer, threshold=self.settings.qber_threshold
        )
        reason = self._take_estimate(r, estimate)
        if reason:
            return self._end_aborted(reason)
        assert r.key is not None
        guess = estimation.cascade_qber_guess(estimate, self.settings.qber_prior, self._last_qber)
        r.bob = cascade.CascadeBob(
            r.key, min(guess, 0.5), self._random, variant=self.settings.cascade_variant
        )
        state = self._send_cascade(r)
        self._early_key_ids(r, needed_by="amplify")  # while the first requests are on their way
        return state

    def _send_cascade(self, r: _Round) -> State:
        """Bob: send what Cascade asks now — a flight of requests (§5), or nothing while answers to an
        earlier one are still on their way."""
        assert r.bob is not None and r.key is not None
        flight = r.bob.outgoing()
        for message in flight:
            if isinstance(message, cascade.Finished):
                return self._finish_cascade(r, message.disclosed_bits)
            self._send_cascade_request(r, message)
        work = r.bob.preparation() if flight else None
        if work is not None:
            # his own range parities of the passes this flight starts, while Alice builds hers: the
            # answers wait for them
            bob = r.bob
            self._hand_out(
                r,
                "parities",
                work,
                needed_by=frozenset({"cascade_parities"}),
                apply=lambda outcome: bob.prepared(outcome.get()),
                urgent=True,
            )
        return State.RECONCILING

    def _send_cascade_request(self, r: _Round, message: cascade.StartPass | cascade.RangeRequest) -> None:
        match message:
            case cascade.StartPass(index=index, layout=layout):
                self._send(
                    "cascade_pass",
                    round=r.number,
                    index=index,
                    kind=layout.kind,
                    block_size=layout.block_size,
                    multiplier=layout.multiplier,
                    offset=layout.offset,
                    seed=layout.seed,
                )
            case cascade.RangeRequest(passes=passes, starts=starts, ends=ends):
                self._send(
                    "cascade_ranges",
                    round=r.number,
                    passes=passes.astype(np.uint8).tobytes(),
                    starts=starts.astype("<u4").tobytes(),
                    ends=ends.astype("<u4").tobytes(),
                )

    def _finish_cascade(self, r: _Round, disclosed: int) -> State:
        assert r.bob is not None
        result = r.bob.result()
        r.key = result.key
        self._send(
            "cascade_done", round=r.number, disclosed_bits=disclosed, corrected_bits=result.corrected_bits
        )
        return self._after_cascade(r, disclosed, result.corrected_bits)

    def _after_cascade(self, r: _Round, disclosed: int, corrected: int) -> State:
        assert r.key is not None
        r.disclosed_bits = disclosed + confirm.TAG_BITS
        r.qber = corrected / r.key.size
        self._last_qber = r.qber
        reason = estimation.qber_abort_reason(corrected, int(r.key.size), self.settings.qber_threshold)
        if reason:
            return self._end_aborted(reason)
        if self.role == "alice":
            request = confirm.alice_confirm(r.key, self._random)
            self._send(
                "confirm",
                round=r.number,
                hash_key=request.hash_key.to_bytes(12, "big"),
                tag=request.tag.to_bytes(12, "big"),
            )
        else:
            self._prepare_amplification(r)
        return State.CONFIRMING

    def _prepare_amplification(self, r: _Round) -> None:
        """Bob: transform his key for privacy amplification while the confirmation runs, so that Alice's
        seed leaves him two of the hash's three transforms (:class:`amplify.PreparedKey`). His key no
        longer changes (a failed confirmation ends the round), and the output cannot exceed §8's bound
        now that the disclosure is final."""
        key, disclosed = r.key, r.disclosed_bits
        assert key is not None and r.sifted is not None and r.estimate is not None
        sifted, estimate, info, settings = r.sifted, r.estimate, self._info, self.settings

        def prepare() -> amplify.PreparedKey | None:
            bound = min(int(key.size), _length_bound(info, settings, sifted, estimate, disclosed).secret_bits)
            return amplify.prepare_key(key, bound) if bound > 0 else None

        self._hand_out(r, "amplification", prepare, needed_by=frozenset({"amplify"}), urgent=True)

    def _on_cascade_pass(self, message: messages.CascadePass) -> State:
        layout = cascade.PassLayout(
            message.kind, message.block_size, message.multiplier, message.offset, message.seed
        )
        return self._answer_cascade(cascade.StartPass(message.index, layout))

    def _on_cascade_ranges(self, message: messages.CascadeRanges) -> State:
        count = len(message.passes)
        if len(message.starts) != 4 * count or len(message.ends) != 4 * count:
            raise RemoteProtocolError("cascade_ranges: passes, starts and ends must describe the same ranges")
        request = cascade.RangeRequest(
            np.frombuffer(message.passes, dtype=np.uint8),
            np.frombuffer(message.starts, dtype="<u4").astype(np.uint32),
            np.frombuffer(message.ends, dtype="<u4").astype(np.uint32),
        )
        return self._answer_cascade(request)

    def _answer_cascade(self, request: cascade.StartPass | cascade.RangeRequest) -> State:
        r = self._open_round()
        assert r.alice is not None
        reply = r.alice.handle(request)
        assert reply is not None
        self._send("cascade_parities", round=r.number, count=reply.count, parities=reply.parities)
        return State.RECONCILING

    def _on_cascade_parities(self, message: messages.CascadeParities) -> State:
        r = self._open_round()
        assert r.bob is not None
        r.bob.receive(cascade.Parities(message.count, message.parities))
        return self._send_cascade(r)

    def _on_cascade_done(self, message: messages.CascadeDone) -> State:
        r = self._open_round()
        assert r.alice is not None and r.key is not None
        r.alice.handle(cascade.Finished(message.disclosed_bits))
        if message.corrected_bits > r.key.size:
            raise RemoteProtocolError("cascade_done: more corrected bits than key bits")
        return self._after_cascade(r, message.disclosed_bits, message.corrected_bits)

    def _on_confirm(self, message: messages.Confirm) -> State:
        r = self._open_round()
        assert r.key is not None
        request = confirm.ConfirmRequest(
            int.from_bytes(message.hash_key, "big"), int.from_bytes(message.tag, "big")
        )
        matched = confirm.bob_confirm(r.key, request).matched
        self._send("confirm_result", round=r.number, matched=matched)
        if not matched:
            return self._end_aborted("confirmation tags differ: residual errors after reconciliation")
        r.bound = self._secret_length(r)
        return State.AMPLIFYING

    def _on_confirm_result(self, message: messages.ConfirmResult) -> State:
        r = self._open_round()
        assert r.key is not None
        if not message.matched:
            return self._end_aborted("confirmation tags differ: residual errors after reconciliation")
        r.bound = self._secret_length(r)
        reserve_bits = self._refill(r.bound)
        output = self._output_bits(r.bound, reserve_bits)
        if output == 0:
            self._send(
                "amplify", round=r.number, input_bits=int(r.key.size), output_bits=0, reserve_bits=0, seed=b""
            )
            return self._end_aborted(f"no secret key: {self._length_reason}")
        assert r.seed is not None
        seed = amplify.seed_prefix(r.seed, int(r.key.size), output)
        self._send(
            "amplify",
            tagged=True,
            round=r.number,
            input_bits=seed.input_bits,
            output_bits=seed.output_bits,
            reserve_bits=reserve_bits,
            seed=seed.seed,
        )
        r.output = output, reserve_bits
        self._cut_blocks(r)
        return State.COMMITTING

    def _cut_blocks(self, r: _Round) -> None:
        """Alice, once amplify is out and her early hash and key IDs are back: hand out the cutting of her
        output into the reserve's share and key blocks (while Bob hashes his); her commit waits for it."""
        if r.output is None or "blocks" in r.results or not {"hash", "key_ids"} <= r.results.keys():
            return
        assert r.key is not None and r.seed is not None
        (output, reserve_bits), hashed, ids = r.output, r.results["hash"], r.results["key_ids"]
        key, seed, n, settings, number = r.key, r.seed, int(r.key.size), self.settings, r.number

        def cut() -> tuple[tuple[bytes, int], tuple[tuple[str, bytes], ...]]:
            longest, final = hashed.get()
            if output > longest:  # §8's bounds only fall as disclosure grows; should one not, hash anew
                final = amplify.toeplitz_hash(key, seed[: n + output - 1], output)
            return _split(settings, number, final[:output], reserve_bits, ids.get())

        r.results["blocks"] = Outcome()  # handed out: not again
        self._hand_out(r, "blocks", cut, needed_by=frozenset({"commit"}))

    def _on_amplify(self, message: messages.Amplify) -> State:
        r = self._open_round()
        assert r.key is not None
        reserve_bits = message.reserve_bits
        expected = self._output_bits(r.bound, reserve_bits) if reserve_bits <= r.bound // 2 else -1
        if message.input_bits != r.key.size or message.output_bits != expected:
            raise RemoteProtocolError(
                f"amplify: {message.input_bits} -> {message.output_bits} bits ({reserve_bits} to the "
                f"reserve); Bob's bound allows {r.key.size} -> {r.bound}",
                code="config-mismatch",
            )
        if expected == 0:
            return self._end_aborted(f"no secret key: {self._length_reason}")
        self._check_round_tag(r)  # §16: nothing of the round is kept unless Alice's transcript verifies
        seed = amplify.AmplificationSeed(message.input_bits, message.output_bits, message.seed)
        prepared = r.results.pop("amplification").get()
        final = amplify.amplify(r.key, seed, prepared)
        r.reserve, r.blocks = _split(self.settings, r.number, final, reserve_bits, r.results["key_ids"].get())
        self._out.append(RoundEnded(self._summary(r, None), "pending", r.blocks, r.reserve))
        r.pending = True
        self._send("commit", tagged=True, round=r.number, blocks=len(r.blocks))
        return State.COMMITTING

    def _on_commit(self, message: messages.Commit) -> State:
        r = self._open_round()
        r.reserve, r.blocks = r.results["blocks"].get()  # her cut key (_cut_blocks): commit waited for it
        if message.blocks != len(r.blocks):
            raise RemoteProtocolError(f"commit: Bob holds {message.blocks} key blocks, Alice {len(r.blocks)}")
        self._check_round_tag(r)
        self._out.append(RoundEnded(self._summary(r, None), "committed", r.blocks, r.reserve))
        self._send("committed", tagged=True, round=r.number)
        self._round = None
        return State.IDLE

    def _on_committed(self, message: messages.Committed) -> State:
        r = self._open_round()
        self._check_round_tag(r)
        self._out.append(CommitRound(r.number))
        self._round = None
        return State.IDLE

    def _on_keepalive(self, message: messages.Keepalive) -> State:
        return State.IDLE

    def _on_abort(self, message: messages.Abort) -> State:
        return self._end_aborted(f"the peer aborted the round: {message.reason}")

    # -- round helpers

    def _new_round(self, number: int, frame: int, *, auth: str, **fields: Any) -> _Round:
        r = _Round(number, frame, auth=auth, **fields)
        if auth == "reserve":  # the reserve's hash keys are there: the round was checked to afford it
            r.sent, r.received = wc.Transcript(self._mac()), wc.Transcript(self._mac())
        return r

    def _open_round(self) -> _Round:
        if self._round is None:  # pragma: no cover - the state table only routes round messages here
            raise LocalProtocolError("no open round")
        return self._round

    _length_reason: str | None = None

    def _secret_length(self, r: _Round) -> int:
        """§8: the decoy-state bound for a weak-coherent source (the link declares its intensities), the
        single-photon bound for a single-photon source. Both sides compute it from the same counts."""
        assert r.sifted is not None and r.estimate is not None
        length = _length_bound(self._info, self.settings, r.sifted, r.estimate, r.disclosed_bits)
        self._length_reason = length.reason or (
            None
            if length.secret_bits >= self.settings.key_block_bits
            else f"{length.secret_bits} secret bits, less than one key block"
        )
        return length.secret_bits

    def _refill(self, bound: int) -> int:
        """Alice: how many leading output bits go to the key reserve (§17); Bob takes her word."""
        available = self._store.reserve.total_bits - self._pointer
        return policy.reserve_refill(
            bound, available, self.settings.reserve_bits_per_round, self.settings.reserve_target_bits
        )

    def _output_bits(self, bound: int, reserve_bits: int) -> int:
        return policy.output_bits(bound, reserve_bits, self.settings.key_block_bits)

    def _summary(self, r: _Round, reason: str | None) -> RoundSummary:
        return RoundSummary(
            round=r.number,
            frame=r.frame,
            pulses=r.pulses,
            detections=r.detections,
            sifted_bits=r.sifted_bits,
            qber=r.qber,
            phase_error=r.phase_error,
            disclosed_bits=r.disclosed_bits,
            secret_bits=0 if reason else len(r.blocks) * self.settings.key_block_bits,
            aborted=reason is not None,
            reason=reason,
            auth=r.auth,
        )

    def _end_aborted(self, reason: str, *, record: bool = True) -> State:
        """Drop the open round; ``record``: store its figures as aborted (which drops a pending round)."""
        r = self._open_round()
        if record:
            self._out.append(RoundEnded(self._summary(r, reason), "aborted"))
        self._round = None
        self._dropped_round, self._dropped_auth = r.number, r.auth
        return State.IDLE

    _dropped_round: int | None = None
    _dropped_auth: str | None = None

    def _is_stale(self, message: messages.Message) -> bool:
        """A round message for the round we aborted last, which the peer may still have been running."""
        number = getattr(message, "round", None)
        return (
            number is not None
            and number == self._dropped_round
            and (self._round is None or self._round.number != number)
        )


def _length_bound(
    info: LinkInfo,
    settings: EngineSettings,
    sifted: sifting.SiftedKey,
    estimate: estimation.Estimate,
    disclosed_bits: int,
) -> keylength.KeyLength:
    """§8: the decoy-state bound for a weak-coherent source (the link declares its intensities), the
    single-photon bound for a single-photon source, for a round's counts with ``disclosed_bits``
    disclosed. Both sides compute it from the same counts; handed-out work calls it too."""
    return secrecy.round_key_length(
        info.intensities,
        info.intensity_probabilities,
        sifted,
        estimate,
        disclosed_bits,
        eps_sec=settings.eps_sec,
        eps_cor=settings.eps_cor,
    )


def _split(
    settings: EngineSettings, number: int, final: Bits, reserve_bits: int, ids: Sequence[str]
) -> tuple[tuple[bytes, int], tuple[tuple[str, bytes], ...]]:
    """A round's output cut into the reserve's share (packed, and its bit count) and key blocks (§17)."""
    key = final[reserve_bits:]
    blocks = key_blocks(settings.link_id, number, key, settings.key_block_bits, ids)
    return (pack_bits(final[:reserve_bits]), reserve_bits), tuple(blocks)


def _fields_of(value: Any) -> dict[str, Any]:
    """A stage message's fields by name (they are named as in protocol/qkdp-v2.toml)."""
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def _build(cls: type[T], message: messages.Message) -> T:
    """A stage message from the checked wire message of the same field names."""
    return cls(**{f.name: getattr(message, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def _record(transcript: wc.Transcript, seq: int, body: bytes) -> None:
    """Append one frame to a round transcript (§16): 8-byte seq, 4-byte body length, body."""
    transcript.append(seq.to_bytes(8, "big") + len(body).to_bytes(4, "big"))
    transcript.append(bytes(body))


def _key_size_problem(estimate: estimation.Estimate) -> str | None:
    """Both sides refuse a round whose key is longer than privacy amplification takes (§7)."""
    key_bits = int(np.count_nonzero(estimate.z_key_mask))
    if key_bits > amplify.MAX_INPUT_BITS:
        return f"frame too large: {key_bits} key bits, at most {amplify.MAX_INPUT_BITS}; use shorter frames"
    return None


class PeerError(RemoteProtocolError):
    """The peer sent an error frame; we close without answering."""

    def __init__(self, code: str, message: str, versions: list[int]) -> None:
        super().__init__(f"the peer closed the connection: {code}: {message[:200]}", code=code)
        self.versions = versions
