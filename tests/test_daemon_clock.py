"""The daemon's timers on trio's virtual clock, over memory streams: how long a state waits for the peer
is checked in virtual seconds, so a loaded machine cannot make these tests pass or fail by itself."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qkdd import spec
from qkdd.daemon import Daemon
from tests.test_daemon import configs, read_frames, until


@pytest.mark.trio
async def test_a_silent_peer_is_dropped_exactly_at_the_handshake_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    _, bob_config = configs(tmp_path, 0)
    bob = Daemon(bob_config)
    ours, theirs = trio.testing.memory_stream_pair()
    timeout = bob_config.timeouts.handshake
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        nursery.start_soon(bob.serve_connection, ours, "memory peer")
        with trio.fail_after(timeout + 5):
            frames = await read_frames(theirs)
        elapsed = trio.current_time() - started
    assert [f["type"] for f in frames] == ["hello", "error"] and frames[1]["code"] == "timeout"
    assert timeout <= elapsed < timeout + 0.1


@pytest.mark.trio
async def test_a_frame_trickled_a_byte_a_second_does_not_renew_the_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The deadline of a state renews with each complete frame only: a peer that keeps a frame coming
    forever, a byte at a time, is dropped at the timeout like a silent one (I5: time per state)."""
    _, bob_config = configs(tmp_path, 0)
    bob = Daemon(bob_config)
    ours, theirs = trio.testing.memory_stream_pair()
    timeout = bob_config.timeouts.handshake
    frame = struct.pack(">I", 60000) + b"\x81" * 60000

    async def trickle() -> None:
        for i in range(len(frame)):
            try:
                await theirs.send_stream.send_all(frame[i : i + 1])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep(timeout / 20)

    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        nursery.start_soon(bob.serve_connection, ours, "memory peer")
        nursery.start_soon(trickle)
        with trio.fail_after(timeout + 5):
            frames = await read_frames(theirs)
        elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert [f["type"] for f in frames] == ["hello", "error"] and frames[1]["code"] == "timeout"
    assert timeout <= elapsed < timeout + timeout / 20 + 0.1


class Valve:
    """Both directions of one connection between two memory streams; :meth:`freeze` makes every byte
    vanish from then on while neither end closes, as when the peer's host or network disappears."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.ends: list[trio.abc.Stream] = []
        self.frozen_at: float | None = None
        self.frames = {"alice": 0, "bob": 0}  # bytes each side sent before the freeze
        near_a, far_a = trio.testing.memory_stream_pair()
        near_b, far_b = trio.testing.memory_stream_pair()
        self.ends = [near_a, near_b]  # Alice's end, Bob's end
        nursery.start_soon(self._pump, far_a, far_b, "alice")
        nursery.start_soon(self._pump, far_b, far_a, "bob")

    def freeze(self) -> None:
        self.frozen_at = trio.current_time()

    async def _pump(self, source: trio.abc.Stream, sink: trio.abc.Stream, sender: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some(65536):
                if self.frozen_at is None:
                    self.frames[sender] += len(data)
                    await sink.send_all(data)


def inline(daemon: Daemon) -> Daemon:
    """Run the daemon's store calls and engine steps on the event loop, not in worker threads, so that
    the virtual clock jumps only when the daemons really wait for each other or for a timer."""

    async def call(function: Callable[..., Any], *args: Any, thread: bool = True) -> Any:
        return function(*args)

    async def store_call(function: Callable[..., Any], *args: Any) -> Any:
        return function(*args)

    daemon._call = call  # type: ignore[method-assign]
    daemon._store_call = store_call  # type: ignore[method-assign]
    if daemon.kme is not None:
        daemon.kme._store_call = store_call
    return daemon


@pytest.mark.trio
async def test_a_dead_peer_is_noticed_within_the_silence_timeout_while_alice_is_paused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Alice paused on a full key store, Bob in IDLE: keepalives go both ways and hold the connection
    for as long as both are there (a minute here); once the peer falls silent without closing, each
    side closes the connection within the silence timeout (§13), not minutes later."""
    alice_config, bob_config = configs(tmp_path, 0, idle=600.0, etsi014=True)
    assert alice_config.etsi014 is not None
    full = dataclasses.replace(alice_config.etsi014, max_key_count=0)  # full from the start: paused
    alice = inline(Daemon(dataclasses.replace(alice_config, etsi014=full)))
    bob = inline(Daemon(bob_config))
    silence = spec.load().timeouts["silence"]
    ended: dict[str, float] = {}
    caplog.set_level(logging.INFO, logger="qkdd")
    try:
        async with trio.open_nursery() as nursery:
            valve = Valve(nursery)

            async def serve(role: str, daemon: Daemon, stream: trio.abc.Stream) -> None:
                assert await daemon.serve_connection(stream, f"memory {role}")  # past the handshake
                ended[role] = trio.current_time()

            with trio.fail_after(300):
                async with trio.open_nursery() as sessions:
                    sessions.start_soon(serve, "alice", alice, valve.ends[0])
                    sessions.start_soon(serve, "bob", bob, valve.ends[1])
                    await until(lambda: alice.paused)
                    sent = dict(valve.frames)
                    await trio.sleep(60)  # paused: no round, only keepalives, both ways
                    assert not ended and alice.rounds_finished == 0
                    assert all(valve.frames[role] > sent[role] for role in sent)
                    valve.freeze()
            nursery.cancel_scope.cancel()
    finally:
        for daemon in (alice, bob):
            daemon.store.close()
    assert valve.frozen_at is not None
    for role in ("alice", "bob"):
        assert valve.frozen_at < ended[role] <= valve.frozen_at + silence, role
    assert caplog.text.count("no frame in state IDLE within its timeout") == 2
