"""The trio daemon in-process, over real TCP on 127.0.0.1: timeouts, slow and silent peers, link failures."""

from __future__ import annotations

import dataclasses
import logging
import re
import sqlite3
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from qkdd import config, control, demo, engine, policy, rounds
from qkdd import daemon as daemon_mod
from qkdd.daemon import Daemon, RoundClock, _coalesced
from qkdd.errors import InputError
from qkdd.store import KeyStore
from tests.helpers import logged

SIM = {"pulses_per_frame": 1 << 19, "z_probability": 0.7, "seed": 5, "single_photon": True}
TIMEOUTS = "[timeouts]\nhandshake = 0.5\nround = 2.0\nidle = 5.0\nshutdown_grace = 1.0\nreconnect_max = 0.2\n"


def configs(
    tmp_path: Path, rounds: int, idle: float | None = None, **options: Any
) -> tuple[config.Config, config.Config]:
    """Both roles' configs with the short TIMEOUTS (``idle``: another timeouts.idle)."""
    alice_path, bob_path = demo.write_configs(tmp_path, rounds, SIM, **options)
    loaded = []
    for path in (alice_path, bob_path):
        text = path.read_text()
        head, _, tail = text.partition("[timeouts]")
        tail = tail.split("[run]", 1)[1]
        path.write_text(head + TIMEOUTS + "\n[run]" + tail)
        loaded.append(config.load(path))
        if idle is not None:
            loaded[-1] = dataclasses.replace(
                loaded[-1], timeouts=dataclasses.replace(loaded[-1].timeouts, idle=idle)
            )
    return loaded[0], loaded[1]


def alice_towards(alice_config: config.Config, port: int) -> Daemon:
    """Alice's daemon, aimed at a port on 127.0.0.1 (Bob's, or a proxy's)."""
    return Daemon(dataclasses.replace(alice_config, peer=config.Address("127.0.0.1", port)))


async def start_pair(
    nursery: trio.Nursery, alice_config: config.Config, bob_config: config.Config
) -> tuple[Daemon, Daemon]:
    """Bob, and Alice aimed at him, running in ``nursery``."""
    bob = Daemon(bob_config)
    port = await nursery.start(bob.run)
    alice = alice_towards(alice_config, port)
    nursery.start_soon(alice.run)
    return alice, bob


async def read_frames(stream: trio.abc.ReceiveStream) -> list[dict[str, Any]]:
    """Every message body the stream brings until it closes."""
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    out = []
    while len(data) >= 4:
        (length,) = struct.unpack_from(">I", data)
        envelope = msgpack.unpackb(bytes(data[4 : 4 + length]), raw=False)
        out.append(msgpack.unpackb(envelope["body"], raw=False))
        del data[: 4 + length]
    return out


@pytest.mark.trio
async def test_idle_and_oversized_connections_cannot_keep_alice_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """I5: an attacker holds three times the handshake limit in idle sockets, and starts frames larger
    than a handshake message on some; Alice still gets in at once, the oldest idle sockets are closed,
    a too-long frame is refused before it is buffered, and the refusals log one line."""
    monkeypatch.setattr(daemon_mod, "MAX_HANDSHAKES", 8)
    caplog.set_level(logging.INFO, logger="qkdd")
    alice_config, bob_config = configs(tmp_path, 1)
    bob = Daemon(bob_config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(bob.run)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(24)]
        for stream in idle[:4]:  # a frame of 15 MiB announced: refused at its length
            await stream.send_all(struct.pack(">I", 15 << 20) + b"x" * 1000)
        with trio.fail_after(5):
            alice = alice_towards(alice_config, port)
            nursery.start_soon(alice.run)
            await until(lambda: bob.rounds_finished >= 1)
        closed = 0
        for stream in idle:
            with trio.move_on_after(5):
                closed += await stream.receive_some(1 << 20) is not None
            await stream.aclose()
        assert closed == len(idle)  # every one was closed by Bob (evicted, refused or timed out)
        alice.request_stop("test over")
        bob.request_stop("test over")
    lines = [r for r in caplog.records if "still in the handshake" in r.getMessage()]
    assert len(lines) == 1 and "more like it" not in lines[0].getMessage()
    assert not any("15728640" in r.getMessage() and r.levelno >= logging.ERROR for r in caplog.records)


