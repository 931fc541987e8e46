from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize("dtype", [np.int64, np.int32])  # the kernel's one-pass check, and numpy's
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"indices": [3, 2]}, "strictly increasing"),
        ({"indices": [-1, 2]}, r"\[0, 10\)"),
        ({"indices": [12, 2]}, r"\[0, 10\)"),  # out of the frame and decreasing: the frame is named
        ({"indices": [1, 1]}, "strictly increasing"),
        ({"indices": [1, 10]}, r"\[0, 10\)"),
        ({"bases": [0]}, "differ in length"),
        ({"bits": [0, 2]}, "0 or 1"),
        ({"bits": np.array([0.0, 1.0])}, "dtype"),
        ({"pulses": 0}, "frame pulses"),
        ({"double_clicks": [True]}, "one flag per detection"),
    ],
)
def test_bad_detections(kwargs: dict[str, object], message: str, dtype: type) -> None:
    fields: dict[str, object] = {"pulses": 10, "indices": [1, 2], "bases": [0, 1], "bits": [1, 0]}
    fields.update(kwargs)
    fields["indices"] = np.array(fields["indices"], dtype=dtype)
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


# --------------------------------------------------------------------------- kernels against numpy
# Every public sifting function runs compiled loops; the numpy code they replaced (sifting.*_numpy) is
# the reference they must match bit for bit, and error for error on the peer's malformed input.

_ROOT = str(Path(__file__).resolve().parents[2])


def _outcome(function: Any, *args: Any) -> tuple[str, Any]:
    """What ``function`` gives: its value, or the peer error it raises (any other exception escapes)."""
    try:
        return "value", function(*args)
    except RemoteProtocolError as error:
        return "refused", str(error)


def _same(got: tuple[str, Any], expected: tuple[str, Any]) -> None:
    assert got[0] == expected[0], (got, expected)
    if got[0] == "refused":
        assert got[1] == expected[1]
    elif isinstance(got[1], np.ndarray):
        assert got[1].dtype == expected[1].dtype and got[1].tolist() == expected[1].tolist()
    else:
        assert got[1] == expected[1]


def _gap_indices(gaps: list[int]) -> np.ndarray:
    return np.cumsum(np.array(gaps, dtype=np.int64) + 1) - 1 if gaps else np.zeros(0, dtype=np.int64)


# gaps as detections have them (mostly one varint byte), and at every varint length boundary
_GAPS = st.one_of(
    st.integers(0, 127),
    st.integers(0, 1 << 20),
    st.sampled_from([(1 << 7) - 1, 1 << 7, (1 << 14) - 1, 1 << 14, (1 << 21) - 1, 1 << 21]),
    st.sampled_from([(1 << 49) - 1, 1 << 49, (1 << 56) - 1, 1 << 56, 1 << 60]),
)


@given(st.lists(_GAPS, max_size=300), st.integers(0, 3), st.sampled_from([0, 1, 8, 1 << 10]))
def test_index_encoding_matches_the_numpy_encoder(gaps: list[int], scale: int, spare: int) -> None:
    """Both encodings and the choice between them (frames just big enough for the indices, where the
    bitmap wins, and larger ones), up to gaps of 2^60 and the largest 64-bit index."""
    indices = _gap_indices(gaps)
    last = int(indices[-1]) if indices.size else 0
    pulses = max(1, last + 1) * (1 << scale) + spare
    if pulses >= 1 << 63:
        pulses = (1 << 63) - 1
        indices = indices[indices < pulses]
    # (at most 300 gaps take at most 3,000 bytes: the bitmap wins only in frames below 24,000 pulses,
    # so the numpy reference never allocates a large one)
    got = sifting.encode_indices(indices, pulses)
    assert got == sifting.encode_indices_numpy(indices, pulses)
    message = sifting.SiftAnnounce(pulses, indices.size, got[0], got[1], b"")
    if pulses <= sifting.MAX_FRAME_PULSES:
        assert sifting.decode_indices(message).tolist() == indices.tolist()


