"""The sim backend matches its own model; the registry finds backends."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkdd.errors import InputError
from qkdd.links import AliceLink, BobLink, _sim_kernels, available, open_link, sim
from qkdd.links.sim import SimParameters, SimPreparation
from qkdd.stages.sifting import Detections

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


def test_detections_cover_the_whole_frame_once_each() -> None:
    """With a ragged frame size and many dark counts, the detections lie in the frame, in order, once
    each, and no stretch of the frame is short of them; they are a function of the seed."""
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
    for part in np.array_split(np.arange(pulses), 7):
        count = np.count_nonzero((indices >= part[0]) & (indices <= part[-1]))
        assert abs(count / part.size - expected) < 5 * math.sqrt(expected / part.size)
    assert bob_detections(options).indices.tolist() == indices.tolist()


def bob_detections(options: dict[str, object]) -> Detections:
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


MASK64, MASK24 = (1 << 64) - 1, (1 << 24) - 1


def _splitmix64(key: int, stream: int, index: int) -> int:
    x = (index * 0x9E3779B97F4A7C15 + key + stream * 0xD1B54A32D192ED03) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def test_the_hash_is_splitmix64() -> None:
    indices = np.array([0, 1, 7, 1 << 40, (1 << 62) + 3], dtype=np.int64)
    hashed = _sim_kernels.hashes(indices, sim.stream_offset(0xDEADBEEF, 2))
    assert hashed.tolist() == [_splitmix64(0xDEADBEEF, 2, int(i)) for i in indices]


def _class(x: int, p: SimParameters) -> int:
    return sum((x & MASK24) >= sim.threshold(edge) for edge in p._cumulative)


def test_the_preparation_is_bits_of_one_hash_per_pulse() -> None:
    """Bits 0-23 pick the class, bits 24-47 the basis (X iff they reach ⌈p_Z·2^24⌉), bit 63 the bit."""
    p = SimParameters.from_options({"pulses_per_frame": PULSES, "z_probability": 0.8, "seed": 7})
    indices = np.random.default_rng(1).choice(PULSES, 5000, replace=False).astype(np.int64)
    bits, bases, classes = SimPreparation(p, 4).at(indices)
    assert bits.dtype == bases.dtype == classes.dtype == np.uint8
    key = sim._frame_key(7, 4)
    x = [_splitmix64(key, 1, int(i)) for i in indices]
    assert bits.tolist() == [v >> 63 for v in x]
    assert bases.tolist() == [int((v >> 24) & MASK24 >= sim.threshold(0.8)) for v in x]
    assert classes.tolist() == [_class(v, p) for v in x]


def _reference_detections(p: SimParameters, frame: int) -> list[tuple[int, int, int, bool]]:
    """The model of :mod:`qkdd.links.sim`, pulse by pulse in plain Python: (index, Bob's basis, bit,
    double click) of each detection."""
    alice, bob = sim._frame_key(p.seed, frame), sim._frame_key(p.seed, frame, "qkdd-sim-bob")

    def process(stream: int, probability: float) -> set[int]:
        """Dark counts: geometric gaps 1 + ⌊−ln(u)/−ln(1 − p)⌋, u from draw 0, 1, ..."""
        found: set[int] = set()
        if probability <= 0:
            return found
        scale = 0.0 if probability >= 1 else -1 / math.log1p(-probability)
        position, draw = -1, 0
        while True:
            gap = -math.log(((_splitmix64(bob, stream, draw) >> 11) + 1) * 2.0**-53) * scale
            if position + 1.0 + gap >= p.pulses_per_frame:
                return found
            position += 1 + int(gap)
            found.add(position)
            draw += 1

    def candidates_of(probability: float) -> set[int]:
        """The signal candidates: gaps from the alias table (outcome K − 1: K − 1 more, draw again)."""
        thresholds, aliases, shift = sim.gap_table(probability)
        found: set[int] = set()
        position, draw = -1, 0
        while thresholds.size:
            h = _splitmix64(bob, 1, draw)
            draw += 1
            j = h >> int(shift)
            outcome = j if h & 0xFFFFFFFF < thresholds[j] else int(aliases[j])
            position += 1 + outcome if outcome < thresholds.size - 1 else outcome
            if position >= p.pulses_per_frame:
                break
            if outcome < thresholds.size - 1:
                found.add(position)
        return found

    arrival = [1 - math.exp(-p.transmittance * mu) for mu in p.intensities]
    top = max(arrival)
    candidates = candidates_of(top)
    dark = [process(2, p.dark_count_probability), process(3, p.dark_count_probability)]
    out = []
    for t in sorted(candidates | dark[0] | dark[1]):
        x, y = _splitmix64(alice, 1, t), _splitmix64(bob, 4, t)
        arrived = t in candidates and (y & MASK24) < sim.threshold(arrival[_class(x, p)] / top)
        if not (arrived or t in dark[0] or t in dark[1]):
            continue
        bit, basis = x >> 63, int((x >> 24) & MASK24 >= sim.threshold(p.z_probability))
        e = _splitmix64(alice, 2, t)
        if (e & MASK24) < sim.threshold(p.eve_fraction):
            eve_basis = int((e >> 24) & MASK24 < 1 << 23)
            bit = bit if eve_basis == basis else e >> 63
            basis = eve_basis
        bob_basis = int((y >> 24) & MASK24 >= sim.threshold(p.z_probability))
        u = _splitmix64(bob, 5, t) & MASK24
        flip = u < sim.threshold(p.misalignment) if bob_basis == basis else u < 1 << 23
        hit = bit ^ flip
        clicks = [(arrived and hit == d) or t in dark[d] for d in (0, 1)]
        out.append((t, bob_basis, int(clicks[1]), clicks[0] and clicks[1]))
    return out


@pytest.mark.parametrize(
    "options",
    [
        {"dark_count_probability": 3e-3, "eve_fraction": 0.5, "misalignment": 0.05},
        {"dark_count_probability": 0.0, "distance_km": 0.0, "detector_efficiency": 1.0},
        {"dark_count_probability": 1.0, "intensities": [0.0], "intensity_probabilities": [1.0]},
    ],
)
def test_bobs_detections_are_the_model_value_for_value(options: dict[str, object]) -> None:
    """The compiled pass gives what the model says, pulse by pulse: with Eve and many dark counts
    (double clicks, dark counts where no photon arrived), with no losses, and with dark counts alone."""
    p = SimParameters.from_options({"pulses_per_frame": 20_000, "seed": 3, **options})
    detections = sim.SimBob(p, ahead=False).simulate(2)
    assert detections.double_clicks is not None
    got = list(
        zip(
            detections.indices.tolist(),
            detections.bases.tolist(),
            detections.bits.tolist(),
            detections.double_clicks.tolist(),
            strict=True,
        )
    )
    assert got == _reference_detections(p, 2)
    assert len(got) > 100


@pytest.mark.parametrize("probability", [1.0, 0.5, 0.0864, 1e-3, 1e-5])
def test_the_gap_table_is_the_geometric_distribution(probability: float) -> None:
    """Each outcome's share of the alias table is its probability: gap j + 1 for j < K − 1, and "at least
    K" for the last, to the table's 2^-32 resolution."""
    thresholds, aliases, shift = sim.gap_table(probability)
    size = thresholds.size
    assert size == 1 << (64 - int(shift)) and 16 <= size <= 4096
    mass = np.zeros(size)
    for j in range(size):
        kept = int(thresholds[j]) / 2**32
        mass[j] += kept / size
        mass[aliases[j]] += (1 - kept) / size
    q = 1 - probability
    expected = [probability * q**j for j in range(size - 1)] + [q ** (size - 1)]
    assert np.allclose(mass, expected, rtol=0, atol=2**-30)
    assert sim.gap_table(0.0)[0].size == 0


def test_more_detections_than_guessed_give_the_same_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """The arrays are sized for six standard deviations above the mean; beyond, the pass runs again
    with larger ones and gives the same detections."""
    p = SimParameters.from_options({"pulses_per_frame": PULSES})
    expected = sim.SimBob(p, ahead=False).simulate(1)
    monkeypatch.setattr(sim, "_capacity", lambda mean: 3)
    again = sim.SimBob(p, ahead=False).simulate(1)
    assert np.array_equal(again.indices, expected.indices)
    assert np.array_equal(again.bits, expected.bits)


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