@pytest.mark.trio
async def test_alice_stopping_as_a_round_ends_still_tells_bob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM the moment Alice's round is done — a reserve round, whose `committed` carries a tag whose
    pad she marks used first: she sends `committed` before she closes, so Bob commits the round too
    instead of holding it pending until the next connection."""
    done = Daemon._round_done

    def stop_as_the_round_ends(self: Daemon, *args: Any) -> None:
        if self.role == "alice" and self.rounds_finished == 3:
            self.request_stop("SIGTERM")
        done(self, *args)

    monkeypatch.setattr(Daemon, "_round_done", stop_as_the_round_ends)
    reserve = {"reserve_switch_bits": 1024, "reserve_bits_per_round": 1024, "reserve_target_bits": 8192}
    alice_config, bob_config = (
        # one round at a time: the stop comes as round 3 ends, with no later round open
        dataclasses.replace(c, window=1, auth=dataclasses.replace(c.auth, **reserve))
        for c in configs(tmp_path, 0)
    )
    async with trio.open_nursery() as nursery:
        alice, bob = await start_pair(nursery, alice_config, bob_config)
        with trio.fail_after(10):
            await until(lambda: alice.rounds_finished >= 4 and bob._active is None)
        bob.request_stop("test over")
    store = KeyStore(bob_config.state_dir, None, create=False)
    try:
        assert store.rounds(1)[0]["auth"] == "reserve"
        assert store.pending_rounds() == [] and store.statistics().committed_rounds == 4
    finally:
        store.close()


@pytest.mark.trio
async def test_a_failing_link_ends_the_connection_not_the_daemon(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice_config, bob_config = configs(tmp_path, 2)
    bob = Daemon(bob_config)
    real = bob.link.detections  # type: ignore[union-attr]
    failures = [InputError("detector offline")]

    def flaky(frame: int) -> Any:
        if failures:
            raise failures.pop()
        return real(frame)

    bob.link.detections = flaky  # type: ignore[union-attr]
    caplog.set_level(logging.INFO, logger="qkdd")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(bob.run)
            alice = alice_towards(alice_config, port)
            await alice.run()
    assert "internal error (InputError: detector offline)" in caplog.text
    stores = [KeyStore(c.state_dir, c.link_id, create=False) for c in (alice_config, bob_config)]
    alice_keys, bob_keys = (dict(s.committed_keys()) for s in stores)
    assert alice_keys == bob_keys != {}
    assert stores[0].statistics().committed_rounds == 2
    for store in stores:
        store.close()


@pytest.mark.trio
@pytest.mark.parametrize(
    ("used_up_to", "status", "message"),
    [
        # a handshake key but not enough for a round (366 bits)
        (200, ("paused", "key reserve exhausted"), "the key reserve holds"),
        # Alice's state restored from a backup older than Bob's handshake key: they share none
        (
            -1,
            ("paused", "no handshake key in common (re-bootstrap needed)"),
            "restored from a backup",
        ),
    ],
)
async def test_a_dry_reserve_pauses_the_link_with_a_clear_status(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    used_up_to: int,
    status: tuple[str, str],
    message: str,
) -> None:
    from qkdd.policy import HandshakeKeys  # noqa: PLC0415
    from qkdd.records import RoundSummary  # noqa: PLC0415

    alice_config, bob_config = configs(tmp_path, 1)
    # both stores hold the same reserve (past the switch-over size) with all but 200 bits used
    for config_ in (alice_config, bob_config):
        store = KeyStore(config_.state_dir, config_.link_id)
        summary = RoundSummary(0, 0, 1, 1, 1, 0.01, 0.01, 1, 0, False, None, "psk")
        store.store_round(summary, [], False, None, (bytes(range(256)) * 4, 8192))
        store.reserve.consume(8192 - max(used_up_to, 0))
        store.retire_psk()
        if used_up_to < 0 and config_ is bob_config:
            store.reserve.set_handshake_keys(HandshakeKeys(4096, None, 8192))
        store.close()
    caplog.set_level(logging.INFO, logger="qkdd")

    def alice_paused(record: logging.LogRecord) -> bool:
        return "link paused" in record.getMessage() and getattr(record, "role", None) == "alice"

    with trio.move_on_after(8), logged(alice_paused) as paused:
        async with trio.open_nursery() as nursery:
            alice, bob = await start_pair(nursery, alice_config, bob_config)
            with trio.fail_after(6):
                await paused.wait()
            assert (alice.monitor.link, alice.monitor.reason) == status
            alice.request_stop("test over")
            bob.request_stop("test over")
    assert message in caplog.text and alice.rounds_finished == 0


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the caller's fail_after bounds the wait)."""
    for _ in range(10_000):
        if condition():
            return
        await trio.sleep(0.05)
    raise AssertionError("the condition never held")


