"""The daemon: a thin trio shell around the engine (sockets, timers, reconnects, signals, systemd).

Theory of operation
-------------------
* Bob (or whichever side has ``network.listen``) accepts connections; Alice (``network.peer``) connects,
  and reconnects after any failure with capped exponential backoff and jitter.
* Each connection gets a fresh :class:`~qkdd.engine.Engine`. One task reads, feeds complete frames to the
  engine and carries out its actions in order: frames are written, rounds reserved, keys stored or
  committed in the SQLite store before the next frame goes out. CPU-heavy steps run in a worker thread so
  the event loop keeps serving other connections and the systemd watchdog.
* Every wait for the peer has a deadline: the engine's timeout for its state, renewed by each complete
  frame. A disconnect, timeout or protocol error ends the connection; the round under way is abandoned
  and nothing of it is stored (a round Bob holds as pending is resolved on the next connection, §13).
* A connection that authenticates replaces the previous authenticated one (a peer that restarted).
* SIGTERM/SIGINT: stop starting rounds, let the round under way finish within ``timeouts.shutdown_grace``
  seconds, then close with an error frame ``shutdown``.
* Logs go to stderr, one line per notable event and one per round, never key material.
* ``qkdd status`` asks the daemon on its control socket (:mod:`qkdd.control`); the daemon tells a
  :class:`~qkdd.monitor.Monitor` the link's state and why, and each round's end, and the monitor feeds the
  Prometheus metrics (:mod:`qkdd.metrics`) when ``[metrics]`` is set. ``status.json`` is written once,
  as the daemon stops, with when and why.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import gc
import itertools
import logging
import math
import os
import random
import resource
import signal
import socket
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from qkdd import background, control, monitor, policy, wire
from qkdd import engine as engine_mod
from qkdd import metrics as metrics_mod
from qkdd.admin import write_status_file
from qkdd.auth import pki
from qkdd.auth.psk import fingerprint, read_psk
from qkdd.bits import SystemRandom
from qkdd.config import Config
from qkdd.delivery.channel import KeyChannel, is_key_message
from qkdd.delivery.http import ApiServer
from qkdd.delivery.kme import KeyManager
from qkdd.errors import InputError, QkddError, RemoteProtocolError, operational_problem
from qkdd.links import open_link
from qkdd.records import RoundSummary
from qkdd.sdnotify import Notifier
from qkdd.stages import amplify, cascade, sifting
from qkdd.statelock import lock_state_dir
from qkdd.store import KeyStore

log = logging.getLogger("qkdd")
LISTEN_FILE = "listen-address"
ETSI014_FILE = "etsi014-address"  # where the key delivery API listens (an ephemeral port is resolved)
METRICS_FILE = "metrics-address"  # where /metrics is served (likewise)
MAX_HANDSHAKES = 512
"""Connections held in the handshake at once; a new one closes the oldest (I5: idle sockets cannot keep
the peer out, and one that reopens each closed socket must churn through all of them to reach the
peer's)."""
HANDSHAKE_FRAME_BYTES = 1 << 16
"""The largest frame taken before the handshake is over: a hello or an auth with a PKI certificate."""
REFUSAL_LOG_SECONDS = 60.0
"""At most one log line per this many seconds about closed or refused connections (I5)."""
PAUSE_RETRY_SECONDS = 5.0
ROUNDS_SIZING = 16  # the last rounds of the store whose largest sizes a round's room under max_key_count
STORE_FULL_RETRY_SECONDS = 1.0  # how soon rounds resume once applications took keys from a full store
STORE_FULL_LOG_SECONDS = 600.0
"""A full key store pauses and resumes the link about once a round while applications take keys slower
than the link makes them: its pause and resume are logged at INFO once per this many seconds."""
READ_SIZE = 1 << 16
TCP_KEEPALIVE_SECONDS = 2  # idle time before the first probe, and between probes
TCP_KEEPALIVE_PROBES = 3
T = TypeVar("T")


def format_summary(summary: RoundSummary, disposition: str, seconds: float, stages: str = "") -> str:
    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    text = (
        f"round {summary.round} {disposition}: pulses={summary.pulses} detections={summary.detections} "
        f"sifted={summary.sifted_bits} qber={rate(summary.qber)} phase_error={rate(summary.phase_error)} "
        f"disclosed={summary.disclosed_bits} secret={summary.secret_bits} seconds={seconds:.3f} "
        f"auth={summary.auth}"
    )
    text += f" stages={stages}" if stages else ""
    return text + (f" reason={summary.reason!r}" if summary.reason else "")


class RoundClock:
    """Where one round's time goes at this side: for each engine state, the seconds spent in it (waiting
    for the peer included) and, of those, the seconds this side's engine computed."""

    def __init__(self, state: str, now: float) -> None:
        self.started = now
        self.state, self.since = state, now
        self.wall: dict[str, float] = {}
        self.busy: dict[str, float] = {}

    def computed(self, state: str, seconds: float) -> None:
        self.busy[state] = self.busy.get(state, 0.0) + seconds

    def enter(self, state: str, now: float) -> None:
        """The engine is in ``state`` as of ``now`` (a no-op when it already was)."""
        if state != self.state:
            self.wall[self.state] = self.wall.get(self.state, 0.0) + now - self.since
            self.state, self.since = state, now

    def walls(self, now: float) -> dict[str, float]:
        """The seconds spent in each state the round went through, in order, as of ``now``."""
        wall = dict(self.wall)
        wall[self.state] = wall.get(self.state, 0.0) + now - self.since
        return wall

    def format(self, now: float) -> str:
        """``state:wall/busy`` for each state the round went through, in order, lower case."""
        return ",".join(
            f"{state.lower()}:{seconds:.3f}/{self.busy.get(state, 0.0):.3f}"
            for state, seconds in self.walls(now).items()
        )


def credentials(config: Config) -> tuple[bytes, pki.Identity | None]:
    """The bootstrap secrets a config names: the PSK (empty without one) and the PKI identity."""
    psk = read_psk(config.psk_file) if config.psk_file is not None else b""
    identity = (
        pki.Identity.load(config.pki.certificate, config.pki.key, config.pki.ca, config.pki.peer_name)
        if config.pki is not None
        else None
    )
    return psk, identity


def engine_settings(
    config: Config, psk: bytes, identity: pki.Identity | None, *, key_channel: bool = False
) -> engine_mod.EngineSettings:
    """The engine's settings from a config (shared by the daemon and ``qkdd conform``)."""
    return engine_mod.EngineSettings(
        link_id=config.link_id,
        psk=psk,
        pki=identity,
        # [post] and the reserve keys of [auth] are named as the engine's settings
        **dataclasses.asdict(config.post),
        **dataclasses.asdict(config.auth),
        handshake_timeout=config.timeouts.handshake,
        round_timeout=config.timeouts.round,
        idle_timeout=config.timeouts.idle,
        key_channel=key_channel,
        window=config.window,
    )


@dataclass(eq=False)  # compared and hashed by identity
class _Session:
    peer: str
    stream: trio.abc.Stream
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    engine: engine_mod.Engine | None = None
    unsent: bool = False  # frames the engine produced that are not all written yet
    send_lock: trio.Lock = field(default_factory=trio.Lock)  # rounds and the key channel share the stream
    key_channel: KeyChannel | None = None
    keys_ready: trio.Event = field(default_factory=trio.Event)  # the handshake is over (§19)
    last_sent: float = -math.inf  # when our last round-channel frame went out (trio clock)
    # Alice: no round starts before this (a pause); meanwhile the loop reads frames and sends keepalives
    resume_at: float = -math.inf
    rested: bool = False  # Alice: run.round_pause has passed since her last round started
    # from any thread: hand the outcome of work the engine handed out back to the session's loop
    hand_back: Callable[[int, engine_mod.Outcome], None] = lambda job, outcome: None
    # the peer's end of the stream came: the session ends once no frame it sent waits for our work
    peer_gone: bool = False
    # an item the loop took from the frame channel early (it may be None, the end): the next to handle
    put_back: list[Any] = field(default_factory=list)
    # the link frames the engine asked for, fetched one at a time in the order asked (_fetch_frames)
    fetches: trio.MemorySendChannel[engine_mod.FetchFrame] | None = None
    # Alice: when she sent each open round's estimate_answer, and the latest round trips seen from such
    # an answer to the round's first Cascade request (the peer's work on it included)
    answered: dict[int, float] = field(default_factory=dict)
    round_trips: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=64))

    async def write(self, frame: bytes) -> None:
        try:
            self.send_lock.acquire_nowait()  # the usual case: no scheduler pass just for the lock
        except trio.WouldBlock:
            await self.send_lock.acquire()
        try:
            await self.stream.send_all(frame)
        finally:
            self.send_lock.release()

    async def write_quietly(self, frame: bytes) -> None:
        """Best effort, for the closing error frame: a broken or slow stream is given up after 1 s."""
        with trio.move_on_after(1.0):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.write(frame)


