"""``stored_key_count`` against the keys handed out, over arbitrary interleavings of enc_keys at both
sites (batches and leases included), dec_keys, restarts of either KME and new rounds: README's accounting
("drops by exactly what was handed out", the keys waiting in batches count, never above
``max_key_count``) as a property."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Any

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from qkdd.delivery.kme import KeyManager
from qkdd.delivery.ledger import Unavailable
from qkdd.records import key_id
from tests.delivery.test_kme import Sites, Wire, direct, open_sites
from tests.delivery.test_ledger import BLOCK, summary

MOST = 40  # max_key_count: keys of 256 bits
UNIT = 32  # bytes of a key of key_size
ROLES = ("alice", "bob")
OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("enc"), st.sampled_from(ROLES), st.integers(1, 4), st.sampled_from([256, 512, 8192])
        ),
        st.tuples(st.just("both"), st.integers(1, 3)),  # a master at each site asks at once
        st.tuples(st.just("dec"), st.sampled_from(ROLES), st.integers(1, 3)),
        st.tuples(st.just("restart"), st.sampled_from(ROLES)),
        st.tuples(st.just("round"), st.integers(1, 12)),
    ),
    max_size=30,
)


def peer(role: str) -> str:
    return "bob" if role == "alice" else "alice"


class Books:
    """What the test knows happened: the pool's bytes, what masters got, what restarts burned."""

    def __init__(self, sites: Sites, nursery: trio.Nursery, wire: Wire) -> None:
        self.sites, self.nursery, self.wire = sites, nursery, wire
        self.total = 8 * BLOCK
        self.handed = 0
        self.burned = 0
        self.rounds = 1
        self.waiting: dict[str, collections.deque[tuple[str, bytes]]] = {
            r: collections.deque() for r in ROLES
        }

    async def enc(self, site: str, number: int, size: int) -> None:
        manager = self.sites.managers[site]
        try:
            keys = await manager.enc_keys(f"sae-{site}", [f"sae-{peer(site)}"], number, size)
        except Unavailable:
            return  # not enough key material: nothing consumed, and the books below say so
        assert all(len(key) == size // 8 for _, key in keys)
        self.handed += number * size // 8
        self.waiting[peer(site)].extend(keys)

    async def dec(self, site: str, count: int) -> None:
        """The slave at ``site`` fetches the oldest keys its master got (every one, however the master's
        KME restarted since)."""
        keys = [self.waiting[site].popleft() for _ in range(min(count, len(self.waiting[site])))]
        if keys:
            got = await self.sites.managers[site].dec_keys(
                f"sae-{site}", f"sae-{peer(site)}", [k for k, _ in keys]
            )
            assert got == keys

    async def restart(self, site: str) -> None:
        """The KME of ``site`` restarts: its connection ends, the keys waiting in its batches are gone."""
        old = self.sites.managers[site]
        self.burned += old.batched_bytes
        self.wire.cut()
        self.sites.managers[site] = KeyManager(site, old.settings, old.ledger, direct)
        self.nursery.start_soon(self.sites.managers[site].run)
        self.wire = await self.sites.connect(self.nursery)

    def round(self, blocks: int) -> None:
        """A round of ``blocks`` key blocks commits at both sites, if Alice's room takes it (as the
        daemon asks before each round)."""
        if self.sites.managers["alice"].store_full(blocks * BLOCK * 8):
            return
        rows = [(key_id("link", self.rounds, i), bytes([self.rounds]) * BLOCK) for i in range(blocks)]
        for store in self.sites.stores.values():
            store.store_round(summary(self.rounds), rows, False, 1.0)
        self.rounds += 1
        self.total += blocks * BLOCK

    async def check(self) -> None:
        for site in ROLES:
            manager = self.sites.managers[site]
            # what this site knows: every byte not handed to a master, not burned, and not waiting in the
            # other site's batches (cut there already, and told here as handed out)
            held = self.total - self.handed - self.burned - self.sites.managers[peer(site)].batched_bytes
            status = await manager.status(f"sae-{site}", f"sae-{peer(site)}")
            assert status["stored_key_count"] == min(MOST, held // UNIT), site
            assert status["stored_key_count"] <= status["max_key_count"] == MOST
        # Alice starts a round only if it fits, so what she holds never passes max_key_count (Bob may
        # count more by what waits in his batches and not hers: his status shows max_key_count then)
        assert self.sites.managers["alice"].held_keys() <= MOST


async def scenario(folder: Path, ops: list[tuple[Any, ...]]) -> None:
    with open_sites(folder, blocks=8, max_key_count=MOST, batch_size=1024) as sites:
        async with trio.open_nursery() as nursery:
            books = Books(sites, nursery, await sites.connect(nursery))
            await books.check()
            for op in ops:
                match op:
                    case ("enc", site, number, size):
                        await books.enc(site, number, size)
                    case ("both", number):
                        async with trio.open_nursery() as both:
                            for site in ROLES:
                                both.start_soon(books.enc, site, number, 256)
                    case ("dec", site, count):
                        await books.dec(site, count)
                    case ("restart", site):
                        await books.restart(site)
                    case ("round", blocks):
                        books.round(blocks)
                await trio.testing.wait_all_tasks_blocked()  # every notice and grant applied
                await books.check()
            for site in ROLES:  # every key a master got reaches its slave
                await books.dec(site, len(books.waiting[site]))
            nursery.cancel_scope.cancel()


@given(OPS)
def test_stored_key_count_follows_the_keys_handed_out_and_stays_under_max_key_count(
    ops: list[tuple[Any, ...]],
) -> None:
    with tempfile.TemporaryDirectory(prefix="qkdd-accounting-") as folder:
        trio.run(scenario, Path(folder), ops)
