"""The daemon's timers on trio's virtual clock, over memory streams: how long a state waits for the peer
is checked in virtual seconds, so a loaded machine cannot make these tests pass or fail by itself."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from qkdd.daemon import Daemon
from tests.test_daemon import configs, read_frames


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