@pytest.mark.trio
async def test_a_full_key_store_pauses_the_rounds_until_keys_are_taken_and_keepalives_hold_the_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice_config, bob_config = configs(tmp_path, 0, idle=1.0, etsi014=True)  # Bob's IDLE: 1 s
    assert alice_config.etsi014 is not None
    full = dataclasses.replace(alice_config.etsi014, max_key_count=1)  # full after the first round
    caplog.set_level(logging.INFO, logger="qkdd")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            alice, bob = await start_pair(
                nursery, dataclasses.replace(alice_config, etsi014=full), bob_config
            )
            await until(lambda: "link paused: the key store holds" in caplog.text)
            assert (alice.monitor.link, alice.monitor.reason) == ("paused", "key store full")
            finished = alice.rounds_finished
            assert finished >= 1
            await trio.sleep(3.5)  # still full, no round; and Alice's keepalives hold the connection open
            assert alice.rounds_finished == finished
            assert "within its timeout" not in caplog.text and caplog.text.count("key channel open") == 2
            assert alice.kme is not None
            # the status is live while the link is paused: a key handed out shows at once
            before = await trio.to_thread.run_sync(control.ask, alice_config.state_dir)
            assert before is not None and (before["link"], before["reason"]) == ("paused", "key store full")
            await alice.kme.enc_keys("sae-alice", ["sae-bob"], 1, 256)
            after = await trio.to_thread.run_sync(control.ask, alice_config.state_dir)
            assert after is not None and after["link"] == "paused"
            assert after["delivery_assignments"] == before["delivery_assignments"] + 1
            # the store holds more than max_key_count (a round's worth), and never shows more than it
            assert before["delivery_stored_keys"] == after["delivery_stored_keys"] == full.max_key_count
            alice.kme.settings = dataclasses.replace(full, max_key_count=10**9)  # as if keys were taken
            await until(lambda: alice.rounds_finished > finished)
            assert "link resumed" in caplog.text
            assert (alice.monitor.link, alice.monitor.reason) == ("up", None)
            alice.request_stop("test over")
            bob.request_stop("test over")


@pytest.mark.trio
async def test_alice_done_with_her_rounds_keeps_the_link_for_key_delivery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With run.max_rounds reached and key delivery on, Alice keeps the connection (and with it the key
    channel) through keepalives, however short Bob's idle timeout."""
    alice_config, bob_config = configs(tmp_path, 1, idle=1.0, etsi014=True)
    caplog.set_level(logging.INFO, logger="qkdd")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            alice, bob = await start_pair(nursery, alice_config, bob_config)
            await until(lambda: alice.rounds_finished == 1 and bob.rounds_finished == 1)
            await trio.sleep(3.5)
            assert "within its timeout" not in caplog.text and caplog.text.count("key channel open") == 2
            alice.request_stop("test over")
            bob.request_stop("test over")


