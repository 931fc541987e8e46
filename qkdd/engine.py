"""The qkdp/2 session of one connection, for either role (protocol/qkdp-v2.md §9–§16).

Theory of operation
-------------------
Layers, each knowing only the one below: :mod:`qkdd.wire` (framing: the only code that sees bytes) →
:mod:`qkdd.session` (sequence numbers and frame MACs) → :mod:`qkdd.handshake` (version, authentication,
the agreement on rounds and the reserve; it hands over the authenticated session) → this module (the
session after the handshake: it opens rounds, routes each round's messages to its :class:`Round`, keeps
the transcripts' tags in step with the reserve, hands out work and holds back the frames that wait for
it) → :mod:`qkdd.rounds` (one object per round, from ``round_start`` to ``committed``) →
:mod:`qkdd.policy` (pure decisions).
States, actions and settings live in :mod:`qkdd.interface`.

Bytes in, actions out. The daemon feeds complete frame payloads to :meth:`Engine.receive_frame`, local
events to :meth:`Engine.start_round` / :meth:`Engine.abort_round`, and the outcomes of work the engine
handed out to :meth:`Engine.completed`; each returns a list of :data:`Action` to carry out *in order*:
frames to send, rounds to reserve, keys to store or commit, work to run (:class:`Compute`) and link frames
to fetch (:class:`FetchFrame`). The engine opens no socket or file, starts no thread, takes no lock,
reads no clock, calls no link and draws randomness only from the source it is given.

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

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from qkdd import messages, policy, spec, wire
from qkdd.auth import psk as psk_auth
from qkdd.auth import wegman_carter as wc
from qkdd.bits import RandomSource
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
from qkdd.rounds import Host, Round
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

    round: Round
    kind: str
    needed_by: frozenset[str]  # the messages whose handling must wait for it
    apply: Callable[[Outcome], None]


_TAG_WORK = frozenset(_TAGGED | {"confirm_result"})  # the frames whose handling tags or checks a transcript


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
        self._round: Round | None = None
        self._host = Host(
            role,
            settings,
            info,
            random,
            send=self._send,
            act=self._act,
            hand_out=self._hand_out,
            take_pads=self._take_pads,
            frame_tag=lambda: self._frame.tag,
            refill=self._refill,
            end=lambda r, reason, *, record=True: self._end_aborted(reason, record=record),
        )
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
                self._round.sent = wc.Transcript(self._round.mac)  # the next tag covers the frames after this
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

    def _flush(self) -> list[Action]:
        r = self._round
        if r is not None and max(r.sent.unabsorbed, r.received.unabsorbed) >= wc.Transcript.CHUNK_BYTES:
            self._hash_transcripts(r)  # while waiting for the peer, not when the tag is due
        out, self._out = self._out, []
        return out

    def _hand_out(
        self,
        r: Round,
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
        self._jobs[job] = _Job(r, kind, needed_by, apply or (lambda outcome: r.got(kind, outcome)))
        self._out.append(Compute(job, kind, function, urgent))

    def _hash_transcripts(self, r: Round) -> None:
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

    def _fetch_frame(self, r: Round) -> None:
        """Ask the driver for the link's record of the round's frame; the round goes on when it is back."""
        job = next(self._job_ids)

        def ready(outcome: Outcome) -> None:
            self._transition("link_frame", lambda: r.frame_ready(outcome.get()))

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
        """Handshake messages, ``round_start``, ``keepalive`` and ``abort`` are the session's; every other
        one is its round's."""
        handler = getattr(self, f"_on_{message.type}", None)
        if handler is None:
            if self._round is None:  # pragma: no cover - the spec check above makes this unreachable
                raise LocalProtocolError(f"no handler for {message.type}")
            handler = self._round.handle
        number = getattr(message, "round", None)
        if self._round is not None and number is not None and number != self._round.number:
            raise RemoteProtocolError(
                f"{message.type} names round {number}, the open round is {self._round.number}"
            )
        r = self._round
        if r is None:
            new_state: State = handler(message)
            return new_state
        _record(r.received, self._frame.seq, self._frame.body)
        new_state = handler(message)
        if new_state is State.IDLE and self._round is r:  # the round is over: committed
            self._round = None
        if r.qber is not None:
            self._last_qber = r.qber
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

    def _on_keepalive(self, message: messages.Keepalive) -> State:
        return State.IDLE

    def _on_abort(self, message: messages.Abort) -> State:
        return self._end_aborted(f"the peer aborted the round: {message.reason}")

    # -- round helpers

    def _new_round(self, number: int, frame: int, *, auth: str, **fields: Any) -> Round:
        # a reserve round's hash keys are there: the round was checked to afford it
        mac = self._mac() if auth == "reserve" else None
        return Round(self._host, number, frame, auth=auth, qber_guess=self._last_qber, mac=mac, **fields)

    def _open_round(self) -> Round:
        if self._round is None:  # pragma: no cover - the state table only routes round messages here
            raise LocalProtocolError("no open round")
        return self._round

    def _refill(self, bound: int) -> int:
        """Alice: how many leading output bits go to the key reserve (§17); Bob takes her word."""
        available = self._store.reserve.total_bits - self._pointer
        return policy.reserve_refill(
            bound, available, self.settings.reserve_bits_per_round, self.settings.reserve_target_bits
        )

    def _end_aborted(self, reason: str, *, record: bool = True) -> State:
        """Drop the open round; ``record``: store its figures as aborted (which drops a pending round)."""
        r = self._open_round()
        if record:
            self._out.append(RoundEnded(r.summary(reason), "aborted"))
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


def _record(transcript: wc.Transcript, seq: int, body: bytes) -> None:
    """Append one frame to a round transcript (§16): 8-byte seq, 4-byte body length, body."""
    transcript.append(seq.to_bytes(8, "big") + len(body).to_bytes(4, "big"))
    transcript.append(bytes(body))


class PeerError(RemoteProtocolError):
    """The peer sent an error frame; we close without answering."""

    def __init__(self, code: str, message: str, versions: list[int]) -> None:
        super().__init__(f"the peer closed the connection: {code}: {message[:200]}", code=code)
        self.versions = versions
