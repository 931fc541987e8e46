"""Messages that say what to do (issue 23): the PSK's fingerprint on a failed proof, the errno of a failed
connect, one line without a traceback for what the host refuses, and config typos that exit 2."""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
import sqlite3
from pathlib import Path

import pytest
import trio

from qkdd import policy
from qkdd.auth.psk import fingerprint, generate_psk, write_psk
from qkdd.cli import main
from qkdd.daemon import connect_failure
from qkdd.errors import operational_problem
from tests.helpers import logged
from tests.test_daemon import configs, start_pair


def test_the_psk_fingerprint_is_short_stable_and_not_the_key() -> None:
    psk = bytes(range(32))
    shown = fingerprint(psk)
    assert shown == fingerprint(bytes(range(32))) != fingerprint(bytes(32))
    assert len(shown) == 19 and shown.count("-") == 3
    assert psk.hex()[:16] not in shown.replace("-", "")


@pytest.mark.trio
async def test_a_psk_mismatch_names_the_psk_and_each_sides_fingerprint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice_config, bob_config = configs(tmp_path, 1)
    other = tmp_path / "other-psk"
    write_psk(other, generate_psk())
    bob_config = dataclasses.replace(bob_config, psk_file=other)
    caplog.set_level(logging.INFO, logger="qkdd")
    fingerprints: set[str] = set()

    def both_said(record: logging.LogRecord) -> bool:
        if "the two hosts hold different PSKs" in record.getMessage():
            fingerprints.add(record.getMessage().split("fingerprint is ")[1][:19])
        return len(fingerprints) == 2

    with trio.fail_after(30), logged(both_said) as said:
        async with trio.open_nursery() as nursery:
            alice, bob = await start_pair(nursery, alice_config, bob_config)
            await said.wait()
            alice.request_stop("test over")
            bob.request_stop("test over")
    lines = [r.getMessage() for r in caplog.records if "different PSKs" in r.getMessage()]
    assert {fingerprint(alice.psk), fingerprint(bob.psk)} <= {
        line.split("fingerprint is ")[1][:19] for line in lines
    }
    assert all("auth-failed" in line for line in lines)
    assert alice.rounds_finished == 0


def _init_bob(tmp_path: Path) -> Path:
    """``qkdd init`` for Bob, listening on 127.0.0.1 (tests never listen on other addresses)."""
    assert main(["init", "--role", "bob", "--state-dir", str(tmp_path)]) == 0
    path = tmp_path / "bob.toml"
    text = path.read_text()
    assert 'listen = "0.0.0.0:7700"' in text
    path.write_text(text.replace('listen = "0.0.0.0:7700"', 'listen = "127.0.0.1:0"'))
    return path


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.trio
async def test_a_refused_connection_says_its_errno_and_what_it_means() -> None:
    port = _closed_port()
    with pytest.raises(OSError) as caught:
        with trio.fail_after(10):
            await trio.open_tcp_stream("127.0.0.1", port)
    text = connect_failure(caught.value)
    assert text.startswith("ECONNREFUSED (Connection refused): nothing listens there: is Bob running")


def test_an_unresolvable_host_says_so() -> None:
    assert connect_failure(socket.gaierror(-2, "Name or service not known")).startswith(
        "cannot resolve the host name"
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/var/lib/qkdd/x"), "the disk is full"),
        (sqlite3.OperationalError("database or disk is full"), "the key store: database or disk is full"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "permission denied"),
        (OSError(errno.EADDRINUSE, "Address already in use"), "another program holds that port"),
        (BaseExceptionGroup("nursery", [OSError(errno.EACCES, "Permission denied")]), "must own its state"),
    ],
)
def test_what_the_host_refuses_is_one_line_with_advice(error: BaseException, expected: str) -> None:
    assert expected in (operational_problem(error) or "")


@pytest.mark.parametrize(
    "error",
    [
        ValueError("a bug"),
        sqlite3.OperationalError("no such table: rounds"),
        BaseExceptionGroup("g", [KeyError(1)]),
    ],
)
def test_bugs_are_not_taken_for_operational_problems(error: BaseException) -> None:
    assert operational_problem(error) is None


def test_a_typo_under_link_sim_exits_2_like_any_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _init_bob(tmp_path)
    text = path.read_text()
    assert "\nseed = 1" in text
    path.write_text(text.replace("\nseed = 1", "\nsede = 1"))
    capsys.readouterr()
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkdd run: ") and "sede" in err and "Traceback" not in err


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _init_bob(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path.write_text(path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
        capsys.readouterr()
        assert main(["run", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Address already in use" in err and "another program holds that port" in err
    assert "Traceback" not in err


def test_rounds_near_half_error_back_off_doubling_to_five_minutes() -> None:
    assert policy.unrelated(0.49, None) and policy.unrelated(None, 0.5) and not policy.unrelated(0.2, 0.3)
    delays = [policy.unrelated_delay(streak) for streak in range(8)]
    assert delays[:3] == [0.0, 0.0, 0.0] and delays[3:6] == [5.0, 10.0, 20.0]
    assert policy.unrelated_delay(100) == policy.UNRELATED_LONGEST_DELAY


@pytest.mark.trio
async def test_mismatched_sim_seeds_get_a_hint_and_alice_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice_config, bob_config = configs(tmp_path, 0)
    bob_config = dataclasses.replace(bob_config, link_options={**bob_config.link_options, "seed": 6})
    caplog.set_level(logging.INFO, logger="qkdd")
    with trio.fail_after(60), logged(lambda record: "next round in 5 s" in record.getMessage()) as hinted:
        async with trio.open_nursery() as nursery:
            alice, bob = await start_pair(nursery, alice_config, bob_config)
            await hinted.wait()
            assert alice.rounds_finished == policy.UNRELATED_ROUNDS  # none more while she waits
            alice.request_stop("test over")
            bob.request_stop("test over")
    hints = [r for r in caplog.records if "bits are unrelated" in r.getMessage()]
    assert {getattr(r, "role", None) for r in hints} == {"alice", "bob"}
    assert "[link.sim] seed" in hints[0].getMessage()


@pytest.mark.parametrize(
    ("sender", "fields", "code", "says"),
    [
        # the sender's store looks new: it lists no key (and, with the PSK, offers nothing the other takes)
        ("alice", {"keys": []}, "stale-state", "alice's state directory was reset or lost"),
        ("bob", {"keys": []}, "stale-state", "bob's state directory was reset or lost"),
        # keys that are none of the receiver's: a state directory restored from a backup
        ("bob", {"keys": [2**40]}, "stale-state", "restored from a backup"),
    ],
)
def test_no_common_handshake_key_says_whose_state_is_behind(
    sender: str, fields: dict[str, object], code: str, says: str
) -> None:
    from tests.test_adversary import linked, reconnect, rewriting, run_attacked  # noqa: PLC0415

    error = run_attacked(reconnect(linked()), rewriting(sender, "hello", **fields))
    assert error is not None and error.code == code and says in str(error), error


@pytest.mark.trio
@pytest.mark.parametrize("bootstrap", ["psk", "pki"])
async def test_the_link_up_line_names_the_real_authentication(
    bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice_config, bob_config = configs(tmp_path, 1, bootstrap=bootstrap)
    caplog.set_level(logging.INFO, logger="qkdd")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:  # both stop after their one round
            await start_pair(nursery, alice_config, bob_config)
    ups = [r.getMessage() for r in caplog.records if " up with " in r.getMessage()]
    assert len(ups) == 2 and all(line.endswith(f"(qkdp/2, auth {bootstrap})") for line in ups), ups
