"""Finite-key decoy-state key length for weak coherent pulses (protocol/qkdp-v2.md §8).

Lim, Curty, Walenta, Xu, Zbinden, "Concise security bounds for practical decoy-state quantum key
distribution", Phys. Rev. A 89, 022307 (2014) — "LCWXZ" below, equation numbers as in the paper.

The paper draws the key from the X basis and bounds its phase error with Z-basis errors; qkdd draws the
key from Z and tests in X, so the roles of the bases are swapped throughout (the bound is symmetric).
Three intensities μ1 > μ2 + μ3, μ2 > μ3 ≥ 0 (signal, decoy, vacuum or weak), chosen with probabilities
p_k. Observed: n_{Z,k} key-basis detections and n_{X,k} test-basis detections per intensity, m_{X,k}
test-basis errors per intensity, and λ_EC, every bit disclosed by reconciliation and confirmation.

    ℓ = ⌊ s_{Z,0} + s_{Z,1} (1 − h(φ_Z)) − λ − 6 log2(21/ε_sec) ⌋      (LCWXZ Eq. 1, tag in λ)

λ is every bit disclosed, the confirmation tag included; LCWXZ's own − log2(2/ε_cor) is the allowance for
that tag (their App. B: the error-verification step publishes log2(2/ε_cor) bits) and is not taken again.

Every lower bound is clipped at zero and every rate at 1/2; adversarial or degenerate counts (no vacuum
detections, everything on decoys, no test-basis detections) give zero, never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from qkdd.stages.keylength import KeyLength, binary_entropy

EPS_SPLIT = 21
"""The 21 of LCWXZ: ε_sec is split among 21 events (Hoeffding bounds and smoothing)."""


@dataclass(frozen=True, slots=True)
class DecoyCounts:
    """One round's counts per intensity, in the order of ``intensities``."""

    intensities: tuple[float, ...]  # mean photon numbers
    probabilities: tuple[float, ...]  # p_k
    key_detections: tuple[int, ...]  # n_{Z,k}
    test_detections: tuple[int, ...]  # n_{X,k}
    test_errors: tuple[int, ...]  # m_{X,k}
    disclosed_bits: int  # λ: reconciliation and the confirmation tag


@dataclass(frozen=True, slots=True)
class DecoyBounds:
    """The intermediate bounds, for tests, logs and ``qkdd keyrate``."""

    key_vacuum: float  # s_{Z,0}
    key_single: float  # s_{Z,1}
    test_vacuum: float  # s_{X,0}
    test_single: float  # s_{X,1}
    test_single_errors: float  # v_{X,1}
    phase_error: float  # φ_Z


def _tau(n: int, mu: Sequence[float], p: Sequence[float]) -> float:
    """τ_n = Σ_k e^{−μ_k} μ_k^n p_k / n!: probability that a pulse carries n photons (LCWXZ, after Eq. 3)."""
    return sum(math.exp(-m) * m**n * pk / math.factorial(n) for m, pk in zip(mu, p, strict=True))


def _hoeffding(
    counts: Sequence[int], mu: Sequence[float], p: Sequence[float], eps_sec: float
) -> tuple[list[float], list[float]]:
    """n^±_k = e^{μ_k}/p_k (n_k ± sqrt(n/2 · ln(21/ε_sec))), n = Σ n_k (LCWXZ, after Eq. 3), with the
    lower one clamped at zero.

    The deviation bounds the expected count n*_k (LCWXZ Eqs. A7–A10), and n*_k = Σ_j p_{k|j} s_j is a sum
    of non-negative terms (Eq. A3 and the line before Eq. A1; likewise m*_k with the errors v_j): so
    n*_k ≥ max(0, n_k − δ). The clamp matters where a count is far below δ (the vacuum-like intensity's
    errors: without it m^−_3 < 0 inflates v_{X,1} in Eq. 4)."""
    delta = math.sqrt(sum(counts) / 2 * math.log(EPS_SPLIT / eps_sec))
    minus = [math.exp(m) / pk * max(0.0, n - delta) for n, m, pk in zip(counts, mu, p, strict=True)]
    plus = [math.exp(m) / pk * (n + delta) for n, m, pk in zip(counts, mu, p, strict=True)]
    return minus, plus


