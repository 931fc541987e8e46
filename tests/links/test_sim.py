"""The sim backend matches its own model; the registry finds backends."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkdd.errors import InputError
from qkdd.links import AliceLink, BobLink, available, open_link, sim
from qkdd.links.sim import SimParameters, SimPreparation

PULSES = 1 << 21


def sifted(options: dict[str, object]) -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    alice = open_link("sim", "alice", options)
    bob = open_link("sim", "bob", options)
    assert isinstance(alice, AliceLink) and isinstance(bob, BobLink)
    detections = bob.detections(3)
    bits, bases, classes = alice.preparation(3).at(detections.indices)
    keep = (bases == detections.bases) & ~np.asarray(detections.double_clicks)
    return bits[keep], detections.bits[keep], classes[keep], detections


def test_detection_rate_and_qber_follow_the_model() -> None:
    options = {"pulses_per_frame": PULSES, "distance_km": 20.0, "misalignment": 0.02}
    alice_bits, bob_bits, _, detections = sifted(options)
    p = SimParameters.from_options(options)
    expected = sum(
        prob * (1 - math.exp(-p.transmittance * mu) * (1 - p.dark_count_probability) ** 2)
        for mu, prob in zip(p.intensities, p.intensity_probabilities, strict=True)
    )
    rate = detections.indices.size / PULSES
    assert abs(rate - expected) < 5 * math.sqrt(expected / PULSES)
    qber = float(np.mean(alice_bits != bob_bits))
    assert abs(qber - 0.02) < 0.004


def test_chunks_join_into_one_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bob's frame is simulated in chunks: with small ones and a ragged end, the detections still cover
    the whole frame uniformly, in order, once each."""
    monkeypatch.setattr(sim, "CHUNK_PULSES", 1 << 15)
    pulses = PULSES + 12345
    options = {"pulses_per_frame": pulses, "distance_km": 20.0, "dark_count_probability": 1e-4}
    _, _, _, detections = sifted(options)
    indices = detections.indices
    assert indices.dtype == np.int64 and indices[0] >= 0 and indices[-1] < pulses
    assert np.all(np.diff(indices) > 0)
    p = SimParameters.from_options(options)
    expected = sum(
        prob * (1 - math.exp(-p.transmittance * mu) * (1 - p.dark_count_probability) ** 2)
        for mu, prob in zip(p.intensities, p.intensity_probabilities, strict=True)
    )
    for part in np.array_split(np.arange(pulses), 7):  # no stretch of the frame is short of detections
        count = np.count_nonzero((indices >= part[0]) & (indices <= part[-1]))
        assert abs(count / part.size - expected) < 5 * math.sqrt(expected / part.size)
    assert bob_detections(options).indices.tolist() == indices.tolist()  # still a function of the seed


def bob_detections(options: dict[str, object]) -> object:
    bob = open_link("sim", "bob", options)
    assert isinstance(bob, BobLink)
    return bob.detections(3)


def test_an_eavesdropper_on_every_pulse_causes_a_quarter_of_errors() -> None:
    alice_bits, bob_bits, _, _ = sifted(
        {"pulses_per_frame": PULSES, "eve_fraction": 1.0, "misalignment": 0.0}
    )
    assert abs(float(np.mean(alice_bits != bob_bits)) - 0.25) < 0.01


def test_preparation_is_counter_based() -> None:
    preparation = SimPreparation(SimParameters(pulses_per_frame=1000), frame=9)
    everything = preparation.at(np.arange(1000))
    some = preparation.at(np.array([999, 3, 500]))
    for whole, part in zip(everything, some, strict=True):
        assert np.array_equal(whole[[999, 3, 500]], part)
    classes = everything[2]
    assert set(np.unique(classes)) <= {0, 1, 2}
    other_frame = SimPreparation(SimParameters(pulses_per_frame=1000), frame=10).at(np.arange(1000))
    assert not np.array_equal(everything[0], other_frame[0])