@pytest.mark.trio
@pytest.mark.parametrize("failing", ["alice", "bob"])
async def test_a_failing_disk_write_at_commit_abandons_the_round_on_both_sides(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, failing: str
) -> None:
    """The store's write of a finished round (Alice: committed, Bob: pending) fails once, inside its
    transaction after the round and key rows went in: nothing of that round stays at either side, and
    both daemons go on to store the following rounds."""
    alice_config, bob_config = configs(tmp_path, 3)
    bob = Daemon(bob_config)
    failed: list[int] = []

    def inject(daemon: Daemon) -> None:
        real = daemon.store.reserve.add

        def add(round_number: int, *args: Any, **kwargs: Any) -> None:
            if not failed:
                failed.append(round_number)
                raise sqlite3.OperationalError("disk I/O error")
            real(round_number, *args, **kwargs)

        daemon.store.reserve.add = add  # type: ignore[method-assign]

    caplog.set_level(logging.INFO, logger="qkdd")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(bob.run)
            alice = alice_towards(alice_config, port)
            inject(alice if failing == "alice" else bob)
            await alice.run()
    assert failed and "the key store: disk I/O error: the disk failed a read or write" in caplog.text
    assert "Traceback" not in caplog.text  # the host's problem, not a bug: one line
    stores = [KeyStore(c.state_dir, c.link_id, create=False) for c in (alice_config, bob_config)]
    try:
        alice_keys, bob_keys = (dict(s.committed_keys()) for s in stores)
        assert alice_keys == bob_keys != {}
        for store in stores:
            rounds = {r["round"]: r for r in store.rounds()}
            assert rounds.get(failed[0], {}).get("state") in (None, "aborted")
            orphans = store._db.execute("SELECT COUNT(*) FROM keys WHERE round = ?", (failed[0],)).fetchone()
            assert orphans == (0,)
            assert store.statistics().committed_rounds == 3
        assert stores[1].pending_rounds() == []
    finally:
        for store in stores:
            store.close()


class Proxy:
    """A TCP proxy between Alice and Bob. On its first connection it may stall: once ``stall_after``
    bytes went from Alice to Bob it forwards nothing more in either direction and closes nothing (a
    half-open connection, as when a host vanishes). ``delay`` holds every chunk back that long."""

    def __init__(self, target: int, *, stall_after: int | None = None, delay: float = 0.0) -> None:
        self.target = target
        self.stall_after = stall_after
        self.delay = delay
        self.connections = 0
        self.forwarded = 0
        self.stalled = trio.Event()

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        first = self.connections == 1
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, first, True, nursery.cancel_scope)
            nursery.start_soon(self._pump, upstream, client, first, False, nursery.cancel_scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, first: bool, to_bob: bool, scope: Any
    ) -> None:
        try:
            async for chunk in source:
                if first and self.stall_after is not None and self.forwarded >= self.stall_after:
                    self.stalled.set()
                if first and self.stalled.is_set():
                    await trio.sleep_forever()  # hold both sockets open, forward nothing
                if to_bob:
                    self.forwarded += len(chunk)
                await trio.sleep(self.delay)
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if not self.stalled.is_set() or not first:
            scope.cancel()  # one side closed: close the other


