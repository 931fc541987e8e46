"""A link upgrades from qkdp/1 to qkdp/2 by restarting both sides (qkdp-v2.md §17, "Upgrading").

tests/data/qkdp1/ holds both state directories of a qkdp/1 link (qkdd 867a753) after six rounds: its
reserve took over, the PSK is retired, the epoch is 2 and 490 key blocks are stored. The qkdp/2 daemons
open them, authenticate with the initial handshake key (no PSK: it is retired, and these configs even
hold a new one), and go on: old keys kept, the reserve position carried over, no reserve bit used twice.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from pathlib import Path

import pytest
import trio

from qkdd.store import KeyStore
from tests.test_daemon import configs, start_pair, until

DATA = Path(__file__).parent / "data" / "qkdp1"
AUTH = {"reserve_switch_bits": 1024, "reserve_bits_per_round": 1024, "reserve_target_bits": 8192}


def snapshot(state_dir: Path) -> tuple[dict[str, bytes], int, int, bool, int]:
    store = KeyStore(state_dir, None, create=False)
    try:
        keys = dict(store.committed_keys())
        return keys, store.reserve.total_bits, store.reserve.consumed, store.psk_retired, store.epoch
    finally:
        store.close()


@pytest.mark.trio
async def test_a_qkdp1_state_directory_carries_over(tmp_path: Path) -> None:
    alice_config, bob_config = configs(tmp_path, 2)
    for role, config_ in (("alice", alice_config), ("bob", bob_config)):
        shutil.copy(DATA / role / "keys.sqlite3", config_.state_dir / "keys.sqlite3")
    old = snapshot(alice_config.state_dir)
    assert old == snapshot(bob_config.state_dir)
    old_keys, old_total, old_consumed, retired, epoch = old
    assert retired and epoch == 2 and len(old_keys) == 490
    alice_config, bob_config = (
        dataclasses.replace(c, auth=dataclasses.replace(c.auth, **AUTH)) for c in (alice_config, bob_config)
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            alice, bob = await start_pair(nursery, alice_config, bob_config)
            await until(lambda: alice.rounds_finished >= 2 and bob.rounds_finished >= 2)
            alice.request_stop("test over")
            bob.request_stop("test over")
    keys, total, consumed, retired, epoch = snapshot(alice_config.state_dir)
    assert (keys, total, consumed) == snapshot(bob_config.state_dir)[:3]
    assert keys.items() >= old_keys.items() and len(keys) > len(old_keys)  # old keys kept, new ones added
    assert total > old_total and consumed > old_consumed and retired and epoch == 2
    for state_dir in (alice_config.state_dir, bob_config.state_dir):
        store = KeyStore(state_dir, None, create=False)
        try:
            spans = sorted(store.reserve.used_ranges())
            assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
            keys = store.reserve.handshake_keys()
            assert keys.current == 0 and keys.next is not None  # the upgrade key, and its replacement
            assert [r["auth"] for r in store.rounds(2)] == ["reserve", "reserve"]
        finally:
            store.close()
