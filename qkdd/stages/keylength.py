"""Secret key length (protocol/qkdp-v2.md §8).

The bound for a true single-photon source; :mod:`qkdd.stages.secrecy` picks it or the decoy-state bound
of :mod:`qkdd.stages.decoy` from what the link declares. Every bound returns an integer >= 0 and never
raises on degenerate counts.

Single-photon BB84, finite key: Tomamichel, Lim, Gisin, Renner, "Tight finite-key analysis for quantum
cryptography", Nat. Commun. 3:634 (2012), Eq. (2) with q = 1 (BB84 with ideal bases)::

    ℓ = ⌊ n (1 − h(e_X + μ)) − leak − log2(2 / ε_sec²) ⌋,
    μ = sqrt( (n + k)/(n k) · (k + 1)/k · ln(2/ε_sec) ),

n the key bits (Z), k the test bits (X), e_X the observed phase error rate (used as the tolerated
error, i.e. the protocol aborts above it), leak every bit disclosed by reconciliation and confirmation.
We take ln(2/ε_sec), the larger of the forms in circulation, which only shortens the key.

TLGR's log2(2/(ε_sec² ε_cor)) contains the cost of their verification hash: log2(1/ε_cor) bits, or
log2(2/ε_cor) as LCWXZ App. B counts it. Our confirmation tag is in ``leak`` at its real length, so only
log2(2/ε_sec²) is charged here: the smaller reading of the hash's share is removed, never more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_EPS_SEC = 1e-9
DEFAULT_EPS_COR = 1e-15


def binary_entropy(p: float) -> float:
    """h(p) = −p log2 p − (1−p) log2(1−p), with h(p) = 1 for p >= 1/2 (the bound's worst case)."""
    if p <= 0.0:
        return 0.0
    if p >= 0.5:
        return 1.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


@dataclass(frozen=True, slots=True)
class RoundCounts:
    """What the key-length bound needs to know about a round."""

    key_bits: int  # n: sifted Z bits that are reconciled and hashed
    test_bits: int  # k: X bits compared in full
    test_errors: int  # errors among them
    disclosed_bits: int  # leak: reconciliation + the confirmation tag


@dataclass(frozen=True, slots=True)
class KeyLength:
    secret_bits: int
    phase_error_bound: float  # e_X + μ (1.0 where undefined)
    reason: str | None  # why it is zero, when it is


def statistical_correction(n: int, k: int, eps_sec: float) -> float:
    """μ of TLGR 2012 Eq. (2); infinite when either sample is empty."""
    if n <= 0 or k <= 0:
        return math.inf
    return math.sqrt((n + k) / (n * k) * (k + 1) / k * math.log(2 / eps_sec))


def single_photon_key_length(
    counts: RoundCounts, *, eps_sec: float = DEFAULT_EPS_SEC, eps_cor: float = DEFAULT_EPS_COR
) -> KeyLength:
    """Secret bits for single-photon BB84 (TLGR 2012); 0, with a reason, when nothing is secret."""
    if not (0 < eps_sec < 1 and 0 < eps_cor < 1):
        raise ValueError("eps_sec and eps_cor must lie in (0, 1)")
    n, k = counts.key_bits, counts.test_bits
    if n <= 0:
        return KeyLength(0, 1.0, "no key bits")
    if k <= 0:
        return KeyLength(0, 1.0, "no test bits")
    if not 0 <= counts.test_errors <= k or counts.disclosed_bits < 0:
        return KeyLength(0, 1.0, "inconsistent counts")
    phase_bound = counts.test_errors / k + statistical_correction(n, k, eps_sec)
    if phase_bound >= 0.5:
        return KeyLength(0, min(phase_bound, 1.0), "phase error bound reaches 1/2")
    # the verification hash's log2(1/ε_cor) of TLGR Eq. 2 is not charged: disclosed_bits holds the tag
    value = n * (1 - binary_entropy(phase_bound)) - counts.disclosed_bits - math.log2(2 / eps_sec**2)
    if value < 1:
        return KeyLength(0, phase_bound, "finite-size and disclosure costs exceed the entropy")
    return KeyLength(min(math.floor(value), n), phase_bound, None)
