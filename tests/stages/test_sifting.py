from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qkdd.bits import encode_varints
from qkdd.errors import InputError, RemoteProtocolError
from qkdd.stages import sifting
from qkdd.stages.pipeline import synthetic_frame


def _sift(prep: sifting.FramePreparation, det: sifting.Detections):
    announce = sifting.bob_announce(det)
    answer, alice = sifting.alice_answer(prep, announce)
    return announce, answer, alice, sifting.bob_sift(det, answer)


@pytest.mark.parametrize("detection_probability", [0.001, 0.05, 0.5, 1.0])
def test_both_sides_keep_the_same_positions(rng: np.random.Generator, detection_probability: float) -> None:
    prep, det = synthetic_frame(rng, 20000, detection_probability=detection_probability, qber=0.0)
    prep = dataclasses.replace(prep, intensities=rng.integers(0, 3, prep.pulses).astype(np.uint8))
    _, _, alice, bob = _sift(prep, det)
    assert np.array_equal(alice.pulse_indices, bob.pulse_indices)
    assert np.array_equal(alice.bits, bob.bits)  # qber 0
    assert np.array_equal(alice.bases, bob.bases)
    assert np.array_equal(alice.intensities, bob.intensities)
    assert np.array_equal(alice.intensities, prep.intensities[alice.pulse_indices])
    expected = np.flatnonzero(prep.bases[det.indices] == det.bases)
    assert np.array_equal(bob.pulse_indices, det.indices[expected])
    assert alice.counts()[(sifting.Z, 0)] == int(np.sum((alice.bases == 0) & (alice.intensities == 0)))


def test_index_encoding_picks_the_smaller(rng: np.random.Generator) -> None:
    sparse = np.sort(rng.choice(10**6, 100, replace=False))
    dense = np.sort(rng.choice(10**4, 5000, replace=False))
    assert sifting.encode_indices(sparse, 10**6)[0] == "gaps"
    assert sifting.encode_indices(dense, 10**4)[0] == "bitmap"
    edges = (np.zeros(0, dtype=np.int64), np.array([0]), np.array([7, 8, 9 + 300, 10**6 - 1]))
    for indices, pulses in ((sparse, 10**6), (dense, 10**4), *((e, 10**6) for e in edges)):
        encoding, payload = sifting.encode_indices(indices, pulses)
        message = sifting.SiftAnnounce(pulses, indices.size, encoding, payload, b"")
        assert np.array_equal(sifting.decode_indices(message), indices)


def test_wire_cost_per_detection_is_small(rng: np.random.Generator) -> None:
    prep, det = synthetic_frame(rng, 10**6, detection_probability=0.01, qber=0.0)
    announce, answer, _, _ = _sift(prep, det)
    per_detection = (announce.wire_bytes + answer.wire_bytes) / det.indices.size
    # gaps average 100: 1.28 varint bytes; + 1/8 basis + 1/8 match + 2 bits of class per match (~82%)
    assert per_detection < 1.8


def test_double_clicks_get_random_bits(rng: np.random.Generator) -> None:
    det = sifting.Detections(
        100,
        np.arange(0, 100, 2),
        np.zeros(50, np.uint8),
        np.zeros(50, np.uint8),
        double_clicks=np.ones(50, bool),
    )
    resolved = sifting.resolve_double_clicks(det, rng)
    assert resolved.double_clicks is None
    assert 5 < resolved.bits.sum() < 45
    # a copy with new bits: the validated indices are shared, the original is left as it was
    assert resolved.indices is det.indices and resolved.pulses == det.pulses
    assert det.double_clicks is not None and det.bits.sum() == 0
    with pytest.raises(InputError, match="double clicks"):
        sifting.bob_announce(det)


