"""The SQLite key store (qkdp-v2.md §13-§14)."""

from __future__ import annotations

import sqlite3
import stat
import uuid
from pathlib import Path

import numpy as np
import pytest

from qkdd.database import transaction
from qkdd.errors import InputError
from qkdd.records import KEY_ID_NAMESPACE, RoundSummary, key_blocks, key_id, key_ids
from qkdd.store import DATABASE, KeyStore
from tests.conftest import load_vectors


def summary(number: int, secret: int = 512) -> RoundSummary:
    return RoundSummary(number, number, 100, 10, 8, 0.01, 0.02, 5, secret, False, None, "psk")


def blocks(number: int, count: int = 2) -> list[tuple[str, bytes]]:
    return [(key_id("l", number, i), bytes([number, i]) * 16) for i in range(count)]


def test_files_are_private(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "state", "l")
    store.store_round(summary(0), blocks(0), False, 1.0)
    for name in (DATABASE, DATABASE + "-wal"):
        path = tmp_path / "state" / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, name
    store.close()


OLD_KEYS_TABLE = """
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('pending', 'committed', 'aborted')),
    frame INTEGER NOT NULL, pulses INTEGER NOT NULL, detections INTEGER NOT NULL,
    sifted_bits INTEGER NOT NULL, qber REAL, phase_error REAL, disclosed_bits INTEGER NOT NULL,
    secret_bits INTEGER NOT NULL, reason TEXT, auth TEXT NOT NULL, seconds REAL, finished_at REAL NOT NULL
);
CREATE TABLE keys (
    key_id TEXT PRIMARY KEY,
    round INTEGER NOT NULL REFERENCES rounds (round),
    idx INTEGER NOT NULL,
    key BLOB NOT NULL
);
CREATE INDEX keys_round ON keys (round);
CREATE INDEX keys_position ON keys (round, idx);
"""


