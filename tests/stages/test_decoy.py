"""The decoy-state bound of Lim et al. 2014 (qkdd/stages/decoy.py): safety first, then sanity."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdd.stages.confirm import TAG_BITS
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


# --- the paper's formulas, transcribed separately: LCWXZ Eqs. 1-5 and A7-A10, X and Z swapped -------------


def paper_counts(km: float, n_z: float) -> DecoyCounts:
    """Expected counts of LCWXZ Sec. IV's system (their D_k, R_k and e_k) for about n_z key detections."""
    mu, p, q_z = (0.45, 0.17, 2e-4), (0.7, 0.2, 0.1), 0.7
    eta = 0.1 * 10 ** (-0.02 * km)
    d = [1 - (1 - 2 * 6e-7) * math.exp(-eta * k) for k in mu]
    r = [dk * 1.04 for dk in d]
    e = [6e-7 + 0.005 * (1 - math.exp(-eta * k)) + 0.04 * dk / 2 for k, dk in zip(mu, d, strict=True)]
    pulses = n_z / (q_z**2 * sum(pk * rk for pk, rk in zip(p, r, strict=True)))
    nz = tuple(round(pulses * q_z**2 * pk * rk) for pk, rk in zip(p, r, strict=True))
    nx = tuple(round(pulses * (1 - q_z) ** 2 * pk * rk) for pk, rk in zip(p, r, strict=True))
    mx = tuple(round(pulses * (1 - q_z) ** 2 * pk * ek) for pk, ek in zip(p, e, strict=True))
    return DecoyCounts(mu, p, nz, nx, mx, 0)


def paper_bound(c: DecoyCounts, eps_sec: float) -> dict[str, float]:
    mu1, mu2, mu3 = c.intensities
    weights = [(math.exp(k), pk) for k, pk in zip(c.intensities, c.probabilities, strict=True)]
    tau = [
        sum(pk / ek * k**j / math.factorial(j) for k, (ek, pk) in zip(c.intensities, weights, strict=True))
        for j in (0, 1)
    ]

    def deviations(observed: tuple[int, ...]) -> tuple[list[float], list[float]]:
        delta = math.sqrt(sum(observed) / 2 * math.log(21 / eps_sec))
        # the expected counts are sums of non-negative terms (Eq. A3): never below zero
        low = [ek / pk * max(x - delta, 0) for x, (ek, pk) in zip(observed, weights, strict=True)]
        high = [ek / pk * (x + delta) for x, (ek, pk) in zip(observed, weights, strict=True)]
        return low, high

    def s0_s1(observed: tuple[int, ...]) -> tuple[float, float]:
        low, high = deviations(observed)
        s0 = max(tau[0] * (mu2 * low[2] - mu3 * high[1]) / (mu2 - mu3), 0.0)  # Eq. 2
        bracket = low[1] - high[2] - (mu2**2 - mu3**2) / mu1**2 * (high[0] - s0 / tau[0])
        s1 = tau[1] * mu1 * bracket / (mu1 * (mu2 - mu3) - mu2**2 + mu3**2)  # Eq. 3
        return s0, max(s1, 0.0)

    s_z0, s_z1 = s0_s1(c.key_detections)
    _, s_x1 = s0_s1(c.test_detections)
    m_low, m_high = deviations(c.test_errors)
    v_x1 = tau[1] * (m_high[1] - m_low[2]) / (mu2 - mu3)  # Eq. 4
    b = v_x1 / s_x1
    gamma = math.sqrt(
        (s_x1 + s_z1)
        * (1 - b)
        * b
        / (s_x1 * s_z1 * math.log(2))
        * math.log2((s_x1 + s_z1) / (s_x1 * s_z1 * (1 - b) * b) * 21**2 / eps_sec**2)
    )
    phase = b + gamma  # Eq. 5
    entropy = -phase * math.log2(phase) - (1 - phase) * math.log2(1 - phase)
    # Eq. 1 with the confirmation tag in the disclosed bits instead of log2(2/eps_cor)
    ell = s_z0 + s_z1 * (1 - entropy) - c.disclosed_bits - 6 * math.log2(21 / eps_sec)
    return {"s_z0": s_z0, "s_z1": s_z1, "s_x1": s_x1, "v_x1": v_x1, "phase": phase, "ell": ell}


@pytest.mark.parametrize("km", [0.0, 25.0, 50.0, 100.0])
@pytest.mark.parametrize("n_z", [1e6, 1e7, 1e9])
def test_the_bounds_equal_the_papers_formulas(km: float, n_z: float) -> None:
    counts = paper_counts(km, n_z)
    reference = paper_bound(counts, 1e-9)
    found = bounds(counts, 1e-9)
    assert found is not None
    for name, value in (
        ("s_z0", found.key_vacuum),
        ("s_z1", found.key_single),
        ("s_x1", found.test_single),
        ("v_x1", found.test_single_errors),
        ("phase", found.phase_error),
    ):
        assert math.isclose(value, reference[name], rel_tol=1e-9, abs_tol=1e-9), name


@pytest.mark.parametrize(("km", "n_z"), [(0.0, 1e6), (50.0, 1e7), (100.0, 1e9)])
def test_the_key_length_counts_the_confirmation_tag_once(km: float, n_z: float) -> None:
    """Eq. 1 with the tag among the disclosed bits and no further log2(2/eps_cor), whatever eps_cor."""
    counts = paper_counts(km, n_z)
    qber = 0.01
    leak = math.ceil(1.16 * sum(counts.key_detections) * -(qber * math.log2(qber) + 0.99 * math.log2(0.99)))
    counts = DecoyCounts(
        counts.intensities,
        counts.probabilities,
        counts.key_detections,
        counts.test_detections,
        counts.test_errors,
        leak + TAG_BITS,
    )
    expected = math.floor(paper_bound(counts, 1e-9)["ell"])
    assert expected > 0
    for eps_cor in (1e-15, 1e-30):
        assert decoy_key_length(counts, eps_sec=1e-9, eps_cor=eps_cor).secret_bits == expected


def test_the_vacuum_intensitys_few_errors_count_as_at_least_zero() -> None:
    """m_{X,3} far below its deviation δ (at 0 km, n_Z = 10^9): Eq. 4 takes m^-_3 = 0, not a negative
    count that would raise v_{X,1}."""
    counts = paper_counts(0.0, 1e9)
    mu, p = counts.intensities, counts.probabilities
    delta = math.sqrt(sum(counts.test_errors) / 2 * math.log(21 / 1e-9))
    assert counts.test_errors[2] < delta / 10
    tau1 = sum(pk * k * math.exp(-k) for k, pk in zip(mu, p, strict=True))
    by_hand = tau1 / (mu[1] - mu[2]) * math.exp(mu[1]) / p[1] * (counts.test_errors[1] + delta)
    found = bounds(counts, 1e-9)
    assert found is not None
    assert math.isclose(found.test_single_errors, by_hand, rel_tol=1e-12)
