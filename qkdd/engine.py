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
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

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
    LIVENESS_CAPABILITY,
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
    "LIVENESS_CAPABILITY",
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
_TAGGED = ("amplify", "commit", "committed")  # a reserve round's tags, in slot order (§16)
_CHEAP = frozenset({"cascade_pass", "cascade_ranges", "cascade_parities", "cascade_done", "keepalive"})
# the messages that end a round's stages in round order (§13): each waits until every earlier open round
# is in the state named (None: until no earlier round is open)
_IN_ORDER: dict[str, State | None] = {
    "confirm_result": State.COMMITTING,
    "amplify": State.COMMITTING,
    "commit": None,
    "committed": None,
}
MAX_HELD = 1024
"""Frames a session holds for work or earlier rounds at most (a few flights per open round); more is a
peer that does not wait for answers."""
DROPPED_KEPT = 64
"""How many dropped rounds a session remembers, to discard the peer's frames still on their way (§13)."""


class ReserveExhausted(QkddError):
    """Alice cannot start a round: the reserve cannot pay for it and the PSK may not be used (§17)."""


@dataclass(frozen=True)
class _Job:
    """Work handed out in a :class:`Compute` or :class:`FetchFrame` action, until its outcome is back."""

    round: Round
    kind: str
    needed_by: frozenset[str]  # the messages whose handling must wait for it
    apply: Callable[[Outcome], None]