@pytest.mark.parametrize(
    ("indices", "pulses", "encoding"),
    [
        ([], 1, "gaps"),
        ([0], 1, "gaps"),
        ([(1 << 63) - 2], (1 << 63) - 1, "gaps"),  # the largest index: a nine-byte varint
        ([0, 15], 16, "gaps"),  # two bytes each way: a tie goes to the gaps
        ([0, 1, 15], 16, "bitmap"),
        (list(range(8)), 8, "bitmap"),
        ([9, 200, 201], 16 * 8 + 80, "gaps"),
    ],
)
def test_index_encoding_edges(indices: list[int], pulses: int, encoding: str) -> None:
    array = np.array(indices, dtype=np.int64)
    got = sifting.encode_indices(array, pulses)
    assert got[0] == encoding
    assert got == sifting.encode_indices_numpy(array, pulses)


def test_a_bitmap_of_indices_outside_the_frame_is_refused() -> None:
    with pytest.raises(InputError, match=r"\[0, 8\)"):
        sifting.encode_indices(np.arange(9, dtype=np.int64), 8)
    with pytest.raises(InputError, match=r"\[0, 8\)"):
        sifting.encode_indices(np.array([-1, 0, 1, 2, 3, 4, 5], dtype=np.int64), 8)


def _announcement(data: st.DataObject) -> sifting.SiftAnnounce:
    """A valid announcement, often broken in one way: a byte changed, cut or added, the count or the
    frame size off by a little, or bytes drawn at random."""
    pulses = data.draw(st.one_of(st.integers(1, 2000), st.sampled_from([1 << 20, sifting.MAX_FRAME_PULSES])))
    gaps = data.draw(st.lists(st.one_of(st.integers(0, 40), st.integers(0, pulses)), max_size=60))
    indices = _gap_indices(gaps)
    indices = indices[indices < pulses]
    if pulses <= 1 << 20:
        encoding, payload = sifting.encode_indices(indices, pulses)
    else:
        encoding, payload = "gaps", encode_varints(np.diff(indices, prepend=-1) - 1)
    count = int(indices.size)
    mutation = data.draw(st.sampled_from(["none", "byte", "cut", "add", "count", "pulses", "random"]))
    raw = bytearray(payload)
    if mutation == "byte" and raw:
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif mutation == "cut" and raw:
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    elif mutation == "add":
        raw += data.draw(st.binary(min_size=1, max_size=12))
    elif mutation == "count":
        count = max(0, count + data.draw(st.integers(-2, 2)))
    elif mutation == "pulses":
        pulses = max(1, pulses + data.draw(st.integers(-3, 3)))
    elif mutation == "random":
        raw = bytearray(data.draw(st.binary(max_size=40)))
        count = data.draw(st.integers(0, 12))
        encoding = data.draw(st.sampled_from(["gaps", "bitmap"]))
    return sifting.SiftAnnounce(pulses, count, encoding, bytes(raw), b"")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_index_decoding_matches_the_numpy_decoder(data: st.DataObject) -> None:
    """The same indices, or the same refusal with the same message, never another exception."""
    message = _announcement(data)
    _same(_outcome(sifting.decode_indices, message), _outcome(sifting.decode_indices_numpy, message))


@pytest.mark.parametrize(
    ("pulses", "count", "raw", "pattern"),
    [
        (1000, 0, b"", None),
        (1000, 0, b"\x00", "no varint was expected"),
        (1000, 1, b"", "expected 1 varints"),
        (1000, 1, b"\x80", "truncated"),
        (1000, 1, b"\x01\x02", "expected 1 varints"),
        (1000, 2, b"\x01", "expected 2 varints"),
        (1000, 1, b"\x80\x00", "overlong"),
        (1000, 2, b"\x80\x00\xff" + b"\xff" * 10 + b"\x01", "longer than"),  # the length is named first
        (1000, 1, b"\xff" * 9 + b"\x02", "exceeds 64 bits"),
        (1000, 1, b"\xff" * 9 + b"\x01", "outside the frame"),  # 2^64 − 1
        (1000, 1, b"\xe7\x07", None),  # 999: the last pulse
        (1000, 1, b"\xe8\x07", "outside the frame"),  # 1000
        (1000, 2, b"\xe7\x07\x00", "outside the frame"),  # 999, then 1000
        (1000, 3, b"\xe8\x07\x80\x00\x00", "overlong"),  # varint errors come before the frame's
        (1 << 40, 1, encode_varints(np.array([(1 << 40) - 1])), None),
        (1 << 40, 1 << 40, b"\x00", "expected 1099511627776 varints"),  # refused before any allocation
        (1 << 40, 2, encode_varints(np.array([1 << 39, 1 << 39])), "outside the frame"),
    ],
)
def test_gap_decoding_edges(pulses: int, count: int, raw: bytes, pattern: str | None) -> None:
    message = sifting.SiftAnnounce(pulses, count, "gaps", raw, b"")
    expected = _outcome(sifting.decode_indices_numpy, message)
    _same(_outcome(sifting.decode_indices, message), expected)
    if pattern is None:
        assert expected[0] == "value"
    else:
        assert expected[0] == "refused" and pattern in expected[1]


