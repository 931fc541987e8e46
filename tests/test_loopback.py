"""Both engines joined in memory (qkdd/loopback.py): what `qkdd bench` measures is the daemons' round."""

from __future__ import annotations

import gc

from qkdd import engine, loopback
from qkdd.links.sim import SimAlice, SimBob, SimParameters
from qkdd.stages.cascade import CascadeBob
from tests.helpers import PSK, SMALL_SIM, SeededRandom


def run(rounds: int, **sim: object) -> tuple[list, loopback.MemoryStore, loopback.MemoryStore]:
    parameters = SimParameters.from_options({**SMALL_SIM, **sim})
    stores = loopback.MemoryStore(), loopback.MemoryStore()
    settings = engine.EngineSettings(link_id="loopback", psk=PSK)
    links = SimAlice(parameters), SimBob(parameters)
    summaries = loopback.run_rounds(settings, links, (SeededRandom(1), SeededRandom(2)), rounds, stores)
    return summaries, *stores


def test_honest_rounds_store_identical_keys_at_both_sides() -> None:
    summaries, alice, bob = run(2)
    assert [s.aborted for s in summaries] == [False, False]
    assert all(s.secret_bits > 0 and 0.005 < (s.qber or 0) < 0.02 for s in summaries)
    assert alice.key_map() == bob.key_map() and len(alice.key_map()) == sum(
        s.secret_bits // 256 for s in summaries
    )


def test_an_eavesdropper_on_every_pulse_leaves_nothing() -> None:
    summaries, alice, bob = run(1, eve_fraction=1.0)
    assert summaries[0].aborted and "threshold" in (summaries[0].reason or "")
    assert alice.key_map() == bob.key_map() == {}


def _live_searches() -> int:
    return sum(isinstance(each, CascadeBob) for each in gc.get_objects())


def test_rounds_that_end_free_their_cascade_search_without_the_garbage_collector() -> None:
    """A round's end, committed or cut off in the middle of Cascade, releases Bob's search (a reference
    cycle): the daemons grew by about 30 MB a round while it waited for a rare full collection."""
    gc.collect()
    gc.disable()
    try:
        summaries, _, _ = run(2)
        assert [s.aborted for s in summaries] == [False, False] and _live_searches() == 0

        parameters = SimParameters.from_options(SMALL_SIM)
        stores = loopback.MemoryStore(), loopback.MemoryStore()
        settings = engine.EngineSettings(link_id="loopback", psk=PSK)
        links = SimAlice(parameters), SimBob(parameters)
        alice = engine.Engine("alice", settings, info=links[0].info, store=stores[0], random=SeededRandom(1))
        bob = engine.Engine("bob", settings, info=links[1].info, store=stores[1], random=SeededRandom(2))
        pair = loopback.EnginePair(alice, stores[0], bob, stores[1], links)
        pair.connect()
        pair.handle("alice", alice.start_round())
        while not any(kind == "cascade_parities" for _, kind in pair.log):
            assert pair.step(), "the round ended before Cascade"
        assert _live_searches() == 1  # Bob's search, under way
        bob.close("shutdown", "stopping in the middle of Cascade")
        assert _live_searches() == 0
    finally:
        gc.enable()
