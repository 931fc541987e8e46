"""The control socket: its protocol without I/O, then the trio server and the blocking client over a Unix
socket in the test's folder, and a daemon pair in-process answering it (and serving /metrics)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from qkdd import config, control, metrics, statelock
from qkdd.daemon import METRICS_FILE, Daemon, read_listen_address

from .test_daemon import configs, start_pair, until


def test_requests_and_answers_round_trip() -> None:
    assert control.decode_request(control.encode_request("status").rstrip(b"\n")) == "status"
    answer = {"running": True, "link": "up", "last_qber": 0.0125}
    assert control.decode_answer(control.encode_answer(answer)) == answer


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"status", "not a JSON line"),
        (b"\xff\xfe", "not a JSON line"),
        (b'["status"]', "expected"),
        (b'{"request": "status", "more": 1}', "expected"),
        (b'{"request": "keys"}', "unknown request 'keys'"),
    ],
)
def test_a_bad_request_is_refused_with_a_reason(line: bytes, message: str) -> None:
    with pytest.raises(control.ControlError, match=message):
        control.decode_request(line)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b'{"running": true}', "ended early"), (b"nonsense\n", "not JSON"), (b"[1]\n", "not a JSON object")],
)
def test_a_bad_answer_is_an_error(data: bytes, message: str) -> None:
    with pytest.raises(control.ControlError, match=message):
        control.decode_answer(data)


async def handler(request: str) -> dict[str, Any]:
    return {"running": True, "asked": request}


async def failing(request: str) -> dict[str, Any]:
    raise RuntimeError("the store is gone")


async def ask(state_dir: Path) -> dict[str, Any] | None:
    return await trio.to_thread.run_sync(control.ask, state_dir)


async def raw(state_dir: Path, data: bytes) -> dict[str, Any]:
    """Send ``data`` as a client would and read the one-line answer."""
    client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with client:
        await client.connect(str(state_dir / control.SOCKET_FILE))
        await client.send(data)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = await client.recv(65536)
            assert chunk, "the server closed before answering"
            answer += chunk
    return control.decode_answer(answer)


@pytest.mark.trio
@pytest.mark.parametrize("deep", [False, True])
async def test_the_server_answers_on_a_0600_socket_and_is_gone_when_it_stops(
    tmp_path: Path, deep: bool
) -> None:
    # deep: a state directory path too long for a Unix socket address (reached through /proc/self/fd)
    state_dir = tmp_path / ("d" * 60 + "/" + "e" * 60 if deep else "s")
    state_dir.mkdir(parents=True, mode=0o700)
    assert (len(str(state_dir / control.SOCKET_FILE)) > 107) == deep
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, state_dir, handler)
            path = state_dir / control.SOCKET_FILE
            assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
            assert await ask(state_dir) == {"running": True, "asked": "status"}
            if not deep:
                assert await raw(state_dir, b'{"request": "nothing"}\n') == {
                    "error": "unknown request 'nothing'; expected one of status"
                }
                assert "longer than" in (await raw(state_dir, b"x" * (control.MAX_REQUEST + 10)))["error"]
            nursery.cancel_scope.cancel()
    assert sorted(os.listdir(state_dir)) == []  # the socket and its temporary name are gone
    assert await ask(state_dir) is None


@pytest.mark.trio
async def test_a_stale_socket_file_means_not_running_and_is_replaced(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / control.SOCKET_FILE))
    stale.close()  # as a daemon killed with -9 leaves it
    with trio.fail_after(10):
        assert await ask(tmp_path) is None
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, tmp_path, failing)
            answer = await ask(tmp_path)
            assert answer == {"error": "the daemon could not answer: RuntimeError: the store is gone"}
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_silent_client_gets_an_error(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve, tmp_path, handler)
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with client:
            await client.connect(str(tmp_path / control.SOCKET_FILE))
            line = await client.recv(65536)  # the clock jumps past REQUEST_TIMEOUT
        assert control.decode_answer(line) == {"error": "no request line within 5 s"}
        nursery.cancel_scope.cancel()


def test_a_daemon_that_takes_the_connection_but_never_answers_is_an_error(tmp_path: Path) -> None:
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / control.SOCKET_FILE))
    silent.listen(1)
    with silent, pytest.raises(control.ControlError, match=r"did not answer within 0\.2 s"):
        control.ask(tmp_path, timeout=0.2)


def test_the_lock_holder_is_found_without_taking_the_lock(tmp_path: Path) -> None:
    assert statelock.holder(tmp_path) is None  # no lock file
    lock = statelock.lock_state_dir(tmp_path)
    try:
        assert statelock.holder(tmp_path) == os.getpid()
    finally:
        lock.close()
    assert statelock.holder(tmp_path) is None  # the file stays, the lock is gone


async def scrape(port: int, target: str = "/metrics", method: str = "GET") -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{method} {target} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def with_metrics(loaded: config.Config) -> config.Config:
    return config.Config(**{**loaded.__dict__, "metrics": config.Address("127.0.0.1", 0)})


@pytest.mark.trio
async def test_a_running_pair_answers_status_and_serves_metrics(tmp_path: Path) -> None:
    alice_config, bob_config = (with_metrics(c) for c in configs(tmp_path, 0))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            alice, bob = await start_pair(nursery, alice_config, bob_config)
            await until(lambda: alice.rounds_finished >= 2 and bob.rounds_finished >= 2)
            for cfg in (alice_config, bob_config):
                status = await ask(cfg.state_dir)
                assert status is not None, cfg.role
                assert status["running"] is True and status["pid"] == os.getpid()
                assert status["role"] == cfg.role and status["link"] == "up" and status["reason"] is None
                assert status["rounds_committed"] >= 1 and status["last_round_at"] is not None
                assert status["secret_bits_per_second_1m"] > 0 and status["uptime_seconds"] > 0
                assert 1 < status["reconciliation_efficiency"] < 2 and 0 < status["last_qber"] < 0.1
                assert status["reserve_bits"] >= 0 and status["psk_retired"] in (True, False)
                json.dumps(status)  # every value is JSON
                address = read_listen_address(cfg.state_dir, METRICS_FILE)
                assert address is not None
                port = int(address.rsplit(":", 1)[1])
                code, body = await scrape(port)
                assert code == 200
                found = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(body.decode())
                    for s in family.samples
                }
                assert found[("qkdd_link_up", ())] == 1
                assert found[("qkdd_rounds_total", (("outcome", "committed"),))] >= 1
                assert found[("qkdd_secret_bytes_total", ())] > 0
                assert found[("qkdd_round_stage_duration_seconds_count", (("stage", "reconciling"),))] >= 1
                assert (await scrape(port, "/other"))[0] == 404
                assert (await scrape(port, method="POST"))[0] == 405
            alice.request_stop("test over")
            bob.request_stop("test over")
    for cfg in (alice_config, bob_config):
        assert await ask(cfg.state_dir) is None  # stopped: nothing answers
        assert json.loads((cfg.state_dir / "status.json").read_text())["reason"] == "test over"


@pytest.mark.timeout(60)
@pytest.mark.trio
async def test_metrics_refresh_at_most_every_few_seconds_and_serve_a_bounded_number_at_once(
    mock_clock: trio.testing.MockClock,
) -> None:
    exported = metrics.Metrics("bob", "lab")
    refreshes = []

    async def refresh(target: metrics.Metrics) -> None:
        refreshes.append(trio.current_time())
        if len(refreshes) == 2:
            raise OSError(28, "No space left on device")  # served all the same, with the last gauges

    async with trio.open_nursery() as nursery:
        port = await nursery.start(metrics.serve, exported, config.Address("127.0.0.1", 0), refresh)
        assert (await scrape(port))[0] == 200 and (await scrape(port))[0] == 200
        assert len(refreshes) == 1  # the second scrape came within REFRESH_SECONDS
        mock_clock.jump(metrics.REFRESH_SECONDS)
        assert (await scrape(port))[0] == 200 and len(refreshes) == 2
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(metrics.MAX_CONNECTIONS)]
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        assert await extra.receive_some(1024) == b""  # closed at once: MAX_CONNECTIONS are held
        await extra.aclose()
        for stream in idle:
            await stream.aclose()
        for _ in range(1000):  # the held ones end as their handlers see the close
            await trio.testing.wait_all_tasks_blocked()
            with contextlib.suppress(trio.BrokenResourceError, IndexError, ValueError):
                if (await scrape(port))[0] == 200:
                    break
        else:
            raise AssertionError("no scrape served after the held connections closed")
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_daemon_that_fails_to_start_records_why_it_stopped(tmp_path: Path) -> None:
    _, bob_config = configs(tmp_path, 0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = config.Address("127.0.0.1", taken.getsockname()[1])
        daemon = Daemon(config.Config(**{**bob_config.__dict__, "metrics": busy}))
        with trio.fail_after(30), pytest.raises(BaseExceptionGroup):
            await daemon.run()
    stop = json.loads((bob_config.state_dir / "status.json").read_text())
    assert stop["reason"].startswith("OSError: ") and "address already in use" in stop["reason"].lower()
    assert await ask(bob_config.state_dir) is None  # the control socket is gone with it