@pytest.mark.parametrize(
    ("pulses", "count", "raw", "pattern"),
    [
        (8, 0, b"\x00", None),
        (8, 8, b"\xff", None),
        (9, 1, b"\x00\x80", None),  # the last pulse of a partial byte
        (9, 1, b"\x00\x40", "padding"),
        (9, 1, b"\x00", "expected 2 bytes"),
        (16, 3, b"\x81\x00", "population"),
        (16, 1, b"\x81\x00", "population"),
    ],
)
def test_bitmap_decoding_edges(pulses: int, count: int, raw: bytes, pattern: str | None) -> None:
    message = sifting.SiftAnnounce(pulses, count, "bitmap", raw, b"")
    expected = _outcome(sifting.decode_indices_numpy, message)
    _same(_outcome(sifting.decode_indices, message), expected)
    assert expected[0] == ("value" if pattern is None else "refused")
    assert pattern is None or pattern in expected[1]


@pytest.mark.parametrize("limit", [1 << 62, (1 << 63) - 1])
def test_gaps_that_overflow_together_are_refused_by_both_decoders(
    monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    """Frames up to 2^62 pulses are decoded in the kernel, larger ones (never real) by numpy alone."""
    monkeypatch.setattr(sifting, "MAX_FRAME_PULSES", limit)
    largest = np.full(3, (1 << 62) - 1, dtype=np.uint64)
    for gaps, fits in ((largest, False), (largest[:1], True)):
        message = sifting.SiftAnnounce(limit, gaps.size, "gaps", encode_varints(gaps), b"\x00")
        expected = _outcome(sifting.decode_indices_numpy, message)
        _same(_outcome(sifting.decode_indices, message), expected)
        assert expected[0] == ("value" if fits else "refused")


class _Frame:
    """A preparation that answers with arrays of any types a backend may hand over."""

    def __init__(self, rng: np.random.Generator, pulses: int, dtype: type, writeable: bool) -> None:
        self.pulses = pulses
        self.arrays = [
            rng.integers(0, 2, pulses).astype(dtype),
            (rng.random(pulses) < 0.3).astype(dtype),
            rng.integers(0, sifting.MAX_INTENSITY_CLASSES, pulses).astype(dtype),
        ]
        for array in self.arrays:
            array.flags.writeable = writeable

    def at(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        bits, bases, classes = (array[indices] for array in self.arrays)
        return bits, bases, classes


def _key_fields(key: sifting.SiftedKey) -> list[list[int]]:
    return [key.bits.tolist(), key.bases.tolist(), key.intensities.tolist(), key.pulse_indices.tolist()]


@given(
    st.integers(1, 300),
    st.floats(0, 1),
    st.integers(0, 2**32 - 1),
    st.sampled_from([np.uint8, np.int64]),
    st.booleans(),
)
def test_both_sides_match_the_numpy_sifting(
    pulses: int, detection_probability: float, seed: int, dtype: type, writeable: bool
) -> None:
    """Alice's answer and key and Bob's key, bit for bit, from no detection to every pulse, with any
    count modulo 8 (the padding of the packed flags and classes)."""
    rng = np.random.default_rng(seed)
    frame = _Frame(rng, pulses, dtype, writeable)
    indices = np.flatnonzero(rng.random(pulses) < detection_probability)
    bases = (rng.random(indices.size) < 0.3).astype(np.uint8)
    detections = sifting.Detections(pulses, indices, bases, rng.integers(0, 2, indices.size, dtype=np.uint8))
    announce = sifting.bob_announce(detections)
    answer, alice = sifting.alice_answer(frame, announce)
    answer_numpy, alice_numpy = sifting.alice_answer_numpy(frame, announce)
    assert answer == answer_numpy
    assert _key_fields(alice) == _key_fields(alice_numpy)
    assert alice.intensities.dtype == alice_numpy.intensities.dtype == np.uint8
    bob, bob_numpy = sifting.bob_sift(detections, answer), sifting.bob_sift_numpy(detections, answer)
    assert _key_fields(bob) == _key_fields(bob_numpy)
    assert bob.pulse_indices.tolist() == alice.pulse_indices.tolist()
    assert bob.intensities.tolist() == alice.intensities.tolist()
    # a round's keys, without the pulse indices: the same otherwise
    answer_short, alice_short = sifting.alice_answer(frame, announce, pulse_indices=False)
    bob_short = sifting.bob_sift(detections, answer, pulse_indices=False)
    assert answer_short == answer
    for short, full in ((alice_short, alice), (bob_short, bob)):
        assert short.pulse_indices is sifting.NO_PULSE_INDICES
        assert _key_fields(short)[:3] == _key_fields(full)[:3]


@given(st.integers(0, 40), st.integers(0, 2**32 - 1), st.data())
def test_malformed_answers_are_refused_as_numpy_refuses_them(
    detected: int, seed: int, data: st.DataObject
) -> None:
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(100, detected, replace=False))
    detections = sifting.Detections(100, indices, np.zeros(detected, np.uint8), np.ones(detected, np.uint8))
    matches = data.draw(st.binary(max_size=7))
    classes = data.draw(st.binary(max_size=12))
    answer = sifting.SiftAnswer(matches, classes)
    got = _outcome(lambda: _key_fields(sifting.bob_sift(detections, answer)))
    expected = _outcome(lambda: _key_fields(sifting.bob_sift_numpy(detections, answer)))
    _same(got, expected)


def test_a_preparation_that_answers_other_lengths_is_an_input_error() -> None:
    class Short:
        pulses = 100

        def at(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return (
                np.zeros(indices.size - 1, np.uint8),
                np.zeros(indices.size, np.uint8),
                np.zeros(3, np.uint8),
            )

    detections = sifting.Detections(100, np.arange(5), np.zeros(5, np.uint8), np.zeros(5, np.uint8))
    with pytest.raises(InputError, match="preparation gave 4 bits, 5 bases and 3 intensity classes for 5"):
        sifting.alice_answer(Short(), sifting.bob_announce(detections))


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 255)), max_size=200))
def test_z_class_counts_match_a_bincount(pairs: list[tuple[int, int]]) -> None:
    """Classes 0 to 3 of the Z bits; X bits, and classes past 3 (never sent), count nowhere."""
    bases = np.array([b for b, _ in pairs], dtype=np.uint8)
    classes = np.array([c for _, c in pairs], dtype=np.uint8)
    key = sifting.SiftedKey(np.zeros(bases.size, np.uint8), bases, classes, np.arange(bases.size))
    tally = np.bincount(classes[bases == sifting.Z], minlength=256)[: sifting.MAX_INTENSITY_CLASSES]
    assert key.z_class_counts == tuple(int(c) for c in tally)


