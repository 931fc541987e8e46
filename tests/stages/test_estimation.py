from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qkdd.errors import InputError, RemoteProtocolError
from qkdd.stages import estimation, sifting
from qkdd.stages.pipeline import synthetic_frame


def _sifted(rng: np.random.Generator, qber: float, pulses: int = 200_000, z_probability: float = 0.9):
    prep, det = synthetic_frame(
        rng, pulses, detection_probability=0.2, qber=qber, z_probability=z_probability
    )
    answer, alice = sifting.alice_answer(prep, sifting.bob_announce(det))
    return alice, sifting.bob_sift(det, answer)


def _estimate(alice, bob, rng, fraction=0.0, threshold=0.11):
    request = estimation.bob_request(bob, rng, z_sample_fraction=fraction)
    answer, alice_view = estimation.alice_answer(alice, request, threshold=threshold)
    return alice_view, estimation.bob_estimate(bob, request, answer, threshold=threshold)


def test_both_sides_agree_and_count_exactly(rng: np.random.Generator) -> None:
    alice, bob = _sifted(rng, 0.03, z_probability=0.5)  # ~20000 X bits: the rate is within ±0.5%
    a, b = _estimate(alice, bob, rng, fraction=0.1)
    assert a.x_errors == b.x_errors == int(np.sum(alice.select(1) != bob.select(1)))
    assert a.z_sample_errors == b.z_sample_errors
    assert a.abort_reason is None and b.abort_reason is None
    assert 0.025 < b.phase_error_rate < 0.035
    assert abs(b.z_sample_bits - 0.1 * alice.select(0).size) < 0.02 * alice.select(0).size
    assert np.array_equal(a.z_key_mask, b.z_key_mask)
    assert a.z_key(alice).size == alice.select(0).size - a.z_sample_bits
    assert sum(bits for bits, _ in b.x_by_intensity.values()) == b.x_bits


def test_high_phase_error_aborts_with_reason(rng: np.random.Generator) -> None:
    alice, bob = _sifted(rng, 0.2)
    a, b = _estimate(alice, bob, rng)
    assert b.abort_reason is not None and "phase error rate" in b.abort_reason
    assert a.abort_reason == b.abort_reason


def test_threshold_is_configurable(rng: np.random.Generator) -> None:
    alice, bob = _sifted(rng, 0.05)
    assert _estimate(alice, bob, rng, threshold=0.11)[1].abort_reason is None
    assert "exceeds threshold 0.0300" in str(_estimate(alice, bob, rng, threshold=0.03)[1].abort_reason)
    with pytest.raises(InputError):
        _estimate(alice, bob, rng, threshold=0.0)


def test_sampled_z_error_aborts(rng: np.random.Generator) -> None:
    alice, bob = _sifted(rng, 0.0)
    flipped = dataclasses.replace(bob, bits=np.where(bob.bases == 0, 1 - bob.bits, bob.bits).astype(np.uint8))
    assert "sampled Z error rate" in str(_estimate(alice, flipped, rng, fraction=0.2)[1].abort_reason)


def test_no_x_bits_aborts(rng: np.random.Generator) -> None:
    alice, bob = _sifted(rng, 0.01, z_probability=1.0)
    assert "no X-basis bits" in str(_estimate(alice, bob, rng)[1].abort_reason)


def test_mismatched_request_is_a_remote_error(rng: np.random.Generator) -> None:
    alice, bob = _sifted(rng, 0.01)
    request = estimation.bob_request(bob, rng, z_sample_fraction=0.1)
    with pytest.raises(RemoteProtocolError, match="Bob reports"):
        estimation.alice_answer(alice, dataclasses.replace(request, x_count=request.x_count + 1))
    with pytest.raises(RemoteProtocolError, match="sample"):
        estimation.alice_answer(alice, dataclasses.replace(request, z_sample_bits=b""))
    answer, _ = estimation.alice_answer(alice, request)
    with pytest.raises(RemoteProtocolError, match="answer"):
        estimation.bob_estimate(bob, request, dataclasses.replace(answer, x_bits=answer.x_bits[:-1]))
    with pytest.raises(InputError):
        estimation.bob_request(bob, rng, z_sample_fraction=1.0)


def test_qber_after_reconciliation() -> None:
    assert estimation.qber_abort_reason(10, 100) is None
    assert "Z error rate" in str(estimation.qber_abort_reason(12, 100))
