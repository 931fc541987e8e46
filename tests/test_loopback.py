"""Both engines joined in memory (qkdd/loopback.py): what `qkdd bench` measures is the daemons' round."""

from __future__ import annotations

from qkdd import engine, loopback
from qkdd.links.sim import SimAlice, SimBob, SimParameters
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
