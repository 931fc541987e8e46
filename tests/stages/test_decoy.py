"""The decoy-state bound of Lim et al. 2014 (qkdd/stages/decoy.py): safety first, then sanity."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdd.stages.decoy import DecoyCounts, bounds, decoy_key_length, valid_intensities

MU = (0.5, 0.2, 0.0)
P = (0.4, 0.4, 0.2)


def expected_counts(pulses: int, *, km: float = 10.0, pz: float = 0.8, ed: float = 0.01) -> DecoyCounts:
    eta = 0.25 * 10 ** (-0.02 * km)
    pd = 1e-6
    gains = [1 - math.exp(-eta * m) * (1 - pd) ** 2 for m in MU]
    errors = [
        (0.5 * (1 - (1 - pd) ** 2) * math.exp(-eta * m) + ed * (1 - math.exp(-eta * m))) / q
        for m, q in zip(MU, gains, strict=True)
    ]
    nz = tuple(round(pulses * pz * pz * p * q) for p, q in zip(P, gains, strict=True))
    nx = tuple(round(pulses * (1 - pz) ** 2 * p * q) for p, q in zip(P, gains, strict=True))
    mx = tuple(round(n * e) for n, e in zip(nx, errors, strict=True))
    qber = sum(n * e for n, e in zip(nz, errors, strict=True)) / sum(nz)
    leak = round(1.05 * sum(nz) * -(qber * math.log2(qber) + (1 - qber) * math.log2(1 - qber)))
    return DecoyCounts(MU, P, nz, nx, mx, leak)


def length(counts: DecoyCounts) -> int:
    return decoy_key_length(counts, eps_sec=1e-9, eps_cor=1e-15).secret_bits


def test_a_realistic_frame_gives_a_key_below_the_single_photon_yield() -> None:
    counts = expected_counts(1 << 24)
    found = bounds(counts, 1e-9)
    assert found is not None
    secret = length(counts)
    assert 0 < secret < found.key_single < sum(counts.key_detections)
    assert 0 < found.phase_error < 0.1


def test_the_key_grows_with_the_block_and_shrinks_with_distance_and_errors() -> None:
    assert (
        length(expected_counts(1 << 22)) < length(expected_counts(1 << 24)) < length(expected_counts(1 << 26))
    )
    assert length(expected_counts(1 << 25, km=50)) < length(expected_counts(1 << 25, km=10))
    assert length(expected_counts(1 << 25, ed=0.03)) < length(expected_counts(1 << 25, ed=0.01))


def test_the_single_photon_bounds_do_not_exceed_the_true_values() -> None:
    """Eq. 2 and Eq. 3 are lower bounds: with exact expected counts they stay below the model's truth."""
    counts = expected_counts(1 << 28)
    found = bounds(counts, 1e-9)
    assert found is not None
    eta = 0.25 * 10 ** (-0.2)
    tau1 = sum(math.exp(-m) * m * p for m, p in zip(MU, P, strict=True))
    true_single = (1 << 28) * 0.8 * 0.8 * tau1 * (1 - (1 - eta) * (1 - 1e-6) ** 2)
    assert found.key_single <= true_single
    assert found.key_single > 0.8 * true_single  # and they are tight for large blocks


@pytest.mark.parametrize(
    "change",
    [
        {"key_detections": (0, 0, 0)},
        {"test_detections": (0, 0, 0), "test_errors": (0, 0, 0)},
        {"key_detections": (0, 500_000, 0)},  # everything on the decoy
        {"test_detections": (5000, 0, 0)},  # no decoy or vacuum in the test basis
        {"intensities": (0.5, 0.4, 0.2)},  # mu1 > mu2 + mu3 violated
        {"probabilities": (0.5, 0.5, 0.0)},
        {"test_errors": (4000, 1500, 250)},  # half the test bits wrong
        {"disclosed_bits": 10**9},
    ],
)
def test_degenerate_and_adversarial_counts_give_zero(change: dict[str, object]) -> None:
    counts = expected_counts(1 << 24)
    fields = {name: getattr(counts, name) for name in DecoyCounts.__dataclass_fields__}
    result = decoy_key_length(DecoyCounts(**{**fields, **change}), eps_sec=1e-9, eps_cor=1e-15)  # type: ignore[arg-type]
    assert result.secret_bits == 0 and result.reason


@given(
    st.tuples(*[st.integers(0, 10**6)] * 3),
    st.tuples(*[st.integers(0, 10**5)] * 3),
    st.tuples(*[st.integers(0, 10**4)] * 3),
    st.integers(0, 10**6),
)
def test_never_negative_never_longer_than_the_key(
    key: tuple[int, int, int], test: tuple[int, int, int], errors: tuple[int, int, int], leak: int
) -> None:
    errors = tuple(min(e, t) for e, t in zip(errors, test, strict=True))  # type: ignore[assignment]
    result = decoy_key_length(DecoyCounts(MU, P, key, test, errors, leak), eps_sec=1e-9, eps_cor=1e-15)
    assert 0 <= result.secret_bits <= sum(key)


def test_intensity_conditions() -> None:
    assert valid_intensities((0.5, 0.1, 0.0)) and not valid_intensities((0.3, 0.2, 0.15))
    with pytest.raises(ValueError, match="eps"):
        decoy_key_length(expected_counts(1 << 20), eps_sec=0, eps_cor=1e-15)
