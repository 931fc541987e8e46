from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdd.stages.keylength import (
    RoundCounts,
    binary_entropy,
    single_photon_key_length,
    statistical_correction,
)


def test_binary_entropy() -> None:
    assert binary_entropy(0.0) == 0.0
    assert binary_entropy(0.5) == 1.0
    assert binary_entropy(0.7) == 1.0
    assert math.isclose(binary_entropy(0.11), 0.4999, abs_tol=1e-3)


def test_formula_by_hand() -> None:
    n, k, errors, leak = 10**6, 10**5, 2000, 150_000
    mu = math.sqrt((n + k) / (n * k) * (k + 1) / k * math.log(2 / 1e-9))
    # TLGR Eq. 2 without the verification hash's log2(1/eps_cor): the tag is among the disclosed bits
    expected = n * (1 - binary_entropy(0.02 + mu)) - leak - math.log2(2 / 1e-18)
    result = single_photon_key_length(RoundCounts(n, k, errors, leak))
    assert result.secret_bits == math.floor(expected)
    assert result.reason is None
    assert math.isclose(result.phase_error_bound, 0.02 + mu)


def test_approaches_asymptotic_rate() -> None:
    n = 10**9
    result = single_photon_key_length(RoundCounts(n, n, n // 50, int(n * binary_entropy(0.02))))
    assert abs(result.secret_bits / n - (1 - 2 * binary_entropy(0.02))) < 0.01


@pytest.mark.parametrize(
    ("counts", "reason"),
    [
        (RoundCounts(0, 100, 0, 0), "no key bits"),
        (RoundCounts(100, 0, 0, 0), "no test bits"),
        (RoundCounts(1000, 100, 60, 0), "reaches 1/2"),
        (RoundCounts(200, 200, 0, 0), "finite-size"),
        (RoundCounts(10**6, 10**5, 0, 10**7), "finite-size"),
        (RoundCounts(100, 10, 11, 0), "inconsistent"),
        (RoundCounts(100, 10, 1, -1), "inconsistent"),
    ],
)
def test_degenerate_counts_give_zero(counts: RoundCounts, reason: str) -> None:
    result = single_photon_key_length(counts)
    assert result.secret_bits == 0
    assert result.reason is not None and reason in result.reason


@given(st.integers(0, 10**8), st.integers(0, 10**7), st.floats(0, 1), st.integers(0, 10**8))
def test_never_negative_never_above_n(n: int, k: int, error_fraction: float, leak: int) -> None:
    result = single_photon_key_length(RoundCounts(n, k, int(k * error_fraction), leak))
    assert 0 <= result.secret_bits <= max(n, 0)


def test_more_disclosure_never_lengthens() -> None:
    lengths = [
        single_photon_key_length(RoundCounts(10**6, 10**5, 1000, leak)).secret_bits
        for leak in range(0, 300_000, 50_000)
    ]
    assert lengths == sorted(lengths, reverse=True)


def test_correction_shrinks_with_samples() -> None:
    assert statistical_correction(10**6, 10**6, 1e-9) < statistical_correction(10**4, 10**4, 1e-9)
    assert statistical_correction(0, 5, 1e-9) == math.inf
    with pytest.raises(ValueError):
        single_photon_key_length(RoundCounts(10, 10, 0, 0), eps_sec=0)