def _splitmix64(key: int, stream: int, index: int) -> int:
    mask = (1 << 64) - 1
    x = (index * 0x9E3779B97F4A7C15 + key + stream * 0xD1B54A32D192ED03) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_the_hash_is_splitmix64_across_its_blocks() -> None:
    """The vectorised hash runs in blocks that stay in cache; every block gives the scalar function's
    values, the last (partial) one included."""
    indices = np.arange(0, 3 * sim._HASH_BLOCK + 5, 7, dtype=np.int64) * 1_000_003
    hashed = sim._hash(0xDEADBEEF, 2, indices)
    rows = [0, 1, sim._HASH_BLOCK // 7, indices.size - 1]
    assert [int(hashed[i]) for i in rows] == [_splitmix64(0xDEADBEEF, 2, int(indices[i])) for i in rows]
    assert sim._hash(1, 1, indices[:0]).size == 0


def test_bit_and_basis_are_bit_63_and_bits_24_to_47_of_the_hash() -> None:
    parameters = SimParameters.from_options({"pulses_per_frame": PULSES, "z_probability": 0.8})
    k = math.ceil(0.8 * 2**24)  # the basis is Z (0) below this value of bits 24-47, X (1) from it
    low = (1 << 24) - 1
    values = [0, low, k << 24, (k << 24) - 1, ((k - 1) << 24) | low, (1 << 48) - 1, 1 << 63, (1 << 64) - 1]
    values += [(1 << 63) | (k << 24), (1 << 63) | ((k << 24) - 1), (1 << 48) | ((k - 1) << 24)]
    bits, bases = SimPreparation(parameters, 0).bits_and_bases(np.array(values, dtype=np.uint64))
    assert bits.dtype == bases.dtype == np.uint8
    assert bits.tolist() == [v >> 63 for v in values]
    assert bases.tolist() == [int((v >> 24) & low >= k) for v in values]


def test_a_large_lookup_split_over_two_threads_gives_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    preparation = SimPreparation(SimParameters.from_options({"pulses_per_frame": 1 << 24}), 5)
    indices = np.sort(np.random.default_rng(2).choice(1 << 24, 3001, replace=False)).astype(np.int64)
    whole = preparation.at(indices)  # below the threshold: one thread
    monkeypatch.setattr(sim, "PARALLEL_AT", 1000)
    split = preparation.at(indices)
    for one, other in zip(whole, split, strict=True):
        assert one.dtype == other.dtype and np.array_equal(one, other)


def test_intensity_and_basis_frequencies() -> None:
    bits, bases, classes = SimPreparation(SimParameters(), frame=0).at(np.arange(200_000))
    assert abs(bases.mean() - 0.2) < 0.005 and abs(bits.mean() - 0.5) < 0.005
    assert np.allclose(np.bincount(classes) / classes.size, [0.4, 0.4, 0.2], atol=0.005)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"distance_km": -1}, "link.sim.distance_km"),
        ({"z_probability": 1.0}, "link.sim.z_probability"),
        ({"intensities": [0.5, 0.1]}, "link.sim.intensity_probabilities"),
        ({"intensity_probabilities": [0.5, 0.2, 0.2]}, "sum to 1"),
        ({"pulses_per_frame": 0}, "link.sim.pulses_per_frame"),
        ({"pulses_per_frame": 1.5}, "link.sim.pulses_per_frame"),
        ({"seed": "x"}, "link.sim.seed"),
        ({"colour": 1}, "link.sim.colour: unknown option"),
    ],
)
def test_bad_parameters_name_the_key(options: dict[str, object], match: str) -> None:
    with pytest.raises(InputError, match=match):
        open_link("sim", "bob", options)


def test_registry() -> None:
    assert "sim" in available()
    with pytest.raises(InputError, match="unknown backend 'laser'"):
        open_link("laser", "alice", {})