def _vacuum(minus: list[float], plus: list[float], mu: Sequence[float], tau0: float) -> float:
    """s_0 ≥ τ_0 (μ2 n^−_3 − μ3 n^+_2) / (μ2 − μ3)   (LCWXZ Eq. 2)."""
    _, mu2, mu3 = mu
    return max(0.0, tau0 * (mu2 * minus[2] - mu3 * plus[1]) / (mu2 - mu3))


def _single(
    minus: list[float], plus: list[float], mu: Sequence[float], tau0: float, tau1: float, s0: float
) -> float:
    """s_1 ≥ τ_1 μ1 [n^−_2 − n^+_3 − (μ2² − μ3²)/μ1² (n^+_1 − s_0/τ_0)] / [μ1(μ2 − μ3) − μ2² + μ3²]
    (LCWXZ Eq. 3)."""
    mu1, mu2, mu3 = mu
    numerator = minus[1] - plus[2] - (mu2**2 - mu3**2) / mu1**2 * (plus[0] - s0 / tau0)
    return max(0.0, tau1 * mu1 * numerator / (mu1 * (mu2 - mu3) - mu2**2 + mu3**2))


def _gamma(a: float, b: float, c: float, d: float) -> float:
    """γ(a, b, c, d) = sqrt((c + d)(1 − b) b / (c d ln 2) · log2((c + d)/(c d (1 − b) b) · 21²/a²))
    (LCWXZ Eq. 5)."""
    b = min(max(b, 1e-15), 0.5)
    argument = (c + d) / (c * d * (1 - b) * b) * EPS_SPLIT**2 / a**2
    return math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(argument))


def consistent_gains(counts: Sequence[int], mu: Sequence[float], p: Sequence[float], eps_sec: float) -> bool:
    """Detections per pulse must not fall as the intensity rises, beyond statistical fluctuation: the
    eavesdropper cannot tell intensities apart, so any channel gives a higher detection rate to brighter
    pulses. A violation (say, every detection on a decoy) means the statistics are not from such a
    channel, and no key is extracted."""
    minus, plus = _hoeffding(counts, mu, p, eps_sec)
    # e^{μ}/p scaling cancels the intensity's own weight; compare rates n_k/p_k via the bounds
    rates_upper = [u * math.exp(-m) for u, m in zip(plus, mu, strict=True)]
    rates_lower = [lo * math.exp(-m) for lo, m in zip(minus, mu, strict=True)]
    return all(rates_upper[k] >= rates_lower[k + 1] for k in range(len(mu) - 1))


def valid_intensities(mu: Sequence[float]) -> bool:
    """LCWXZ's conditions: μ1 > μ2 + μ3 and μ2 > μ3 ≥ 0 (signal, decoy, vacuum)."""
    return len(mu) == 3 and mu[0] > mu[1] + mu[2] and mu[1] > mu[2] >= 0