def test_an_announcement_encoded_ahead_is_the_one_sent(rng: np.random.Generator) -> None:
    """A backend may encode Bob's indices ahead (the simulator does, with the next frame); resolving
    double clicks keeps that encoding, and the announcement carries exactly what encode_indices gives."""
    indices = np.sort(rng.choice(1 << 16, 3000, replace=False)).astype(np.int64)
    det = sifting.Detections(
        1 << 16,
        indices,
        np.zeros(3000, np.uint8),
        np.ones(3000, np.uint8),
        double_clicks=np.zeros(3000, bool),
    )
    ahead = det.encoded_indices
    resolved = sifting.resolve_double_clicks(det, rng)
    assert resolved.encoded_indices is ahead
    announce = sifting.bob_announce(resolved)
    assert (announce.encoding, announce.indices) == sifting.encode_indices(indices, 1 << 16)
    fresh = sifting.resolve_double_clicks(dataclasses.replace(det), rng)  # nothing encoded ahead
    assert sifting.bob_announce(fresh).indices == announce.indices


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"indices": [3, 2]}, "strictly increasing"),
        ({"indices": [1, 1]}, "strictly increasing"),
        ({"indices": [1, 10]}, r"\[0, 10\)"),
        ({"bases": [0]}, "differ in length"),
        ({"bits": [0, 2]}, "0 or 1"),
        ({"bits": np.array([0.0, 1.0])}, "dtype"),
        ({"pulses": 0}, "frame pulses"),
        ({"double_clicks": [True]}, "one flag per detection"),
    ],
)
def test_bad_detections(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"pulses": 10, "indices": [1, 2], "bases": [0, 1], "bits": [1, 0]}
    fields.update(kwargs)
    with pytest.raises(InputError, match=message):
        sifting.Detections(**fields)  # type: ignore[arg-type]


def test_bad_preparation() -> None:
    with pytest.raises(InputError, match="differ in length"):
        sifting.FramePreparation(np.zeros(3, np.uint8), np.zeros(2, np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(InputError, match="empty frame"):
        sifting.FramePreparation(np.zeros(0, np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.uint8))
    with pytest.raises(InputError, match="intensity"):
        sifting.FramePreparation(np.zeros(2, np.uint8), np.zeros(2, np.uint8), np.array([0, 9]))


def test_peer_announcements_that_do_not_fit(rng: np.random.Generator) -> None:
    prep, det = synthetic_frame(rng, 1000, detection_probability=0.3, qber=0.0)
    good = sifting.bob_announce(det)
    bad = [
        (dataclasses.replace(good, pulses=999), "pulses"),
        (dataclasses.replace(good, detections=good.detections + 1), "varints|population|expected"),
        (dataclasses.replace(good, encoding="zip"), "unknown index encoding"),  # type: ignore[arg-type]
        (dataclasses.replace(good, bases=good.bases[:-1]), "expected"),
        (dataclasses.replace(good, detections=2000), "out of range"),
    ]
    gaps = sifting.SiftAnnounce(1000, 1, "gaps", bytes([0xE8, 0x07]), b"\x00")  # index 1000
    bad.append((gaps, "outside the frame"))
    # two gaps of 600 pulses: each inside the frame, the second index (1201) past its end
    apart = sifting.SiftAnnounce(1000, 2, "gaps", encode_varints(np.array([600, 600])), b"\x00")
    bad.append((apart, "outside the frame"))
    for message, pattern in bad:
        with pytest.raises(RemoteProtocolError, match=pattern):
            sifting.alice_answer(prep, message)


def test_gaps_that_each_fit_but_overflow_together_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gaps that each lie inside the frame but whose sum passes 2^63. With frames up to 2^40 pulses that
    takes over 2^23 gaps (56 MB); with the limit raised to 2^62 for the test, three do."""
    monkeypatch.setattr(sifting, "MAX_FRAME_PULSES", 1 << 62)
    largest = np.full(3, (1 << 62) - 1, dtype=np.uint64)
    message = sifting.SiftAnnounce(1 << 62, 3, "gaps", encode_varints(largest), b"\x00")
    with pytest.raises(RemoteProtocolError, match="outside the frame"):
        sifting.decode_indices(message)


def test_answers_that_do_not_fit(rng: np.random.Generator) -> None:
    prep, det = synthetic_frame(rng, 1000, detection_probability=0.3, qber=0.0)
    answer, _ = sifting.alice_answer(prep, sifting.bob_announce(det))
    with pytest.raises(RemoteProtocolError, match="matches"):
        sifting.bob_sift(det, dataclasses.replace(answer, matches=answer.matches + b"\x00"))
    with pytest.raises(RemoteProtocolError, match="intensity"):
        sifting.bob_sift(det, dataclasses.replace(answer, intensities=b""))


def test_z_class_counts_count_every_class_of_the_z_bits(rng: np.random.Generator) -> None:
    n = 10_000
    bases = (rng.random(n) < 0.3).astype(np.uint8)
    classes = rng.integers(0, 3, n).astype(np.uint8)
    key = sifting.SiftedKey(rng.integers(0, 2, n).astype(np.uint8), bases, classes, np.arange(n))
    expected = np.bincount(classes[bases == sifting.Z], minlength=sifting.MAX_INTENSITY_CLASSES)
    assert key.z_class_counts == tuple(int(c) for c in expected)
    assert key.z_class_counts[3] == 0