def test_the_constants_are_the_kernels() -> None:
    from qkdd.stages import _sifting_kernels as kernels  # noqa: PLC0415

    assert (sifting._OK, kernels.OK) == (0, 0) and kernels.REFUSED != kernels.OK
    assert sifting._VARINT_MAX_BYTES == kernels.VARINT_MAX_BYTES


def test_importing_sifting_leaves_numba_for_later() -> None:
    code = "import sys, qkdd.stages.sifting; assert 'numba' not in sys.modules"
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": _ROOT}, timeout=120
    )


def test_warm_up_leaves_nothing_to_compile(rng: np.random.Generator) -> None:
    """Every kernel signature a round uses, whatever arrays the link hands over, is loaded by warm_up
    (and a second call is free)."""
    from qkdd.stages import _sifting_kernels as kernels  # noqa: PLC0415

    sifting.warm_up()
    sifting.warm_up()
    dispatchers = [
        getattr(kernels, name) for name in dir(kernels) if hasattr(getattr(kernels, name), "signatures")
    ]
    assert len(dispatchers) >= 10
    signatures = [len(each.signatures) for each in dispatchers]
    for probability in (0.04, 0.6):  # gaps, then a bitmap
        frame = _Frame(rng, 1 << 12, np.uint8, writeable=probability < 0.5)
        _, detections = synthetic_frame(rng, 1 << 12, detection_probability=probability, qber=0.0)
        answer, alice = sifting.alice_answer(frame, sifting.bob_announce(detections))
        bob = sifting.bob_sift(detections, answer)
        assert bob.z_class_counts == alice.z_class_counts
    assert [len(each.signatures) for each in dispatchers] == signatures