def bounds(counts: DecoyCounts, eps_sec: float) -> DecoyBounds | None:
    """The bounds of LCWXZ Eqs. 2–5 with the bases swapped, or ``None`` where they are undefined."""
    order = sorted(range(len(counts.intensities)), key=lambda k: -counts.intensities[k])
    mu = [counts.intensities[k] for k in order]
    p = [counts.probabilities[k] for k in order]
    if not valid_intensities(mu) or any(pk <= 0 for pk in p):
        return None
    n_z = [counts.key_detections[k] for k in order]
    n_x = [counts.test_detections[k] for k in order]
    m_x = [counts.test_errors[k] for k in order]
    tau0, tau1 = _tau(0, mu, p), _tau(1, mu, p)
    z_minus, z_plus = _hoeffding(n_z, mu, p, eps_sec)
    x_minus, x_plus = _hoeffding(n_x, mu, p, eps_sec)
    # no more vacuum or single-photon events than detections (the bounds alone may extrapolate past it)
    s_z0 = min(_vacuum(z_minus, z_plus, mu, tau0), sum(n_z))
    s_z1 = min(_single(z_minus, z_plus, mu, tau0, tau1, s_z0), sum(n_z) - s_z0)
    s_x0 = min(_vacuum(x_minus, x_plus, mu, tau0), sum(n_x))
    s_x1 = min(_single(x_minus, x_plus, mu, tau0, tau1, s_x0), sum(n_x) - s_x0)
    e_minus, e_plus = _hoeffding(m_x, mu, p, eps_sec)
    # v_{X,1} ≤ τ_1 (m^+_2 − m^−_3)/(μ2 − μ3)   (LCWXZ Eq. 4)
    v_x1 = max(0.0, tau1 * (e_plus[1] - e_minus[2]) / (mu[1] - mu[2]))
    if s_z1 <= 0 or s_x1 <= 0:
        return DecoyBounds(s_z0, s_z1, s_x0, s_x1, v_x1, 0.5)
    ratio = v_x1 / s_x1
    # φ_Z ≤ v_{X,1}/s_{X,1} + γ(ε_sec, v_{X,1}/s_{X,1}, s_{X,1}, s_{Z,1})   (LCWXZ Eq. 5)
    phase = ratio + _gamma(eps_sec, ratio, s_x1, s_z1) if ratio < 0.5 else 0.5
    return DecoyBounds(s_z0, s_z1, s_x0, s_x1, v_x1, min(phase, 0.5))


def unrounded_length(counts: DecoyCounts, found: DecoyBounds, eps_sec: float) -> float:
    """LCWXZ Eq. 1 before the floor, from ``found = bounds(counts, eps_sec)``: negative where the costs
    exceed the entropy (``qkdd keyrate``'s optimiser follows it towards key where there is none yet)."""
    return (
        found.key_vacuum
        + found.key_single * (1 - binary_entropy(found.phase_error))
        - counts.disclosed_bits
        - 6 * math.log2(EPS_SPLIT / eps_sec)
        # no − log2(2/ε_cor): LCWXZ Eq. 1 charges it for the verification hash (Eq. B3's chain rule), and
        # our tag is already in disclosed_bits at its real length; charging both counted it twice
    )


def decoy_key_length(counts: DecoyCounts, *, eps_sec: float, eps_cor: float) -> KeyLength:
    """Secret bits by LCWXZ Eq. 1; zero, with a reason, when nothing is secret.

    ``counts.disclosed_bits`` must include the confirmation tag, whose collision probability is the
    ε_cor the round claims (``eps_cor`` is checked here, and costs no further bits)."""
    if not (0 < eps_sec < 1 and 0 < eps_cor < 1):
        raise ValueError("eps_sec and eps_cor must lie in (0, 1)")
    if sum(counts.key_detections) == 0:
        return KeyLength(0, 1.0, "no key-basis detections")
    if sum(counts.test_detections) == 0:
        return KeyLength(0, 1.0, "no test-basis detections: the phase error cannot be bounded")
    found = bounds(counts, eps_sec)
    if found is None:
        return KeyLength(0, 1.0, "intensities do not satisfy mu1 > mu2 + mu3, mu2 > mu3 >= 0")
    order = sorted(range(len(counts.intensities)), key=lambda k: -counts.intensities[k])
    mu = [counts.intensities[k] for k in order]
    p = [counts.probabilities[k] for k in order]
    for observed in (counts.key_detections, counts.test_detections):
        if not consistent_gains([observed[k] for k in order], mu, p, eps_sec):
            return KeyLength(
                0, 1.0, "detection rates fall as the intensity rises: decoy statistics inconsistent"
            )
    if found.key_single <= 0 or found.test_single <= 0:
        return KeyLength(0, 1.0, "no single-photon detections can be certified (decoy statistics too weak)")
    if found.phase_error >= 0.5:
        return KeyLength(0, 0.5, "phase error bound reaches 1/2")
    value = unrounded_length(counts, found, eps_sec)
    if value < 1:
        return KeyLength(0, found.phase_error, "finite-size and disclosure costs exceed the entropy")
    return KeyLength(min(math.floor(value), sum(counts.key_detections)), found.phase_error, None)