_TAG_WORK = frozenset({*_TAGGED, "confirm_result"})  # the frames whose handling tags or checks a transcript


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
        self._state = State.HELLO  # the session's: the handshake's states, IDLE after it, CLOSED
        self._wc: wc.Mac | None = None
        self._frame = wire.Envelope(0, b"", b"")
        self._last_qber: float | None = None  # the latest round's exact Z error rate (Cascade's guess)
        self._frames = FrameSession(role)  # §9, §12: sequence numbers and frame MACs
        # §10-§13: the handshake, until it hands over the authenticated session (version, method, MACs,
        # reserve position, next round, window); its sends go through ours (sequence numbers, MACs)
        self._hs = Handshake(
            role, settings, store, random, send=self._send, act=self._act, macs=self._frames.macs
        )
        self._rounds: dict[int, Round] = {}  # the rounds open now, in the order they started
        self._dropped: dict[int, str] = {}  # recently dropped rounds and their auth (§13: stale frames)
        self._slots = 0  # tag slots given to reserve rounds in this session (§16)
        self._ended_one = False  # a round of this connection ended (committed or dropped)
        self._open_limit = 1 << 16  # the driver's limit (limit_open_rounds): none until it sets one
        self._host = Host(
            role,
            settings,
            info,
            random,
            send=self._send,
            act=self._act,
            hand_out=self._hand_out,
            pads=self._pads,
            frame_tag=lambda: self._frame.tag,
            refill=self._refill,
            end=self._end_aborted,
        )
        self._jobs: dict[int, _Job] = {}  # handed out, outcome not back yet
        self._job_ids = itertools.count(1)
        self._held: list[tuple[wire.Envelope, messages.Message]] = []  # frames waiting (see _waits)
        self._out: list[Action] = []
        self._sent: list[str] = []
        self._unfinished: list[tuple[int, bool]] = []  # the rounds open when the engine closed

    # -- public interface

    @property
    def state(self) -> State:
        """The session's state, or, while rounds are open, the oldest open round's."""
        if self._state is State.IDLE and self._rounds:
            return next(iter(self._rounds.values())).state
        return self._state

    @property
    def round_states(self) -> dict[int, State]:
        """Every open round's state, by round number, oldest first."""
        return {number: r.state for number, r in self._rounds.items()}

    @property
    def window(self) -> int:
        """How many rounds may be open at once on this session: the smaller of the two sides' (§13)."""
        return self._hs.window

    @property
    def open_limit(self) -> int:
        """Alice: the most rounds she keeps open, at most the window: the driver may lower it
        (:meth:`limit_open_rounds`), the peer's frames cannot."""
        return min(self.window, self._open_limit)

    def limit_open_rounds(self, rounds: int) -> None:
        """Keep at most ``rounds`` (at least 1) open from now on, within the window: a driver's choice,
        e.g. :func:`policy.rounds_to_open` of the round trip it measured."""
        self._open_limit = max(1, rounds)

    @property
    def can_start_round(self) -> bool:
        """Alice: whether :meth:`start_round` may open a round now (:func:`policy.may_start_round`)."""
        return (
            self.role == "alice"
            and self._state is State.IDLE
            and policy.may_start_round(
                [r.state.value for r in self._rounds.values()], self.open_limit, ended_one=self._ended_one
            )
            # with rounds open, a reserve that cannot pay for one more waits for them (they refill it)
            and (not self._rounds or self._round_auth() is not None)
        )

    @property
    def timeout(self) -> float | None:
        """Seconds the current state may wait for the peer (``None``: no limit)."""
        state = self.state
        if state in (State.HELLO, State.AUTH, State.SYNC, State.RESOLVING):
            return self.settings.handshake_timeout
        if state is State.IDLE:  # no round open
            idle = self.settings.idle_timeout if self.role == "bob" else None
            if self.peer_has_liveness:  # the peer says something every keepalive_interval (§13)
                return min(self.settings.silence_timeout, idle or math.inf)
            return idle
        if state is State.CLOSED:
            return None
        return self.settings.round_timeout

    @property
    def unfinished_rounds(self) -> list[tuple[int, bool]]:
        """The rounds open now, or open when the engine closed: each one's number, and whether Bob holds
        it pending (then the next connection's resolve commits or drops it, §13; otherwise nothing of it
        is stored)."""
        if self._rounds:
            return [(r.number, r.pending) for r in self._rounds.values()]
        return list(self._unfinished)

    @property
    def unfinished_round(self) -> tuple[int, bool] | None:
        """The oldest of :attr:`unfinished_rounds` (``None``: no round was under way)."""
        unfinished = self.unfinished_rounds
        return unfinished[0] if unfinished else None

    def cheap(self, message: wire.Message | None) -> bool:
        """Whether handling ``message`` takes well under a millisecond (Cascade's messages; ``None``, a
        frame the engine decodes itself, never), so that a driver may handle it on its event loop
        instead of a worker thread. Never while a held frame may follow it: only frames held for their
        round's work stay where they are (:meth:`_held_for_work`)."""
        return message is not None and message.type in _CHEAP and self._held_for_work()

    @property
    def holds_frames(self) -> bool:
        """Whether frames received wait for work handed out (or for frames that do): a driver whose
        connection ended feeds that work's outcomes back before it gives the session up, so that what
        the peer sent before it closed is handled."""
        return bool(self._held)

    @property
    def cheap_completion(self) -> bool:
        """Whether taking an outcome back (:meth:`completed`) is cheap now: no frame waits for one, and
        every open round is reconciling."""
        return not self._held and all(r.state is State.RECONCILING for r in self._rounds.values())

    def _held_for_work(self) -> bool:
        """Whether every held frame waits for work of its round (or behind a frame of its round that
        does): handling another frame cannot release those, only the work's outcome can."""
        waiting: set[int] = set()
        for _, message in self._held:
            number: int | None = getattr(message, "round", None)
            if number in waiting:
                continue
            r = None if number is None else self._rounds.get(number)
            if (
                number is None
                or r is None
                or not any(job.round is r and message.type in job.needed_by for job in self._jobs.values())
            ):
                return False
            waiting.add(number)
        return True

    def round_of_job(self, job: int) -> int | None:
        """The round a piece of work handed out belongs to (``None``: its round is gone)."""
        entry = self._jobs.get(job)
        return None if entry is None else entry.round.number

    @property
    def round_number(self) -> int | None:
        """The oldest open round's number."""
        return next(iter(self._rounds), None)

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
        """The first reserve bit no tag of this session has a slot on (§16-§17): the position both sides
        agreed in the handshake, after the slots given out so far."""
        return self._hs.pointer + self._slots * ROUND_RESERVE_BITS

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
        if self._state is State.CLOSED:
            raise LocalProtocolError("receive_frame() after CLOSED")
        try:
            envelope = payload if isinstance(payload, wire.Envelope) else wire.decode_envelope(payload)
            self._frames.check(envelope)
            message = message or self._decode(envelope)
            if self.peer_role not in self._spec.messages[message.type].senders:
                raise RemoteProtocolError(f"{self.peer_role} may not send {message.type}", code="bad-message")
            typed = messages.parse(message.type, dict(message.fields))
            if isinstance(typed, messages.Error) and not self._held:
                self._peer_closed(typed)
            if message.type == "hello":
                self._hs.received_hello(envelope.body)
            self._start_frame_work(typed)
            if self._waits(typed, self._held):
                if len(self._held) >= MAX_HELD:
                    raise RemoteProtocolError(
                        f"more than {MAX_HELD} frames wait for earlier ones", code="bad-state"
                    )
                self._held.append((envelope, typed))  # handled once what it waits for is done
            else:
                self._handle(envelope, typed)
                self._release()  # its round moved on: a frame of a later round may go now
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
        if self._state is State.CLOSED:
            return []
        try:
            if entry is not None and self._rounds.get(entry.round.number) is entry.round:
                entry.apply(outcome)
            self._release()
            return self._flush()
        except RemoteProtocolError as error:
            self._fail(error)
            raise

    def _start_frame_work(self, message: messages.Message) -> None:
        """Hand out the heavy part of a round frame's handling (:meth:`Round.frame_work`) as it arrives;
        the frame then waits for it like for any work its round needs (:meth:`_waits`)."""
        number = getattr(message, "round", None)
        r = None if number is None else self._rounds.get(number)
        if r is None or any(job.round is r and job.kind == message.type for job in self._jobs.values()):
            return
        work = r.frame_work(message)
        if work is not None:
            self._hand_out(r, message.type, work, needed_by=frozenset({message.type}), urgent=True)

    def _waits(self, message: messages.Message, before: list[tuple[wire.Envelope, messages.Message]]) -> bool:
        """Whether a frame must wait: behind a held frame of its round (or of the session), for work of
        its round it needs, or — the messages of :data:`_IN_ORDER` — for earlier rounds, so that rounds
        are stored and committed in order (§13)."""
        number = getattr(message, "round", None)
        if message.type in ("round_start", "error") and before:
            # a held frame may end a round: the window is counted after it, and the peer's error closes
            # the connection only after the frames it sent before it (a keyless round's last frame
            # ends the round here too, rather than leaving it abandoned)
            return True
        if any(getattr(held, "round", None) in (number, None) for _, held in before):
            return True
        r = None if number is None else self._rounds.get(number)
        if r is None:
            return False
        if any(job.round is r and message.type in job.needed_by for job in self._jobs.values()):
            return True
        if message.type not in _IN_ORDER:
            return False
        after = _IN_ORDER[message.type]
        return any(
            e.number < r.number and (after is None or e.state is not after) for e in self._rounds.values()
        )

    def _release(self) -> None:
        """Handle the held frames that need wait no longer, each behind the ones of its round."""
        i = 0
        while i < len(self._held) and self._state is not State.CLOSED:
            envelope, message = self._held[i]
            if self._waits(message, self._held[:i]):
                i += 1
                continue
            del self._held[i]
            self._handle(envelope, message)
            i = 0  # its round moved on: an earlier-held frame may go now

    def _handle(self, envelope: wire.Envelope, message: messages.Message) -> None:
        if isinstance(message, messages.Error):
            self._peer_closed(message)
        number = getattr(message, "round", None)
        if number is not None and number in self._dropped and number not in self._rounds:
            # §13: the peer sent it before it learnt that we dropped that round. §16: a tagged amplify
            # took the next tag slot at the peer, so it takes it here too, unverified: both sides then
            # give the same slot to the next round
            if envelope.tag and message.type == "amplify" and self._dropped[number] == "reserve":
                self._slots += 1
            return
        if envelope.tag and message.type not in _TAGGED:
            raise RemoteProtocolError(f"{message.type} carries no transcript tag", code="bad-message")
        self._frame = envelope
        if isinstance(message, messages.RoundStart):
            started = self._on_round_start(message)
            self._transition("recv:round_start", lambda: self._round_started(started), started)
            return
        if number is None:
            self._transition(f"recv:{message.type}", lambda: self._dispatch(message))
            return
        r = self._rounds.get(number)
        if r is None:  # a round not open is in IDLE (not started, or over)
            raise RemoteProtocolError(
                f"{message.type} is not allowed in state IDLE: round {number} is not open", code="bad-state"
            )
        _record(r.received, envelope.seq, envelope.body)
        self._transition(f"recv:{message.type}", lambda: self._round_message(r, message), r)

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

    @property
    def peer_has_liveness(self) -> bool:
        """Whether the peer's hello listed ``liveness``: keepalives both ways, bounded silence (§13)."""
        return LIVENESS_CAPABILITY in self.peer_capabilities

    @property
    def keepalive_interval(self) -> float | None:
        """After how many seconds without sending a frame :meth:`keepalive` is due (``None``: it may not
        be sent now). With a ``liveness`` peer: after the handshake, in any round state, since the peer
        closes after ``silence_timeout`` without a frame; else only Alice in IDLE with no round open, at
        a quarter of the idle timeout (§13)."""
        if self._state is not State.IDLE:
            return None
        if self.peer_has_liveness:
            return min(self.settings.keepalive_interval, self.settings.idle_timeout / 4)
        if self.role == "alice" and self.peer_takes_keepalive and not self._rounds:
            return self.settings.idle_timeout / 4
        return None

    def keepalive(self) -> list[Action]:
        """Tell the peer we are there, so its timeout does not end a connection that is only waiting
        (and the next handshake need not be paid for); see :attr:`keepalive_interval`."""
        if self.keepalive_interval is None:
            raise LocalProtocolError(f"keepalive: not in state {self.state.value} to this peer")

        def send() -> State:
            self._send("keepalive")
            return State.IDLE

        self._transition("keepalive", send)
        return self._flush()

    def start_round(self) -> list[Action]:
        """Alice: open the next round on the next frame of the link (see :attr:`can_start_round`)."""
        if self.role != "alice":
            raise LocalProtocolError("only Alice starts rounds")
        if not self.can_start_round:
            raise LocalProtocolError(f"start_round is not allowed in state {self.state.value}")
        auth = self._round_auth()
        if auth is None:
            total = self._store.reserve.total_bits
            raise ReserveExhausted(
                f"the key reserve holds {max(0, total - self._pointer)} unused bits, a round needs "
                f"{ROUND_RESERVE_BITS}; the link pauses (set auth.fallback_to_psk to use the PSK instead)"
            )
        number = self._next_round
        r = self._new_round(number, number, auth=auth)

        def start() -> State:
            self._next_round += 1
            self._rounds[number] = r
            self._out.append(ReserveRound(number))
            self._fetch_frame(r)
            return State.SIFTING

        self._transition("start_round", start, r)
        return self._flush()

    def abort_round(self, reason: str, number: int | None = None) -> list[Action]:
        """Abandon round ``number`` (default: the oldest open one), e.g. the link failed, telling the
        peer. Not Bob in COMMITTING (§13): Alice may have committed the round; close instead."""
        r = self._rounds.get(self.round_number if number is None else number)  # type: ignore[arg-type]
        if r is None:
            raise LocalProtocolError("abort_round: no such open round")

        def abort() -> State:
            self._send("abort", round=r.number, reason=reason[:256])
            return self._end_aborted(r, reason)

        self._transition("abort", abort, r)
        self._release()  # frames held for the round's work: now stale
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
        self._close_rounds()
        self._state = State.CLOSED
        return frame

    # -- plumbing

    def _transition(self, on: str, handler: Callable[[], State], r: Round | None = None) -> None:
        """Run ``handler`` for event ``on`` of the session (``r`` None) or of round ``r``, checked against
        the spec's table before and after: a round's states run from IDLE (not started) to IDLE (over)."""
        state = self._state if r is None else r.state
        allowed = self._spec.allowed(self.role, state.value, on)
        if allowed is None:
            if on.startswith("recv:"):
                raise RemoteProtocolError(f"{on[5:]} is not allowed in state {state.value}", code="bad-state")
            raise LocalProtocolError(f"{on} is not allowed in state {state.value}")
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
                f"{self.role} {state.value} --{on}--> {new_state.value} sending {self._sent} and "
                f"persisting {sorted(persisted)} "
                "is not in protocol/qkdp-v2.toml"
            )
        if r is None:
            self._state = new_state
        else:
            r.state = new_state

    def _emit(self, name: str, body: bytes, *, round: int | None = None, tagged: bool = False) -> None:
        tag = b""
        r = None if round is None else self._rounds.get(round)
        if r is not None:
            _record(r.sent, self._frames.send_seq, body)
            if tagged and r.auth == "reserve":
                tag = self._round_tag(r, name)
                r.sent = wc.Transcript(r.mac)  # the next tag covers the frames after this one
        self._sent.append(name)
        self._out.append(Send(self._frames.seal(body, tag), name))

    def _send(self, name: str, *, tagged: bool = False, **fields: Any) -> None:
        self._emit(name, wire.encode_message(name, **fields), round=fields.get("round"), tagged=tagged)

    # -- reserve-based authentication (§16-§17)

    def _reserve_pays_for(self, total: int, rounds: int) -> bool:
        """Whether a reserve of ``total`` bits pays for the tags of ``rounds`` more rounds, after the
        slots given out so far."""
        return (
            total >= self.settings.reserve_switch_bits
            and total - self._pointer >= rounds * ROUND_RESERVE_BITS
        )

    def _mac(self) -> wc.Mac:
        if self._wc is None:
            self._wc = wc.Mac(self._store.reserve.hash_keys())
        return self._wc

    def _round_tag(self, r: Round, message: str) -> bytes:
        """Our tag on round ``r``'s transcript, closed by ``message`` (§16)."""
        if r.sent.length > wc.MAX_TRANSCRIPT_BYTES:
            raise LocalProtocolError("round transcript over the authenticated maximum")
        return r.sent.tag(self._pads(r, message))

    def _pad_position(self, r: Round, message: str) -> int:
        """Where the pad of round ``r``'s tag on ``message`` starts (§16): its ``amplify`` takes the
        session's next tag slot of three pads; ``commit`` and ``committed`` the slot's second and third."""
        if r.slot is None:
            if message != "amplify":
                raise LocalProtocolError(f"{message} of round {r.number} before its amplify")
            r.slot, self._slots = self._slots, self._slots + 1
        return self._hs.pointer + r.slot * ROUND_RESERVE_BITS + _TAGGED.index(message) * wc.OTP_BITS

    def _pads(self, r: Round, message: str) -> list[int]:
        """The pad of round ``r``'s tag on ``message``, consumed durably before anything using it is
        sent."""
        position = self._pad_position(r, message)
        pads = self._store.reserve.pads(position)
        self._out.append(ConsumeReserve(position + wc.OTP_BITS))
        return pads

    def _flush(self) -> list[Action]:
        for r in self._rounds.values():
            if max(r.sent.unabsorbed, r.received.unabsorbed) >= wc.Transcript.CHUNK_BYTES:
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
            self._transition("link_frame", lambda: r.frame_ready(outcome.get()), r)

        self._jobs[job] = _Job(r, "frame", frozenset(), ready)
        self._out.append(FetchFrame(job, self.role, r.frame))

    def _error_frame(self, code: str, message: str) -> bytes:
        body = wire.encode_message(
            "error", code=code, message=message[:1024], versions=list(self.settings.versions)
        )
        return self._frames.seal(body, mac_if_keyed=True)

    def _close_rounds(self) -> None:
        """Close the open rounds' books: remember what became of them (for the driver's log)."""
        if self._rounds:
            self._unfinished = [(r.number, r.pending) for r in self._rounds.values()]
        for r in self._rounds.values():
            r.release()
        self._rounds = {}
        self._held = []

    def _peer_closed(self, message: messages.Error) -> NoReturn:
        """The peer's error frame, once every frame it sent before it is handled: the connection ends."""
        self._close_rounds()
        self._state = State.CLOSED
        raise PeerError(message.code, message.message, list(message.versions))

    def _fail(self, error: RemoteProtocolError) -> None:
        if isinstance(error, PeerError):
            error.actions = self._out  # of the frames handled before the peer's error: still to carry out
        self._out = []
        self._close_rounds()
        if self._state is not State.CLOSED and not isinstance(error, PeerError):
            error.frame = self._error_frame(error.code, str(error))
        self._state = State.CLOSED

    # -- the session's messages (§10–§13); the others are their round's

    def _dispatch(self, message: messages.Message) -> State:
        handler: Callable[[Any], State] = getattr(self, f"_on_{message.type}")
        return handler(message)

    def _round_message(self, r: Round, message: messages.Message) -> State:
        new_state = self._on_abort(r, message) if isinstance(message, messages.Abort) else r.handle(message)
        if r.qber is not None:
            self._last_qber = r.qber
        if new_state is State.IDLE:  # the round is over: committed, or dropped already
            self._forget(r)
        return new_state

    def _on_hello(self, message: messages.Hello) -> State:
        return self._hs.on_hello(message)

    def _on_auth(self, message: messages.Auth) -> State:
        return self._hs.on_auth(message)

    def _on_sync(self, message: messages.Sync) -> State:
        return self._hs.on_sync(message)

    def _on_resolve(self, message: messages.Resolve) -> State:
        return self._hs.on_resolve(message)

    def _on_keepalive(self, message: messages.Keepalive) -> State:
        return State.IDLE

    def _on_abort(self, r: Round, message: messages.Abort) -> State:
        return self._end_aborted(r, f"the peer aborted the round: {message.reason}")

    # -- opening rounds

    def _round_auth(self) -> str | None:
        """How the next round is authenticated (§17): from the reserve once it holds enough bits for it
        and every open round that has no tag slot yet; ``None``: it cannot be."""
        total = self._store.reserve.total_bits
        if self.auth == "reserve" or total >= self.settings.reserve_switch_bits:
            unslotted = sum(r.auth == "reserve" and r.slot is None for r in self._rounds.values())
            if self._reserve_pays_for(total, unslotted + 1):
                return "reserve"
            return self._session_auth() if self.settings.fallback_to_psk else None
        return self.auth  # the bootstrap method: psk or pki

    def _session_auth(self) -> str:
        """A round that takes no pad is authenticated by the connection's frame MACs alone: by the
        bootstrap method, or ``session`` on a connection authenticated by a reserve handshake key."""
        return "session" if self.auth == "reserve" else self.auth

    def _on_round_start(self, message: messages.RoundStart) -> Round:
        """Bob: the round ``round_start`` opens, checked (:meth:`_round_started` opens it)."""
        if self._state is not State.IDLE:
            raise RemoteProtocolError(
                f"round_start is not allowed in state {self.state.value}", code="bad-state"
            )
        number = message.round
        if number < self._next_round:
            raise RemoteProtocolError(f"round {number} was used before (next is {self._next_round})")
        if len(self._rounds) >= self.window:
            raise RemoteProtocolError(
                f"round {number}: {self.window} rounds are open already", code="bad-state"
            )
        # Alice checked that the reserve pays for this round and every earlier one without a slot; Bob
        # checks the weaker condition that it pays for one round after the slots he has seen
        if message.auth == "reserve" and not self._reserve_pays_for(self._store.reserve.total_bits, 1):
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
        return self._new_round(number, message.frame, pulses=message.pulses, auth=message.auth)

    def _round_started(self, r: Round) -> State:
        self._next_round = r.number + 1
        self._out.append(ReserveRound(r.number))
        self._rounds[r.number] = r
        _record(r.received, self._frame.seq, self._frame.body)
        self._fetch_frame(r)
        return State.SIFTING

    def _new_round(self, number: int, frame: int, *, auth: str, **fields: Any) -> Round:
        # a reserve round's hash keys are there: the round was checked to afford it
        mac = self._mac() if auth == "reserve" else None
        return Round(self._host, number, frame, auth=auth, qber_guess=self._last_qber, mac=mac, **fields)

    def _refill(self, bound: int) -> int:
        """Alice: how many leading output bits go to the key reserve (§17); Bob takes her word."""
        available = self._store.reserve.total_bits - self._pointer
        return policy.reserve_refill(
            bound,
            available,
            self.settings.reserve_bits_per_round,
            self.settings.reserve_target_bits,
            self.settings.key_block_bits,
        )

    def _forget(self, r: Round) -> None:
        """Round ``r`` is over: no longer open, and its memory released."""
        self._rounds.pop(r.number, None)
        self._ended_one = True
        r.release()

    def _end_aborted(self, r: Round, reason: str, *, record: bool = True) -> State:
        """Drop round ``r``; ``record``: store its figures as aborted (which drops a pending round)."""
        if record:
            self._out.append(RoundEnded(r.summary(reason), "aborted"))
        self._forget(r)
        self._dropped[r.number] = r.auth
        while len(self._dropped) > DROPPED_KEPT:
            del self._dropped[next(iter(self._dropped))]
        return State.IDLE


def _record(transcript: wc.Transcript, seq: int, body: bytes) -> None:
    """Append one frame to a round transcript (§16): 8-byte seq, 4-byte body length, body."""
    transcript.append(seq.to_bytes(8, "big") + len(body).to_bytes(4, "big"))
    transcript.append(bytes(body))


class PeerError(RemoteProtocolError):
    """The peer sent an error frame; we close without answering."""

    def __init__(self, code: str, message: str, versions: list[int]) -> None:
        super().__init__(f"the peer closed the connection: {code}: {message[:200]}", code=code)
        self.versions = versions
        self.actions: list[Action] = []  # what the frames before the error frame asked for