def test_an_older_store_is_converted_with_every_key_kept(tmp_path: Path) -> None:
    """Stores written before the keys table was clustered by (round, index) keep every key, in order,
    and go on taking rounds."""
    db = sqlite3.connect(tmp_path / DATABASE)
    db.executescript(OLD_KEYS_TABLE)
    for number in (0, 1):
        db.execute(
            "INSERT INTO rounds VALUES "
            "(?, 'committed', ?, 100, 10, 8, 0.01, 0.02, 5, 512, NULL, 'psk', 1, 0)",
            (number, number),
        )
        for index, (kid, key) in reversed(list(enumerate(blocks(number, 3)))):  # out of order on purpose
            db.execute("INSERT INTO keys VALUES (?, ?, ?, ?)", (kid, number, index, key))
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('link_id', 'l')")
    db.commit()
    db.close()
    store = KeyStore(tmp_path, "l")
    assert list(store.committed_keys()) == blocks(0, 3) + blocks(1, 3)
    store.store_round(summary(2), blocks(2), False, 1.0)
    assert list(store.committed_keys())[-2:] == blocks(2)
    assert store.statistics().stored_keys == 8
    store.close()
    db = sqlite3.connect(tmp_path / DATABASE)
    (table,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'keys'").fetchone()
    assert "WITHOUT ROWID" in table
    assert (
        db.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'keys' AND type = 'index'").fetchall()
        == []
    )
    db.close()
    KeyStore(tmp_path, "l").close()  # a converted store opens as it is


def test_round_numbers_only_grow(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, "l")
    assert store.next_round == 0
    store.reserve_round(0)
    store.reserve_round(5)
    with pytest.raises(InputError, match="already used"):
        store.reserve_round(3)
    store.close()
    assert KeyStore(tmp_path, "l").next_round == 6


def test_pending_commit_resolve_and_abort(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, "l")
    for number in range(3):
        store.store_round(summary(number), blocks(number), True, None)
    assert store.pending_rounds() == [0, 1, 2] and list(store.committed_keys()) == []
    store.commit_round(0)
    assert [k for k, _ in store.committed_keys()] == [k for k, _ in blocks(0)]
    assert store.committed_among([0, 1, 7]) == [0]
    assert store.resolve([1]) == ([1], [2])
    assert store.pending_rounds() == []
    assert len(list(store.committed_keys())) == 4
    store.record_aborted(summary(0, 0), 1.0)  # never touches a committed round
    assert len(list(store.committed_keys())) == 4
    with pytest.raises(InputError, match="already in the store"):
        store.store_round(summary(1), blocks(1), False, None)
    with pytest.raises(InputError, match="not pending"):
        store.commit_round(1)
    stats = store.statistics()
    assert (stats.committed_rounds, stats.aborted_rounds, stats.stored_keys, stats.stored_key_bits) == (
        2,
        1,
        4,
        1024,
    )


def test_a_store_belongs_to_one_link(tmp_path: Path) -> None:
    KeyStore(tmp_path, "l").close()
    with pytest.raises(InputError, match="belongs to link 'l'"):
        KeyStore(tmp_path, "m")
    assert KeyStore(tmp_path, None, create=False).link_id == "l"
    with pytest.raises(InputError, match="no key store"):
        KeyStore(tmp_path / "empty", None, create=False)


def test_key_ids_match_the_vectors() -> None:
    for vector in load_vectors("key_ids"):
        assert key_id(vector["link_id"], vector["round"], vector["index"]) == vector["key_id"]


def test_key_ids_are_the_standard_uuid5_of_their_name() -> None:
    """The batched IDs (one SHA-1 prefix, version and variant written into the hex) are uuid5's."""
    for link_id, number in (("l", 0), ("ü link", 12345678901)):
        expected = [
            str(uuid.uuid5(KEY_ID_NAMESPACE, f"qkdp/1 key {link_id} {number} {i}")) for i in range(600)
        ]
        assert key_ids(link_id, number, 600) == expected
        assert key_ids(link_id, number, 5, 595) == expected[595:]


def test_key_blocks_cut_whole_blocks() -> None:
    key = np.arange(600, dtype=np.uint8) % 2
    cut = key_blocks("l", 3, key, 256)
    assert len(cut) == 2 and all(len(b) == 32 for _, b in cut)
    assert cut[0][1] == np.packbits(key[:256]).tobytes()
    with pytest.raises(ValueError, match="multiple of 8"):
        key_blocks("l", 3, key, 12)
    assert [name for name, _ in cut] == [key_id("l", 3, 0), key_id("l", 3, 1)]
    # IDs computed ahead serve the first blocks; more than the blocks, or fewer, change nothing
    for ahead in (key_ids("l", 3, 5), key_ids("l", 3, 1), []):
        assert key_blocks("l", 3, key, 256, ahead) == cut


def test_the_reserve_is_the_committed_chunks_in_commit_order(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, "l")
    rng = np.random.default_rng(5)
    chunks = {r: rng.integers(0, 2, 300 + 7 * r, dtype=np.uint8) for r in range(3)}

    def packed(r: int) -> tuple[bytes, int]:
        return np.packbits(chunks[r]).tobytes(), int(chunks[r].size)

    store.store_round(summary(0), blocks(0), False, None, packed(0))
    store.store_round(summary(1), blocks(1), True, None, packed(1))  # pending: not in the stream yet
    assert store.reserve.total_bits == 300
    store.commit_round(1)
    store.store_round(summary(2), blocks(2), False, None, packed(2))
    stream = np.concatenate([chunks[0], chunks[1], chunks[2]])
    assert store.reserve.total_bits == stream.size
    for start, count in ((0, 122), (290, 40), (128, 600), (stream.size - 61, 61)):
        got = np.unpackbits(np.frombuffer(store.reserve.read(start, count), dtype=np.uint8), count=count)
        assert np.array_equal(got, stream[start : start + count])
    with pytest.raises(InputError, match="do not exist"):
        store.reserve.read(stream.size - 10, 11)
    assert store.reserve.consumed == 128
    store.reserve.consume(250)
    store.reserve.consume(200)  # never backwards
    store.reserve.consume(372)
    assert store.reserve.consumed == 372
    assert store.reserve.used_ranges() == [(128, 250), (250, 372)]
    store.close()
    assert KeyStore(tmp_path, "l").reserve.consumed == 372  # durable


def test_a_dropped_pending_round_leaves_the_reserve_alone(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, "l")
    store.store_round(summary(0), blocks(0), True, None, (bytes(64), 512))
    assert store.resolve([]) == ([], [0])
    assert store.reserve.total_bits == 0


def test_a_transaction_that_need_not_be_durable_leaves_the_database_durable(tmp_path: Path) -> None:
    """Applying a peer's key-channel entry commits without an fsync (the peer repeats a lost entry);
    that setting holds for that transaction alone, whether it commits or rolls back."""
    db = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (x INTEGER)")

    def synchronous() -> int:
        return int(db.execute("PRAGMA synchronous").fetchone()[0])

    with transaction(db, durable=False):
        db.execute("INSERT INTO t VALUES (1)")
        assert synchronous() == 1  # NORMAL
    assert synchronous() == 2  # FULL
    with pytest.raises(RuntimeError), transaction(db, durable=False):
        db.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("rolled back")
    assert synchronous() == 2
    assert db.execute("SELECT x FROM t").fetchall() == [(1,)]
    db.close()
