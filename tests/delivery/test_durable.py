"""Group commit of hand-outs (qkdd.delivery.durable): a sync that began after a commit covers it, the
commits made while one sync runs share the next, a failed sync fails its waiters, and a hand-out
committed without the disk wait survives the process's kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from qkdd.delivery import durable
from qkdd.delivery.durable import DiskSync, sync_file
from qkdd.delivery.ledger import UnknownKey
from qkdd.store import DATABASE, KeyStore
from tests.delivery.test_ledger import commit_round, ledgers


class GatedSyncs:
    """``sync_file`` for the sync thread that tells the test each time it starts and then waits for the
    test to let it end (or fail)."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.started = trio.Event()
        self.count = 0
        self._go = threading.Semaphore(0)
        self._fail: list[bool] = []

    def __call__(self, wal: Path, database: Path) -> None:
        self.token.run_sync_soon(self._note)
        self._go.acquire()
        if self._fail.pop(0):
            raise OSError(5, "Input/output error")
        sync_file(wal, database)  # the real one (the test replaces the module's)

    def _note(self) -> None:
        self.count += 1
        self.started.set()

    async def wait_started(self) -> None:
        await self.started.wait()
        self.started = trio.Event()

    def end(self, *, fail: bool = False) -> None:
        self._fail.append(fail)
        self._go.release()


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Path]:
    store = KeyStore(tmp_path, "link")  # a WAL database, as the daemon's
    yield tmp_path / DATABASE
    store.close()


@pytest.mark.trio
async def test_a_commit_is_covered_only_by_a_sync_that_began_after_it(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = GatedSyncs(trio.lowlevel.current_trio_token())
    monkeypatch.setattr(durable, "sync_file", syncs)
    disk = DiskSync(database)
    done: list[int] = []

    async def waiter(ticket: int) -> None:
        await disk.wait(ticket)
        done.append(ticket)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, disk.ticket())
            await syncs.wait_started()
            # two commits while the first sync runs: it cannot cover them, the next one covers both
            nursery.start_soon(waiter, disk.ticket())
            nursery.start_soon(waiter, disk.ticket())
            await trio.testing.wait_all_tasks_blocked()
            syncs.end()
            await syncs.wait_started()
            assert done == [1]
            syncs.end()
        assert sorted(done) == [1, 2, 3] and syncs.count == disk.syncs == 2
        await disk.wait(3)  # already on the disk: no sync
        assert disk.syncs == 2


@pytest.mark.trio
async def test_a_failed_sync_fails_its_waiters_and_the_next_one_syncs_again(
    database: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    syncs = GatedSyncs(trio.lowlevel.current_trio_token())
    monkeypatch.setattr(durable, "sync_file", syncs)
    disk = DiskSync(database)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            failed: list[BaseException] = []

            async def waiter(ticket: int) -> None:
                try:
                    await disk.wait(ticket)
                except OSError as error:
                    failed.append(error)

            nursery.start_soon(waiter, disk.ticket())
            await syncs.wait_started()
            syncs.end(fail=True)
        assert len(failed) == 1 and "Input/output error" in str(failed[0])
        assert "disk sync of hand-outs failed" in caplog.text
        async with trio.open_nursery() as nursery:
            nursery.start_soon(disk.wait, 1)  # asked again: a new sync
            await syncs.wait_started()
            syncs.end()
        assert disk.syncs == 2


@pytest.mark.trio
async def test_the_real_sync_runs_on_its_thread(database: Path) -> None:
    disk = DiskSync(database)
    with trio.fail_after(10):
        await disk.wait(disk.ticket())
        await disk.wait(disk.ticket())
    assert disk.syncs == 2


def test_a_sync_without_a_wal_file_syncs_the_database(tmp_path: Path) -> None:
    database = tmp_path / "plain.db"
    database.write_bytes(b"x")
    sync_file(tmp_path / "plain.db-wal", database)  # no error: the database itself was synced


_TAKE_AND_DIE = """
import os, signal, sys
from pathlib import Path
from qkdd.store import KeyStore
store = KeyStore(Path(sys.argv[1]), "link")
[taken] = store.ledger("alice").take_many([(sys.argv[2:], "sae-a", "sae-b")], durable=False)
assert isinstance(taken, list), taken
os.kill(os.getpid(), signal.SIGKILL)  # before any sync, before any answer
"""


def test_a_hand_out_committed_without_the_disk_wait_survives_kill_9(tmp_path: Path) -> None:
    """The kernel keeps what the killed process wrote: after the restart the keys count as handed out
    (the slave asking again hears "already delivered"), never as keys to hand out a second time."""
    stores = KeyStore(tmp_path / "alice", "link"), KeyStore(tmp_path / "bob", "link")
    try:
        commit_round(stores, 0, 8)
        alice, bob = ledgers(stores)
        entry, _ = bob.allocate(3, 256, "sae-b", ["sae-a"])
        alice.apply(entry)
    finally:
        stores[0].close()
    ids = list(entry.key_ids)
    child = subprocess.run(
        [sys.executable, "-c", _TAKE_AND_DIE, str(tmp_path / "alice"), *ids[:2]],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    alice_store = KeyStore(tmp_path / "alice", "link")
    try:
        ledger = alice_store.ledger("alice")
        for key_id in ids[:2]:
            with pytest.raises(UnknownKey, match="already delivered"):
                ledger.take([key_id], "sae-a", "sae-b")
        assert len(ledger.take([ids[2]], "sae-a", "sae-b")[0]) == 32  # the other key is still there
    finally:
        alice_store.close()
        stores[1].close()


def test_a_hand_out_without_the_disk_wait_leaves_checkpoints_to_the_other_commits(tmp_path: Path) -> None:
    """It runs on the event loop, and a checkpoint (copying the WAL into the database, syncing both)
    would stall it for milliseconds: the WAL keeps its pages past the checkpoint threshold until a
    commit on a worker thread (any other: an applied entry, a round) checkpoints it."""
    stores = KeyStore(tmp_path / "alice", "link"), KeyStore(tmp_path / "bob", "link")
    try:
        commit_round(stores, 0, 8)
        alice, bob = ledgers(stores)
        entry, _ = bob.allocate(3, 256, "sae-b", ["sae-a"])
        alice.apply(entry)
        db = stores[0]._db
        db.execute("PRAGMA wal_autocheckpoint=1")  # every commit past one WAL page would checkpoint
        alice._autocheckpoint = 1
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        database = tmp_path / "alice" / DATABASE  # a checkpoint is what writes to it
        before = database.read_bytes()
        [taken] = alice.take_many([([entry.key_ids[0]], "sae-a", "sae-b")], durable=False)
        assert isinstance(taken, list) and database.read_bytes() == before  # no checkpoint
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1  # the setting is back
        alice.take_many([([entry.key_ids[1]], "sae-a", "sae-b")])  # a durable commit checkpoints
        assert database.read_bytes() != before
    finally:
        for store in stores:
            store.close()