async def run_through(proxy: Proxy, rounds: int, tmp_path: Path) -> tuple[dict[str, bytes], list[KeyStore]]:
    alice_config, bob_config = configs(tmp_path, rounds)
    bob = Daemon(bob_config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with trio.open_nursery() as daemons:
            proxy.target = await daemons.start(bob.run)
            alice = alice_towards(alice_config, port)
            await alice.run()
        # Bob stopped on his own once all rounds were done
        nursery.cancel_scope.cancel()
    stores = [KeyStore(c.state_dir, c.link_id, create=False) for c in (alice_config, bob_config)]
    alice_keys, bob_keys = (dict(s.committed_keys()) for s in stores)
    assert alice_keys == bob_keys != {}
    return alice_keys, stores


@pytest.mark.trio
async def test_a_connection_stalled_mid_round_hits_the_round_timeout_on_both_sides(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Half-open: the proxy stops forwarding in the middle of the first round and closes nothing. Each
    daemon drops the connection on its own round timeout (2 s here), abandons the round, and the link
    goes on over a new connection."""
    caplog.set_level(logging.INFO, logger="qkdd")
    # bytes to Bob: past the handshake and the sift answer, inside round 0's reconciliation (40 kB, the
    # old mark, fell into round 1 once parallel Cascade cut the round trips and their framing)
    proxy = Proxy(0, stall_after=25_000)
    with trio.fail_after(60):
        _, stores = await run_through(proxy, 2, tmp_path)
    assert proxy.stalled.is_set() and proxy.connections >= 2
    assert caplog.text.count("within its timeout; round 0 ") == 2, caplog.text  # one line per side
    committed = [{r["round"] for r in s.rounds() if r["state"] == "committed"} for s in stores]
    assert committed[0] == committed[1] and len(committed[0]) == 2
    assert stores[1].pending_rounds() == []
    for store in stores:
        store.close()


@pytest.mark.trio
async def test_a_delayed_connection_still_stores_matching_keys(tmp_path: Path) -> None:
    """10 ms more on every chunk each way (a 20 ms round trip on top of loopback)."""
    proxy = Proxy(0, delay=0.01)
    with trio.fail_after(90):
        _, stores = await run_through(proxy, 2, tmp_path)
    assert proxy.connections == 1
    for store in stores:
        assert store.statistics().committed_rounds == 2
        store.close()


def test_the_round_clock_splits_a_round_into_states_with_their_computation() -> None:
    clock = RoundClock("IDLE", 10.0)
    clock.computed("IDLE", 0.5)
    clock.enter("SIFTING", 10.5)
    clock.computed("SIFTING", 0.25)
    clock.enter("SIFTING", 11.0)  # a step that stays in its state
    clock.enter("RECONCILING", 12.0)
    clock.computed("RECONCILING", 1.0)
    clock.enter("IDLE", 14.0)  # a state seen again adds to its first entry
    assert clock.format(14.5) == "idle:1.000/0.500,sifting:1.500/0.250,reconciling:2.000/1.000"


@pytest.mark.trio
async def test_each_round_summary_says_where_its_time_went(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice_config, bob_config = configs(tmp_path, 2)
    caplog.set_level(logging.INFO, logger="qkdd")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(Daemon(bob_config).run)
            await alice_towards(alice_config, port).run()
    summaries = [
        r.getMessage() for r in caplog.records if re.match(r"round \d+ (committed|pending):", r.getMessage())
    ]
    assert len(summaries) == 4  # two rounds, each summed up by both sides
    for line in summaries:
        seconds = float(re.search(r" seconds=([\d.]+)", line)[1])  # type: ignore[index]
        stages = dict(
            (state, (float(wall), float(busy)))
            for state, wall, busy in re.findall(r"(\w+):([\d.]+)/([\d.]+)", line.split(" stages=")[1])
        )
        assert {"sifting", "estimating", "reconciling", "confirming"} <= stages.keys()
        assert all(0 <= busy <= wall + 1e-3 for wall, busy in stages.values())
        assert sum(wall for wall, _ in stages.values()) == pytest.approx(seconds, abs=0.01)


def test_a_run_of_frames_goes_out_in_one_write_in_order() -> None:
    # a Cascade flight: the peer reads it in one go instead of one wake-up per frame
    def send(name: str) -> engine.Send:
        return engine.Send(name.encode(), name)

    reserve, compute = engine.ReserveRound(7), engine.Compute(1, "hash", lambda: None)
    actions: list[engine.Action] = [send("a"), send("b"), reserve, send("c"), compute, send("d"), send("e")]
    assert _coalesced(actions) == [
        engine.Send(b"ab", "a+b"),
        reserve,
        send("c"),
        compute,
        engine.Send(b"de", "d+e"),
    ]
    assert _coalesced([]) == []


@pytest.mark.trio
async def test_a_full_store_pause_is_logged_at_info_once_per_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Applications that take keys slower than the link makes them pause and resume it about once a
    round: the first pause (and its resume) in STORE_FULL_LOG_SECONDS is INFO, the others DEBUG."""
    alice_config, _ = configs(tmp_path, 0)
    alice = Daemon(alice_config)
    try:
        levels = [alice._store_full_level()]
        await trio.sleep(1.0)
        levels.append(alice._store_full_level())
        await trio.sleep(daemon_mod.STORE_FULL_LOG_SECONDS)
        levels.append(alice._store_full_level())
    finally:
        alice.store.close()
    assert levels == [logging.INFO, logging.DEBUG, logging.INFO]


def test_alice_times_the_round_trip_by_her_estimate_answer_and_keeps_open_rounds_for_it() -> None:
    """From her estimate_answer to the round's first Cascade request is a round trip (later Cascade
    requests come in flights and time nothing); the shortest of the latest sets how many rounds Alice
    keeps open (policy.rounds_to_open). Bob, other messages and unknown rounds measure nothing."""
    limits: list[int] = []
    engine = SimpleNamespace(round_states={3: None, 4: None}, window=64, limit_open_rounds=limits.append)
    session = daemon_mod._Session(peer="bob", stream=None)  # type: ignore[arg-type]
    alice, bob = SimpleNamespace(role="alice"), SimpleNamespace(role="bob")

    def message(kind: str, number: object) -> Any:
        return SimpleNamespace(type=kind, fields={"round": number})

    def asked(who: Any, sent: Any) -> int | None:
        return daemon_mod.Daemon._round_trip(who, session, engine, sent)  # type: ignore[arg-type]

    async def main() -> None:
        assert asked(alice, message("estimate_request", 3)) == 3 and not limits
        session.answered[3] = trio.current_time()  # what the daemon does once the answer is out
        await trio.sleep(0.050)
        assert asked(alice, message("cascade_pass", 3)) is None
        assert limits == [policy.rounds_to_open(0.050)]
        await trio.sleep(0.001)
        asked(alice, message("cascade_ranges", 3))  # the same round's flight: no second sample
        assert len(limits) == 1 and len(session.round_trips) == 1
        session.answered[4] = trio.current_time()
        await trio.sleep(0.080)  # a slower one: the shortest still counts
        asked(alice, message("cascade_ranges", 4))
        assert limits[-1] == policy.rounds_to_open(0.050) and len(session.round_trips) == 2
        session.answered[3] = trio.current_time()
        for who, sent in (
            (bob, message("cascade_pass", 3)),
            (alice, message("cascade_parities", 3)),
            (alice, message("cascade_pass", "3")),
            (alice, None),
        ):
            assert asked(who, sent) is None
        assert len(limits) == 2

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.trio
async def test_bob_ends_a_round_alice_ended_before_she_closed_while_his_work_for_it_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keyless round: Alice's untagged amplify ends it, she closes (no more rounds) and goes, while Bob's
    own work for the round still runs. Once it is back he handles her amplify, ends the round as she
    did, and stops (with run.rounds = 1 he once waited for ever: the round abandoned, never counted)."""

    def keyless(self: rounds.Round) -> int:
        self.length_reason = "no key, for the test"
        return 0

    go = threading.Event()
    hand_out = engine.Engine._hand_out

    def slow_amplification(self: engine.Engine, r: Any, kind: str, function: Any, **kwargs: Any) -> None:
        if kind == "amplification":
            work = function

            def function() -> Any:
                go.wait(30)
                return work()

        hand_out(self, r, kind, function, **kwargs)

    monkeypatch.setattr(rounds.Round, "_secret_length", keyless)
    monkeypatch.setattr(engine.Engine, "_hand_out", slow_amplification)
    alice_config, bob_config = configs(tmp_path, 1)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                bob = Daemon(bob_config)
                port = await nursery.start(bob.run)
                alice = alice_towards(alice_config, port)
                await alice.run()  # to her end: one round, aborted at her side, then she closes
                assert alice.rounds_finished == 1
                # her frames are in (or, before the fix, the session is over): let his work finish
                await until(lambda: bob._active is None or getattr(bob._active, "peer_gone", False))
                go.set()  # Bob's work is back: he handles her amplify, then her error frame
    finally:
        go.set()
    assert bob.rounds_finished == 1 and bob.stop_reason == "all rounds done"
    store = KeyStore(bob_config.state_dir, None, create=False)
    try:
        assert [r["state"] for r in store.rounds()] == ["aborted"]
    finally:
        store.close()