class Daemon:
    """One qkdd daemon (either role)."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.role = config.role
        self.psk, self.pki = credentials(config)
        self.link = open_link(config.link_backend, config.role, config.link_options)
        self.store = KeyStore(config.state_dir, config.link_id)
        self.notifier = notifier or Notifier()
        # Compute work: as many threads as cores, at least two (rounds in flight hand out work at once)
        self._background = background.executor("qkdd-compute", workers=max(2, os.cpu_count() or 1))
        self._urgent = background.executor("qkdd-urgent", lower=False)  # Compute(urgent=True)
        self.metrics = (
            metrics_mod.Metrics(config.role, config.link_id) if config.metrics is not None else None
        )
        self.monitor = monitor.Monitor(config.role, metrics=self.metrics)
        self.kme: KeyManager | None = None
        self.api: ApiServer | None = None
        if config.etsi014 is not None:
            ledger = self.store.ledger(config.role)
            self.kme = KeyManager(config.role, config.etsi014, ledger, self._store_call)
            observe = self.metrics.etsi014_request if self.metrics is not None else None
            self.api = ApiServer(self.kme, config.etsi014, observe)
        self.settings = engine_settings(config, self.psk, self.pki, key_channel=self.kme is not None)
        self.rounds_finished = 0
        self.stopping = False
        self.stop_reason: str | None = None
        self.paused = False
        self._rounds_started: set[int] = set()
        self._stop = trio.Event()
        self._store_lock = trio.Lock()
        self._store_thread = background.SerialThread("qkdd-store")  # the store's calls, one at a time
        self._active: _Session | None = None
        self._handshaking: dict[_Session, None] = {}  # connections in the handshake, oldest first
        self._refusals = _RateLimitedLog(REFUSAL_LOG_SECONDS)
        # Alice: unused reserve bits after the last committed round, and where she last waited for it
        self._available_after_commit: int | None = None
        # the most key bits a recent round committed: the room under etsi014.max_key_count a round needs
        self._round_key_bits = max(
            (r["secret_bits"] for r in self.store.rounds(ROUNDS_SIZING) if r["state"] == "committed"),
            default=0,
        )
        self._waited_at: int | None = None
        # rounds in a row whose error rates say the two sides' bits are unrelated, and Alice's last wait
        self._unrelated_streak = 0
        self._unrelated_waited = 0
        self._store_full_said = -math.inf  # when a full key store's pause was last logged at INFO
        self._store_full_level_said = logging.INFO  # the level of the last such pause (its resume's too)
        self._clocks: dict[int, RoundClock] = {}  # the open rounds' clocks, by round number
        self._round_idle = trio.Event()
        self._round_idle.set()
        self.listen_port: int | None = None

    # -- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`request_stop` (or ``run.max_rounds``), then stop within the grace period."""
        self.monitor.start(trio.current_time())
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(control.serve, self.config.state_dir, self._control)
                if self.config.listen is not None:
                    listeners = await trio.open_tcp_listeners(
                        self.config.listen.port, host=self.config.listen.host
                    )
                    sockname = listeners[0].socket.getsockname()
                    self.listen_port = int(sockname[1])
                    self._write_address_file(LISTEN_FILE, sockname[0], self.listen_port)
                    log.info("%s listening on %s:%d", self.role, sockname[0], self.listen_port)
                    nursery.start_soon(trio.serve_listeners, self._accept, listeners)
                else:
                    nursery.start_soon(self._connect_loop)
                if self.kme is not None:
                    nursery.start_soon(self.kme.run)
                if self.api is not None:
                    port = await nursery.start(self.api.serve)
                    if self.api.settings.listen is not None:  # HTTPS, not only the Unix socket
                        self._write_address_file(ETSI014_FILE, self.api.settings.listen.host, port)
                if self.metrics is not None:
                    assert self.config.metrics is not None
                    port = await nursery.start(
                        metrics_mod.serve, self.metrics, self.config.metrics, self._refresh_metrics
                    )
                    self._write_address_file(METRICS_FILE, self.config.metrics.host, port)
                if self.notifier.watchdog_seconds:
                    nursery.start_soon(self._watchdog)
                nursery.start_soon(self._warm_up)
                self.notifier.ready(f"{self.role} of link {self.config.link_id}")
                self._status(
                    f"down: connecting to {self.config.peer}"
                    if self.config.listen is None
                    else "down: waiting for the peer to connect"
                )
                task_status.started(self.listen_port)
                await self._stop.wait()
                self.notifier.stopping()
                with trio.move_on_after(self.config.timeouts.shutdown_grace):
                    await self._round_idle.wait()
                nursery.cancel_scope.cancel()
        except BaseException as error:
            leaves = _leaves(error)
            failure = leaves[0] if len(leaves) == 1 else error  # the one failure a nursery wrapped
            self.stop_reason = self.stop_reason or f"{type(failure).__name__}: {str(failure)[:200]}"
            raise
        finally:
            self._status("stopped")
            self._write_stop_file()
            self._store_thread.close()
            self.store.close()
            log.info("%s stopped after %d rounds", self.role, self.rounds_finished)

    def request_stop(self, why: str) -> None:
        if not self.stopping:
            log.info("stopping: %s", why)
            self.stop_reason = why
        self.stopping = True
        self._stop.set()

    async def _watchdog(self) -> None:
        assert self.notifier.watchdog_seconds
        while True:
            self.notifier.watchdog()
            await trio.sleep(self.notifier.watchdog_seconds / 2)

    def _write_address_file(self, name: str, host: str, port: int) -> None:
        path = self.config.state_dir / name
        temporary = path.with_suffix(".tmp")
        temporary.write_text(f"{host}:{port}\n")
        temporary.replace(path)

    # -- connections

    async def _accept(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        keep_tcp_alive(stream)
        if self.stopping:
            self._refusals.note(f"refused a connection from {peer}: stopping")
            await stream.aclose()
            return
        await self._session(stream, peer)

    async def _connect_loop(self) -> None:
        assert self.config.peer is not None
        delay = 0.1
        while not self.stopping:
            try:
                stream = await trio.open_tcp_stream(self.config.peer.host, self.config.peer.port)
            except OSError as error:
                why = connect_failure(error)
                self._status(f"down: cannot connect to {self.config.peer}: {why}")
                log.info("cannot connect to %s: %s; retrying in %.1f s", self.config.peer, why, delay)
            else:
                peer = _peer_name(stream)
                keep_tcp_alive(stream)
                log.info("connected to %s", peer)
                reached_ready = await self._session(stream, peer)
                if reached_ready:
                    delay = 0.1
                if self.stopping:
                    return
            # capped exponential backoff with full jitter
            await trio.sleep(random.uniform(0.5, 1.0) * delay)
            delay = min(delay * 2, self.config.timeouts.reconnect_max)

    async def serve_connection(self, stream: trio.abc.Stream, peer: str) -> bool:
        """Run one connection over ``stream`` (a socket, or a memory stream in tests) to its end, as
        either role; returns whether it got past the handshake."""
        return await self._session(stream, peer)

    async def _session(self, stream: trio.abc.Stream, peer: str) -> bool:
        """Run one connection to its end; returns whether it got past the handshake."""
        session = _Session(peer, stream)
        engine = engine_mod.Engine(
            self.role, self.settings, info=self.link.info, store=self.store, random=SystemRandom()
        )
        session.engine = engine
        ready = False
        ended = f"the connection with {peer} ended"  # why, for the status once it is over
        if len(self._handshaking) >= MAX_HANDSHAKES:
            # the oldest connection still in the handshake goes: whoever holds sockets open without
            # authenticating can never keep a new one (the real peer's) out
            oldest = next(iter(self._handshaking))
            del self._handshaking[oldest]
            oldest.cancel_scope.cancel()
            self._refusals.note(f"closed a connection from {oldest.peer} still in the handshake: too many")
        self._handshaking[session] = None
        # the reader hands round frames over here (a few at most: rounds run in lockstep) and handles
        # key-channel frames itself, so key delivery never waits for a round's heavy step
        frames_in, frames = trio.open_memory_channel[Any](16)
        async with trio.open_nursery() as nursery:
            session.hand_back = _hand_back(nursery, frames_in.clone())
            session.fetches, fetches = trio.open_memory_channel[engine_mod.FetchFrame](math.inf)
            nursery.start_soon(self._fetch_frames, session, fetches)
            try:
                with session.cancel_scope:
                    await self._execute(session, engine.initiate())
                    nursery.start_soon(self._read, session, frames_in)
                    deadline = _deadline(engine.timeout)
                    while True:
                        if session.peer_gone and not engine.holds_frames:
                            ended = f"{peer} closed the connection"
                            log.info("%s closed the connection%s", peer, _abandoned(engine))
                            return ready
                        if (
                            engine.state is engine_mod.State.IDLE
                            and not engine.round_states
                            and self.role == "alice"
                            and not session.peer_gone
                            and (self.stopping or not self._max_rounds_reached() or self._all_done())
                            and (self.stopping or trio.current_time() >= session.resume_at)
                            and not session.put_back
                        ):
                            if self.stopping or self._all_done():
                                ended = "stopping" if self.stopping else "all rounds done"
                                await session.write_quietly(engine.close("shutdown", "no more rounds"))
                                if self._all_done():
                                    self.request_stop("all rounds done")
                                return ready
                            if self.config.round_pause and not session.rested:
                                session.rested = True
                                self._pause(session, self.config.round_pause)
                                continue
                            if self.kme is not None and await self._store_call(
                                self.kme.store_full, self._round_key_bits
                            ):
                                if not self.paused:
                                    self._status("paused: key store full", session.peer)
                                    log.log(
                                        self._store_full_level(),
                                        "link paused: the key store holds etsi014.max_key_count (%d) keys; "
                                        "rounds resume as applications take keys",
                                        self.kme.settings.max_key_count,
                                        extra={"role": self.role},
                                    )
                                self.paused = True
                                self._pause(session, STORE_FULL_RETRY_SECONDS)
                                continue
                            if await self._wait_after_lost_rounds(session, engine):
                                continue
                            if self._wait_after_unrelated_rounds(session):
                                continue
                            try:
                                actions = await self._step(session, engine.start_round, thread=False)
                            except engine_mod.ReserveExhausted as exhausted:
                                if not self.paused:
                                    self._status("paused: key reserve exhausted", session.peer)
                                    log.warning("link paused: %s", exhausted, extra={"role": self.role})
                                self.paused = True
                                self._pause(session, PAUSE_RETRY_SECONDS)
                                continue
                            if self.paused:
                                full = self.monitor.reason == "key store full"
                                level = self._store_full_level_said if full else logging.INFO
                                self._status("up", session.peer)
                                log.log(level, "link resumed", extra={"role": self.role})
                            self.paused = False
                            session.rested = False
                            await self._execute(session, actions)
                            deadline = _deadline(engine.timeout)
                            continue
                        if not session.peer_gone and await self._start_in_flight(session, engine):
                            deadline = _deadline(engine.timeout)
                            continue
                        item: Any = None
                        wake = min(deadline, self._keepalive_due(session, engine), _later(session.resume_at))
                        with trio.move_on_at(wake) as waiting:
                            item = session.put_back.pop() if session.put_back else await frames.receive()
                        if waiting.cancelled_caught and trio.current_time() < deadline:
                            await self._keep_alive(session, engine)  # or a pause is over
                            continue
                        if waiting.cancelled_caught:
                            ended = f"nothing from {peer} in state {engine.state.value} within its timeout"
                            self._warn(
                                session,
                                f"{peer}: no frame in state {engine.state.value} within its timeout"
                                f"{_abandoned(engine)}",
                            )
                            await session.write_quietly(
                                engine.close("timeout", f"nothing received in {engine.state.value}")
                            )
                            return ready
                        if isinstance(item, Exception):
                            raise item
                        if item is None:
                            session.peer_gone = True  # (the loop's first check ends the session)
                            continue
                        handled, asked = None, None
                        if isinstance(item, _Done):  # work the engine handed out is back
                            actions = await self._step(
                                session,
                                engine.completed,
                                item.job,
                                item.outcome,
                                thread=not engine.cheap_completion,
                                round=engine.round_of_job(item.job),
                            )
                        else:
                            envelope, message, handled = item
                            asked = self._round_trip(session, engine, message)
                            actions = await self._step(
                                session,
                                engine.receive_frame,
                                envelope,
                                message,
                                thread=not engine.cheap(message),
                                round=None if message is None else message.fields.get("round"),
                            )
                            if engine.cheap(message):
                                actions += await self._cheap_frames_waiting(session, frames)
                        if any(isinstance(a, engine_mod.Ready) for a in actions):
                            ready = True
                            self._handshaking.pop(session, None)
                            await self._become_active(session)
                        await self._execute(session, _to_peer(actions, session.peer_gone))
                        if asked is not None:
                            session.answered[asked] = trio.current_time()
                        if handled is not None:
                            handled.set()
                        deadline = _deadline(engine.timeout)
                        if self.role == "bob" and self._all_done() and not engine.round_states:
                            self.request_stop("all rounds done")
            except RemoteProtocolError as error:
                ended = f"protocol error {error.code} with {peer}: {error}"
                if isinstance(error, engine_mod.PeerError) and error.actions:
                    # what the peer's frames before its error asked for (a keyless round's end)
                    await self._execute(session, _to_peer(error.actions, peer_gone=True))
                    if self.role == "bob" and self._all_done():
                        self.request_stop("all rounds done")
                await self._protocol_error(session, error)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                ended = f"connection with {peer} lost"
                log.info("%s: connection lost (%s)%s", peer, type(error).__name__, _abandoned(engine))
            except Exception as error:  # a failing link backend or store, or our bug: this connection ends
                problem = operational_problem(error)
                if problem is not None:  # the host's to fix (a full disk, a permission): no traceback
                    ended = problem
                    log.error("%s: %s; closing the connection%s", peer, problem, _abandoned(engine))
                else:
                    ended = f"internal error: {type(error).__name__}: {str(error)[:200]}"
                    log.error(
                        "%s: internal error (%s: %s); closing the connection%s",
                        peer,
                        type(error).__name__,
                        str(error)[:200],
                        _abandoned(engine),
                        exc_info=not isinstance(error, QkddError),
                    )
                if engine.state is not engine_mod.State.CLOSED:
                    await session.write_quietly(engine.close("internal", "internal error"))
            finally:
                nursery.cancel_scope.cancel()
                if self.kme is not None and session.key_channel is not None:
                    self.kme.detach(session.key_channel)
                self._handshaking.pop(session, None)
                if self._active is session:
                    self._active = None
                    self._status(f"down: {ended}")
                    self._clocks.clear()
                elif self._active is None and not self.paused and not self.stopping:
                    self._status(f"down: {ended}")  # a connection that never came up: say why
                self._round_idle.set()
                with trio.CancelScope(shield=True):
                    # the closing frame's sequence number is only right if every frame before it went out
                    if self.stopping and engine.state is not engine_mod.State.CLOSED and not session.unsent:
                        await session.write_quietly(engine.close("shutdown", "the daemon is stopping"))
                    await stream.aclose()
        return ready

    async def _read(self, session: _Session, frames: trio.MemorySendChannel[Any]) -> None:
        """Read frames; pass round frames on, handle key-channel frames here. Every failure (and the end
        of the stream, as ``None``) goes to the session's main loop, which owns the error handling."""
        # before the handshake is over only handshake-sized frames: a stranger cannot make us buffer more
        decoder = wire.FrameDecoder(min(HANDSHAKE_FRAME_BYTES, self.config.max_frame_bytes))
        try:
            while True:
                data = await session.stream.receive_some(READ_SIZE)
                if not data:
                    decoder.check_eof()
                    await frames.send(None)
                    return
                for payload in decoder.feed(data):
                    envelope = wire.decode_envelope(payload)
                    if not session.keys_ready.is_set():
                        # before the handshake every frame is the engine's, one at a time: nothing is
                        # routed by a type no one has authenticated, and the frame after the last one of
                        # the handshake is routed only once the handshake is over
                        handled = trio.Event()
                        await frames.send((envelope, None, handled))
                        await handled.wait()
                        if session.keys_ready.is_set():
                            decoder.max_frame_bytes = self.config.max_frame_bytes
                        continue
                    message = wire.decode_message(envelope.body)
                    if is_key_message(message):
                        await self._key_frame(session, envelope, message)
                    else:
                        await frames.send((envelope, message, None))
        except Exception as error:
            await frames.send(error)

    async def _key_frame(self, session: _Session, envelope: wire.Envelope, message: wire.Message) -> None:
        if session.key_channel is None or self.kme is None:
            raise RemoteProtocolError("the key channel was not negotiated", code="bad-state")
        await self.kme.receive(session.key_channel.receive(envelope, message))

    async def _protocol_error(self, session: _Session, error: RemoteProtocolError) -> None:
        engine, peer = session.engine, session.peer
        assert engine is not None
        frame = error.frame if error.frame is not None else None
        if frame is None and engine.state is not engine_mod.State.CLOSED:
            frame = engine.close(error.code, str(error))
        level = logging.INFO if error.code == "shutdown" else logging.WARNING
        advice = _NO_AUTHENTICATION.get(error.code)
        if advice is not None:
            # no way to authenticate: say so once, keep trying quietly (the peer may refill, a man in
            # the middle may go away); never exit on what a peer or the network says (I3)
            status, text = advice
            level = logging.INFO if self.paused else logging.WARNING
            self._status(status, peer)
            if not self.paused:
                log.warning("link paused: %s", text, extra={"role": self.role})
            self.paused = True
        text = f"{peer}: protocol error {error.code}: {error}{_abandoned(engine)}"
        if error.code == "auth-failed":
            text += f"; {self._auth_failed_advice(engine.auth)}"
        if level == logging.WARNING:
            self._warn(session, text)
        else:
            log.log(level, "%s", text)
        if frame is not None:
            await session.write_quietly(frame)

    def _auth_failed_advice(self, auth: str | None) -> str:
        """What an operator checks when the peer's proof (or ours, at the peer) does not verify."""
        if auth == "psk":
            return (
                f"the two hosts hold different PSKs: this side's PSK fingerprint is {fingerprint(self.psk)} "
                "(`qkdd check` shows each host's; copy one PSK file to both), or the connection was "
                "tampered with"
            )
        if auth == "reserve":
            return (
                "the handshake key from the key reserve differs: one state directory is older than the "
                "other's (restored from a backup), or the connection was tampered with"
            )
        return "check both hosts' certificates and auth.peer_name (the reason above says which check failed)"

    async def _wait_after_lost_rounds(self, session: _Session, engine: engine_mod.Engine) -> bool:
        """Alice, before a round: if rounds keep spending pads without committing while the reserve is
        low, wait as :func:`policy.lost_round_delay` says (once per loss). Whether she waited."""
        available = (await self._store_call(self.store.reserve.status)).available_bits
        if self._available_after_commit is None or available > self._available_after_commit:
            self._available_after_commit = available
        delay = policy.lost_round_delay(
            available,
            self._available_after_commit,
            self.config.auth.reserve_target_bits,
            engine_mod.ROUND_RESERVE_BITS,
        )
        if delay <= 0 or available == self._waited_at:
            return False
        self._waited_at = available
        self._status(f"paused: rounds are cut after their tags; next round in {delay:.0f} s", session.peer)
        log.warning(
            "rounds keep spending key reserve without committing (%d bits left): the next round waits "
            "%.0f s (a man in the middle cutting rounds, or a failing link)",
            available,
            delay,
            extra={"role": self.role},
        )
        self.paused = True
        self._pause(session, delay)
        return True

    def _store_full_level(self) -> int:
        """INFO for the first pause on a full key store in :data:`STORE_FULL_LOG_SECONDS` (and for the
        resume after it), DEBUG for the rest: the state is in ``qkdd status`` and the metrics anyway."""
        now = trio.current_time()
        self._store_full_level_said = logging.DEBUG
        if now - self._store_full_said >= STORE_FULL_LOG_SECONDS:
            self._store_full_said, self._store_full_level_said = now, logging.INFO
        return self._store_full_level_said

    def _count_unrelated(self, summary: RoundSummary, disposition: str) -> None:
        """Count rounds in a row near 1/2 error, and say once per streak what that usually means."""
        if disposition != "aborted" or not policy.unrelated(summary.qber, summary.phase_error):
            self._unrelated_streak = 0
            return
        self._unrelated_streak += 1
        if self._unrelated_streak == policy.UNRELATED_ROUNDS:
            log.warning(
                "%d rounds in a row at about 50%% error (the last: QBER %s, phase error %s): the two sides' "
                "bits are unrelated, which a mismatched link configuration gives (the sim's [link.sim] "
                "seed, or the hardware's timing and basis settings must match on both hosts), not a "
                "working link%s",
                self._unrelated_streak,
                "-" if summary.qber is None else f"{100 * summary.qber:.1f}%",
                "-" if summary.phase_error is None else f"{100 * summary.phase_error:.1f}%",
                "; Alice backs off between rounds until one is not" if self.role == "alice" else "",
                extra={"role": self.role},
            )

    def _wait_after_unrelated_rounds(self, session: _Session) -> bool:
        """Alice, before a round: after rounds in a row near 1/2 error, wait as
        :func:`policy.unrelated_delay` says (once per such round). Whether she waited."""
        delay = policy.unrelated_delay(self._unrelated_streak)
        if delay <= 0 or self._unrelated_waited == self._unrelated_streak:
            return False
        self._unrelated_waited = self._unrelated_streak
        self._status(
            f"paused: rounds at about 50% error (link configurations differ?); next round in {delay:.0f} s",
            session.peer,
        )
        log.info("next round in %.0f s (rounds at about 50%% error)", delay, extra={"role": self.role})
        self.paused = True
        self._pause(session, delay)
        return True

    def _warn(self, session: _Session, text: str) -> None:
        """A WARNING about a connection; rate-limited while it never authenticated, since anyone can
        open such connections (I5)."""
        if session.keys_ready.is_set():
            log.warning("%s", text)
        else:
            self._refusals.note(text)

    async def _become_active(self, session: _Session) -> None:
        old = self._active
        self._active = session
        if old is not None:
            log.info(
                "a new authenticated connection from %s replaces the one from %s", session.peer, old.peer
            )
            old.cancel_scope.cancel()
        log.info(
            "link %s up with %s (qkdp/%s, auth %s)",
            self.config.link_id,
            session.peer,
            session.engine.version if session.engine else "?",
            session.engine.auth if session.engine else "?",
        )
        # "up" until this connection finds a reason to pause (a full key store says so again at once)
        self.paused = False
        self._status("up", session.peer)

    def _status(self, link: str, peer: str | None = None) -> None:
        """The link's state for ``qkdd status`` and the metrics: ``up``, ``down``, ``paused`` or
        ``stopped``, then optionally ``": "`` and the reason."""
        self.monitor.set_link(link, peer)

    async def _control(self, request: str) -> dict[str, Any]:
        """The answer to a control socket request (:mod:`qkdd.control`): the status snapshot."""
        del request  # "status" is the only one
        figures = await self._store_call(monitor.store_figures, self.store, self.role)
        answer = {
            **self.monitor.snapshot(trio.current_time()),
            "state_dir": str(self.config.state_dir),
            **figures,
        }
        if self.psk:
            answer["psk_fingerprint"] = fingerprint(self.psk)
        if self.kme is not None:
            answer["delivery_stored_keys"] = await self._store_call(self.kme.stored_keys)
        session = self._active
        if session is not None and session.engine is not None and session.engine.window:
            # the connection's window, and (Alice) the round trip she measured and the rounds she keeps
            # open for it (policy.rounds_to_open)
            answer["window"] = session.engine.window
            answer["rounds_open"] = len(session.engine.round_states)
            if self.role == "alice":
                answer["rounds_open_limit"] = session.engine.open_limit
                trips = session.round_trips
                answer["round_trip_ms"] = round(1e3 * min(trips), 2) if trips else None
        return answer

    async def _refresh_metrics(self, metrics: metrics_mod.Metrics) -> None:
        metrics.store(await self._store_call(monitor.delivery_figures, self.store, self.role))

    def _write_stop_file(self) -> None:
        """``status.json``: when and why this daemon stopped, for ``qkdd status`` once it is gone."""
        try:
            write_status_file(self.config.state_dir, role=self.role, reason=self.stop_reason)
        except OSError as error:
            log.warning("cannot write the status file: %s", error.strerror)

    async def _cheap_frames_waiting(
        self, session: _Session, frames: trio.MemoryReceiveChannel[Any]
    ) -> list[Any]:
        """The actions of the cheap frames (Cascade's) already waiting after a cheap one, handled now, so
        that the answers to a whole flight leave in one write. Stops at the first item that is not one
        (it is put back first in line)."""
        engine = session.engine
        assert engine is not None
        actions: list[Any] = []
        while True:
            try:
                item = frames.receive_nowait()
            except trio.WouldBlock:
                return actions
            if not (isinstance(item, tuple) and item[2] is None and engine.cheap(item[1])):
                session.put_back.append(item)
                return actions
            envelope, message, _ = item
            actions += await self._step(
                session,
                engine.receive_frame,
                envelope,
                message,
                thread=False,
                round=message.fields.get("round"),
            )

    async def _start_in_flight(self, session: _Session, engine: engine_mod.Engine) -> bool:
        """Alice, with rounds open: open one more when the window has room (:attr:`Engine.can_start_round`)
        and nothing holds rounds back (a stop, a pause, the rounds asked for, a full key store). The
        pauses themselves happen between rounds, when none is open. Whether she opened one."""
        if (
            self.role != "alice"
            or not engine.round_states
            or not engine.can_start_round
            or self.stopping
            or self.paused
            or self.config.round_pause
            or policy.unrelated_delay(self._unrelated_streak) > 0
            or (0 < self.config.max_rounds <= self.rounds_finished + len(engine.round_states))
            or (
                self.kme is not None
                and await self._store_call(
                    self.kme.store_full, self._round_key_bits * (len(engine.round_states) + 1)
                )
            )
        ):
            return False
        try:
            actions = await self._step(session, engine.start_round, thread=False)
        except engine_mod.ReserveExhausted:
            return False  # the open rounds go on; the pause comes once none is open
        await self._execute(session, actions)
        return True

    def _max_rounds_reached(self) -> bool:
        return 0 < self.config.max_rounds <= self.rounds_finished

    def _all_done(self) -> bool:
        """The rounds asked for have run and nothing else keeps the daemon: with key delivery it goes on
        serving keys (Alice then waits in IDLE for frames instead of starting rounds)."""
        return self._max_rounds_reached() and self.kme is None

    async def _warm_up(self) -> None:
        """Load the link's kernels (a backend may offer ``warm_up``), sifting's and Cascade's, and compile
        privacy amplification's (or load its FFT) while the first connection is set up, not inside the
        first round."""
        try:
            link_warm_up = getattr(self.link, "warm_up", None)
            if link_warm_up is not None:
                await trio.to_thread.run_sync(link_warm_up)
            await trio.to_thread.run_sync(sifting.warm_up)
            await trio.to_thread.run_sync(cascade.warm_up)
            await trio.to_thread.run_sync(amplify.warm_up)
        except Exception as error:  # the first round will meet (and report) the same failure
            log.warning("warm-up of the compiled kernels failed: %s: %s", type(error).__name__, error)
        # what start-up made (modules, numba's compiled kernels) lives as long as the daemon: out of
        # the collector's sight, its full collections stay cheap
        gc.freeze()

    async def _call(self, function: Callable[..., T], *args: Any, thread: bool = True) -> T:
        if thread:
            return await trio.to_thread.run_sync(function, *args)
        return function(*args)

    async def _step(
        self,
        session: _Session,
        function: Callable[..., T],
        *args: Any,
        thread: bool = True,
        round: int | None = None,
    ) -> T:
        """An engine step (in a worker thread unless told not to), timed on the rounds' clocks: its
        seconds count as busy for ``round`` (default: the oldest open round), in that round's state
        before the step; a round the step opened gets a clock from the step's start. Only the
        connection that runs rounds keeps clocks (the others are handshaking)."""
        engine = session.engine
        assert engine is not None
        before, started = engine.round_states, trio.current_time()
        try:
            return await self._call(function, *args, thread=thread)
        finally:
            if self._active is session:
                now = trio.current_time()
                busy = round if round in before else next(iter(before), None)
                if busy is not None and busy in self._clocks:
                    self._clocks[busy].computed(before[busy].value, now - started)
                for number, state in engine.round_states.items():
                    if number not in self._clocks:
                        self._clocks[number] = RoundClock(engine_mod.State.IDLE.value, started)
                        self._round_idle = trio.Event()
                    self._clocks[number].enter(state.value, now)

    def _round_trip(
        self, session: _Session, engine: engine_mod.Engine, message: wire.Message | None
    ) -> int | None:
        """Alice: time the round trip by the one exchange of a round that is a request and its answer —
        her ``estimate_answer``, and the round's first Cascade request, which Bob sends once he has read
        it (Cascade's own requests come in flights, several before any answer) — Bob's work in between
        included. The shortest of the latest sets how many rounds she keeps open
        (:func:`policy.rounds_to_open`). Returns the round of an ``estimate_request`` (she notes when her
        answer has gone out), else None."""
        if self.role != "alice" or message is None:
            return None
        number = message.fields.get("round")
        if not isinstance(number, int):
            return None
        if message.type == "estimate_request":
            if len(session.answered) > 2 * engine.window:  # forget the rounds that ended without Cascade
                for old in set(session.answered) - set(engine.round_states):
                    del session.answered[old]
            return number
        answered = session.answered.pop(number, None) if message.type in _CASCADE_REQUESTS else None
        if answered is not None:
            session.round_trips.append(trio.current_time() - answered)
            engine.limit_open_rounds(policy.rounds_to_open(min(session.round_trips)))
        return None

    async def _execute(self, session: _Session, actions: list[engine_mod.Action]) -> None:
        session.unsent = any(isinstance(a, engine_mod.Send) for a in actions)
        # a round counts as done only once every action of its last step is carried out: a stop waits
        # for that, so Alice's `committed` goes out before she closes (or Bob keeps the round pending)
        finished: list[int] = []
        for action in _coalesced(actions):
            match action:
                case engine_mod.Send(frame=frame):
                    await session.write(frame)
                    session.last_sent = trio.current_time()
                case engine_mod.ReserveRound(round=number):
                    await self._store_call(self.store.reserve_round, number)
                    self._rounds_started.add(number)
                case engine_mod.RoundEnded(
                    summary=summary, disposition=disposition, blocks=blocks, reserve=reserve
                ):
                    ended = trio.current_time()  # the summary's seconds and stages end at the same instant
                    clock = self._clocks.get(summary.round)
                    seconds = 0.0 if clock is None else ended - clock.started
                    stages = "" if clock is None else clock.format(ended)
                    if disposition == "aborted":
                        await self._store_call(self.store.record_aborted, summary, seconds)
                    else:
                        await self._store_call(
                            self.store.store_round,
                            summary,
                            blocks,
                            disposition == "pending",
                            seconds,
                            reserve,
                        )
                    log.info("%s", format_summary(summary, disposition, seconds, stages))
                    self._count_unrelated(summary, disposition)
                    walls = None if clock is None else clock.walls(ended)
                    self.monitor.round_ended(summary, disposition, ended, walls)
                    if disposition == "committed":
                        self._available_after_commit = None  # measured again before the next round
                        self._round_key_bits = max(self._round_key_bits, summary.secret_bits)
                    if disposition != "pending":
                        finished.append(summary.round)
                case engine_mod.CommitRound(round=number):
                    await self._store_call(self.store.commit_round, number)
                    self.monitor.committed([number], trio.current_time())
                    log.info("round %d committed", number)
                    finished.append(number)
                case engine_mod.ResolvePending(committed=committed):
                    done, dropped = await self._store_call(self.store.resolve, committed)
                    self.monitor.committed(done, trio.current_time())
                    self.monitor.dropped(dropped)
                    if done or dropped:
                        log.info("pending rounds resolved: committed %s, dropped %s", done, dropped)
                    # rounds of this run that Alice committed while "committed" was lost count now
                    self.rounds_finished += len(set(done) & self._rounds_started)
                case engine_mod.ConsumeReserve(upto=upto):
                    await self._store_call(self.store.reserve.consume, upto)
                case engine_mod.Compute(job=job, urgent=urgent):
                    # the frames before it are out: this work overlaps the peer's, and the session goes
                    # on reading frames (the engine holds back only frames that need this outcome)
                    pool = self._urgent if urgent else self._background
                    pool.submit(action.run).add_done_callback(functools.partial(_ran, session, job))
                case engine_mod.FetchFrame():
                    assert session.fetches is not None
                    session.fetches.send_nowait(action)
                case engine_mod.SetHandshakeKeys(keys=keys):
                    await self._store_call(self.store.reserve.set_handshake_keys, keys)
                case engine_mod.RetirePsk():
                    await self._store_call(self.store.retire_psk)
                    log.info("the bootstrap PSK is retired: the link now authenticates from its key reserve")
                case engine_mod.Ready(channel_macs=macs):
                    if macs is not None and self.kme is not None:
                        session.key_channel = KeyChannel(self.role, macs)
                        await self.kme.attach(session.key_channel, session.write)
                    session.keys_ready.set()
        session.unsent = False
        for number in finished:
            self._round_done(number, session)

    async def _fetch_frames(
        self, session: _Session, fetches: trio.MemoryReceiveChannel[engine_mod.FetchFrame]
    ) -> None:
        """Ask the link for the rounds' frames, one at a time in the order the engine asked (a link is
        not made for concurrent calls; the simulator prefetches the next frame itself), on a worker
        thread, and hand each record back to the session."""
        async for action in fetches:
            session.hand_back(action.job, await trio.to_thread.run_sync(action.run, self.link))

    async def _store_call(self, function: Callable[..., T], *args: Any) -> T:
        async with self._store_lock:
            return await self._store_thread.run(function, *args)

    def _keepalive_due(self, session: _Session, engine: engine_mod.Engine) -> float:
        """When we owe the peer a keepalive: :attr:`Engine.keepalive_interval` after our last frame
        (``inf`` when we owe none)."""
        interval = engine.keepalive_interval
        return math.inf if interval is None else session.last_sent + interval

    def _pause(self, session: _Session, seconds: float) -> None:
        """Alice, between rounds: start no round for ``seconds`` (a pause, or run.round_pause). The
        session's loop goes on meanwhile: it reads what the peer sends (its keepalives, its end: a dead
        peer is noticed while paused too, §13) and sends keepalives as they fall due."""
        session.resume_at = trio.current_time() + seconds

    async def _keep_alive(self, session: _Session, engine: engine_mod.Engine) -> None:
        """Tell the peer we are there when it is due, so its timeout does not end the connection (a new
        handshake would cost reserve bits, §17) and it can tell us from a dead peer (§13)."""
        if trio.current_time() >= self._keepalive_due(session, engine):
            await self._execute(session, engine.keepalive())

    def _round_done(self, number: int, session: _Session) -> None:
        self.rounds_finished += 1
        self._clocks.pop(number, None)
        if session.engine is None or not session.engine.round_states:
            self._round_idle.set()


_CASCADE_REQUESTS = frozenset({"cascade_pass", "cascade_ranges"})
"""Bob's Cascade requests (§5): the first of a round answers Alice's estimate_answer."""

_REBOOTSTRAP = "re-bootstrap with a fresh PSK file and auth.fallback_to_psk = true on both sides"
_NO_AUTHENTICATION = {
    "reserve-exhausted": (
        "paused: key reserve exhausted (re-bootstrap needed)",
        f"the key reserve is drained and the PSK retired (the reason below says whose); {_REBOOTSTRAP}",
    ),
    "stale-state": (
        "paused: no handshake key in common (re-bootstrap needed)",
        "the two sides share no handshake key: one state directory was reset, lost or restored from a "
        "backup (the reason below says which), or the connection is being tampered with, and then it "
        f"passes; if it lasts, {_REBOOTSTRAP}",
    ),
}
"""Protocol errors that mean no handshake can authenticate: the status and the advice, said once."""


class _RateLimitedLog:
    """One WARNING per ``seconds`` about a kind of event, with the count of those not logged since."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last = -math.inf
        self._quiet = 0

    def note(self, text: str) -> None:
        now = trio.current_time()
        if now - self._last < self.seconds:
            self._quiet += 1
            return
        more = f" (and {self._quiet} more like it since the last such line)" if self._quiet else ""
        log.warning("%s%s", text, more)
        self._last, self._quiet = now, 0


def _coalesced(actions: list[engine_mod.Action]) -> list[engine_mod.Action]:
    """``actions`` with each run of consecutive frames (a Cascade flight) joined into one, so that it goes
    out in one write and wakes the peer once; the order of everything is kept."""
    merged: list[engine_mod.Action] = []
    for sends, run in itertools.groupby(actions, key=lambda action: isinstance(action, engine_mod.Send)):
        if sends:
            frames = [action for action in run if isinstance(action, engine_mod.Send)]
            if len(frames) == 1:
                merged.append(frames[0])
            else:
                body = b"".join(each.frame for each in frames)
                merged.append(engine_mod.Send(body, "+".join(each.message for each in frames)))
        else:
            merged.extend(run)
    return merged


def _ran(session: _Session, job: int, ran: Future[engine_mod.Outcome]) -> None:
    session.hand_back(job, ran.result())  # run() returns every failure as an outcome


def _hand_back(
    nursery: trio.Nursery, channel: trio.MemorySendChannel[Any]
) -> Callable[[int, engine_mod.Outcome], None]:
    """A function any thread may call to hand an outcome back to the session's loop (as a :class:`_Done`
    among its frames). Once the session has ended, the outcome is dropped: its round is gone."""
    token = trio.lowlevel.current_trio_token()

    async def send(done: _Done) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await channel.send(done)

    def deliver(done: _Done) -> None:
        with contextlib.suppress(RuntimeError):  # the nursery closed: the session is over
            nursery.start_soon(send, done)

    def hand_back(job: int, outcome: engine_mod.Outcome) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(deliver, _Done(job, outcome))

    return hand_back


@dataclass(frozen=True)
class _Done:
    """The outcome of work the engine handed out (a Compute or FetchFrame action), back for its loop."""

    job: int
    outcome: engine_mod.Outcome


def _deadline(timeout: float | None) -> float:
    return math.inf if timeout is None else trio.current_time() + timeout


_CONNECT_ADVICE = {
    errno.ECONNREFUSED: "nothing listens there: is Bob running, and is peer the address of his run.listen?",
    errno.ETIMEDOUT: "no answer: the host is down, or a firewall drops the port",
    errno.EHOSTUNREACH: "no route to the host: check the address and the network",
    errno.ENETUNREACH: "no route to the network: check the address and this host's routes",
}


def connect_failure(error: OSError) -> str:
    """Why a connection could not be opened, with each attempt's errno (trio groups one per address of
    the host name) and what it usually means."""
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name: {error.strerror}"
    group = error.__cause__
    attempts = list(group.exceptions) if isinstance(group, BaseExceptionGroup) else [error]
    said = []
    for attempt in attempts:
        if isinstance(attempt, OSError) and attempt.errno is not None:
            name = errno.errorcode.get(attempt.errno, str(attempt.errno))
            advice = _CONNECT_ADVICE.get(attempt.errno)
            said.append(f"{name} ({os.strerror(attempt.errno)})" + (f": {advice}" if advice else ""))
        else:
            said.append(str(attempt))
    return "; ".join(dict.fromkeys(said))


def _later(moment: float) -> float:
    """``moment`` if it is still to come, else ``inf`` (a pause that is over wakes no one)."""
    return moment if moment > trio.current_time() else math.inf


def keep_tcp_alive(stream: trio.SocketStream) -> None:
    """TCP keepalive, the backstop of §13's: with nothing in flight, a peer whose host or network
    vanished without a word is seen within about 8 s (first probe after 2 s, then every 2 s, 3 lost)."""
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPALIVE_SECONDS)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, TCP_KEEPALIVE_SECONDS)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, TCP_KEEPALIVE_PROBES)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown peer"
    return f"{host}:{port}"


def _to_peer(actions: list[engine_mod.Action], peer_gone: bool) -> list[engine_mod.Action]:
    """``actions``, without the frames to send once the peer has closed its end (nothing reads them)."""
    if not peer_gone:
        return actions
    return [action for action in actions if not isinstance(action, engine_mod.Send)]


def _abandoned(engine: engine_mod.Engine) -> str:
    """What became of the rounds under way when a connection ended, as the engine says, for the log."""
    said = []
    for number, pending in engine.unfinished_rounds:
        if pending:
            said.append(f"round {number} stays pending until the next connection resolves it")
        else:
            said.append(f"round {number} abandoned, nothing stored")
    return "".join(f"; {each}" for each in said)


async def run_forever(config: Config) -> int:
    """``qkdd run``: serve until SIGTERM/SIGINT or ``run.max_rounds``. Nothing a peer or the network
    says ends it (I3): a stale state pauses the link with a clear status instead."""
    daemon = Daemon(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    daemon.request_stop(signal.Signals(signum).name)

            nursery.start_soon(watch_signals)
            await daemon.run()
            nursery.cancel_scope.cancel()
    return 0


def setup_logging(role: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    # journald adds its own timestamps; a terminal user still wants them
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    handler.setFormatter(logging.Formatter(f"{stamp}qkdd[{role}] %(levelname)s %(message)s"))
    root = logging.getLogger("qkdd")
    root.handlers[:] = [handler]
    root.setLevel(level)


def raise_file_limit(most: int = 65536) -> None:
    """Raise the soft limit on open files toward the hard one: every connection holds a socket, and an
    attacker's idle connections must not run us out of them (I5)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = most if hard == resource.RLIM_INFINITY else min(hard, most)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main_run(config: Config, log_level: str = "INFO") -> int:
    """``qkdd run`` (``log_level``: ``--log-level``). Exit 2 (touching nothing) when another qkdd runs on
    the state directory."""
    lock = lock_state_dir(config.state_dir)  # before anything opens or writes the state
    with lock:
        setup_logging(config.role, log_level)
        raise_file_limit()
        try:
            return trio.run(run_forever, config)
        except BaseException as error:
            # errors from inside nurseries come in exception groups (a bad TLS file, a busy socket path)
            leaves = _leaves(error)
            if len(leaves) == 1 and isinstance(leaves[0], InputError):
                raise leaves[0] from None  # a config the daemon cannot run with: `qkdd run: …`, exit 2
            said = [
                operational_problem(leaf) or (str(leaf) if isinstance(leaf, QkddError) else None)
                for leaf in leaves
            ]
            if None in said:
                raise  # a bug: its traceback
            for line in dict.fromkeys(said):
                log.error("%s", line)
            return 1


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions in ``error``'s nested exception groups, or ``error`` itself."""
    if not isinstance(error, BaseExceptionGroup):
        return [error]
    return [leaf for each in error.exceptions for leaf in _leaves(each)]


def read_listen_address(state_dir: Path, name: str = LISTEN_FILE) -> str | None:
    path = state_dir / name
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
