"""Parameter estimation for efficient BB84 with a biased basis choice (protocol/qkdp-v2.md §4).

Theory of operation: the key comes from the Z basis; the X basis tests. Bob discloses all his sifted
X-basis bits and, optionally, a random sample of his Z bits; Alice answers with hers at the same
positions. Both compute the same error counts, per intensity class, from the same two strings. X bits
and sampled Z bits are never key, so nothing here counts against the key: sampled Z bits are removed
from it instead. The Z error rate of the whole key is known exactly after reconciliation (the corrected
bits); the sample only gives Cascade an early estimate.

A round aborts, with a reason, when the phase error rate (X) or the sampled Z error rate exceeds the
threshold (default 11%, where the Shor–Preskill rate 1 − 2h(Q) reaches zero), or when a basis has no
bits at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qkdd.bits import Bits, RandomSource, as_bits, pack_bits, unpack_bits
from qkdd.errors import InputError, RemoteProtocolError
from qkdd.stages.sifting import MAX_INTENSITY_CLASSES, SiftedKey, X, Z

DEFAULT_THRESHOLD = 0.11


@dataclass(frozen=True, slots=True)
class EstimateRequest:
    """Bob → Alice: Bob's sifted X bits, and which Z bits are sampled with Bob's values there."""

    x_count: int
    x_bits: bytes
    z_count: int
    z_sample_mask: bytes  # z_count bits; empty when no Z sample is taken
    z_sample_bits: bytes


@dataclass(frozen=True, slots=True)
class EstimateAnswer:
    """Alice → Bob: Alice's bits at the same X and sampled Z positions."""

    x_bits: bytes
    z_sample_bits: bytes


@dataclass(frozen=True)
class Estimate:
    """Error counts both sides agree on, and the abort decision."""

    x_bits: int
    x_errors: int
    x_by_intensity: dict[int, tuple[int, int]]  # class -> (bits, errors)
    z_sample_bits: int
    z_sample_errors: int
    abort_reason: str | None
    z_key_mask: npt.NDArray[np.bool_]  # which sifted Z bits remain key (not sampled)

    @property
    def phase_error_rate(self) -> float:
        return self.x_errors / self.x_bits if self.x_bits else 1.0

    @property
    def z_sample_error_rate(self) -> float | None:
        return self.z_sample_errors / self.z_sample_bits if self.z_sample_bits else None

    def z_key(self, sifted: SiftedKey) -> Bits:
        """The Z bits of ``sifted`` that remain key after sampling."""
        return sifted.select(Z)[self.z_key_mask]


def bob_request(
    sifted: SiftedKey, source: RandomSource, *, z_sample_fraction: float = 0.0
) -> EstimateRequest:
    """Bob's disclosure: every sifted X bit, and a random Z sample of the given fraction."""
    if not 0.0 <= z_sample_fraction < 1.0:
        raise InputError(f"z_sample_fraction must lie in [0, 1), got {z_sample_fraction}")
    x_bits = sifted.select(X)
    z_bits = sifted.select(Z)
    if z_sample_fraction > 0 and z_bits.size:
        # a Bernoulli(fraction) mask from uniform bytes: each Z bit is sampled independently
        threshold = round(z_sample_fraction * 65536)
        draws = np.frombuffer(source.bytes(2 * z_bits.size), dtype=">u2")
        mask = (draws < threshold).astype(np.uint8)
        return EstimateRequest(
            int(x_bits.size),
            pack_bits(x_bits),
            int(z_bits.size),
            pack_bits(mask),
            pack_bits(z_bits[mask == 1]),
        )
    return EstimateRequest(int(x_bits.size), pack_bits(x_bits), int(z_bits.size), b"", b"")


def _sample_mask(request: EstimateRequest) -> Bits:
    if not request.z_sample_mask:
        return np.zeros(request.z_count, dtype=np.uint8)
    return unpack_bits(request.z_sample_mask, request.z_count, "estimation Z sample mask")


def alice_answer(
    sifted: SiftedKey, request: EstimateRequest, *, threshold: float = DEFAULT_THRESHOLD
) -> tuple[EstimateAnswer, Estimate]:
    """Alice's answer and her copy of the estimate.

    Raises:
        RemoteProtocolError: Bob's counts or lengths do not fit Alice's sifted key.
    """
    x_bits = sifted.select(X)
    z_bits = sifted.select(Z)
    if request.x_count != x_bits.size or request.z_count != z_bits.size:
        raise RemoteProtocolError(
            f"estimation: Bob reports {request.x_count} X and {request.z_count} Z bits, "
            f"Alice has {x_bits.size} and {z_bits.size}"
        )
    bob_x = unpack_bits(request.x_bits, request.x_count, "estimation X bits")
    mask = _sample_mask(request)
    sampled = int(mask.sum())
    bob_z = unpack_bits(request.z_sample_bits, sampled, "estimation Z sample bits")
    alice_z = z_bits[mask == 1]
    answer = EstimateAnswer(pack_bits(x_bits), pack_bits(alice_z))
    return answer, _estimate(sifted, x_bits, bob_x, alice_z, bob_z, mask, threshold)


def bob_estimate(
    sifted: SiftedKey,
    request: EstimateRequest,
    answer: EstimateAnswer,
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> Estimate:
    """Bob's copy of the estimate, from his request and Alice's answer.

    Raises:
        RemoteProtocolError: Alice's answer has the wrong length or non-zero padding.
    """
    mask = _sample_mask(request)
    alice_x = unpack_bits(answer.x_bits, request.x_count, "estimation X bits (answer)")
    alice_z = unpack_bits(answer.z_sample_bits, int(mask.sum()), "estimation Z sample (answer)")
    bob_z = sifted.select(Z)[mask == 1]
    return _estimate(sifted, alice_x, sifted.select(X), alice_z, bob_z, mask, threshold)


def _estimate(
    sifted: SiftedKey,
    alice_x: Bits,
    bob_x: Bits,
    alice_z: Bits,
    bob_z: Bits,
    mask: Bits,
    threshold: float,
) -> Estimate:
    if not 0.0 < threshold <= 0.5:
        raise InputError(f"threshold must lie in (0, 0.5], got {threshold}")
    x_errors = as_bits(alice_x, "alice X") ^ as_bits(bob_x, "bob X")
    classes = sifted.intensities[~sifted.z_mask]
    per_class_bits = np.bincount(classes, minlength=MAX_INTENSITY_CLASSES)
    per_class_errors = np.bincount(classes, weights=x_errors, minlength=MAX_INTENSITY_CLASSES)
    by_intensity = {
        c: (int(per_class_bits[c]), int(per_class_errors[c]))
        for c in range(MAX_INTENSITY_CLASSES)
        if per_class_bits[c]
    }
    z_errors = int(np.count_nonzero(alice_z ^ bob_z))
    estimate = Estimate(
        x_bits=int(alice_x.size),
        x_errors=int(x_errors.sum()),
        x_by_intensity=by_intensity,
        z_sample_bits=int(alice_z.size),
        z_sample_errors=z_errors,
        abort_reason=None,
        z_key_mask=mask == 0,
    )
    reason = abort_reason(estimate, int(np.count_nonzero(mask == 0)), threshold)
    if reason is None:
        return estimate
    return dataclasses.replace(estimate, abort_reason=reason)


def abort_reason(estimate: Estimate, z_key_bits: int, threshold: float) -> str | None:
    """Why the round must stop after estimation, or ``None``."""
    if z_key_bits == 0:
        return "no Z-basis key bits in this frame"
    if estimate.x_bits == 0:
        return "no X-basis bits: the phase error cannot be bounded"
    if estimate.phase_error_rate > threshold:
        return f"phase error rate {estimate.phase_error_rate:.4f} exceeds threshold {threshold:.4f}"
    sample_rate = estimate.z_sample_error_rate
    if sample_rate is not None and sample_rate > threshold:
        return f"sampled Z error rate {sample_rate:.4f} exceeds threshold {threshold:.4f}"
    return None


def qber_abort_reason(corrected_bits: int, key_bits: int, threshold: float = DEFAULT_THRESHOLD) -> str | None:
    """After reconciliation: abort if the exact Z error rate exceeds the threshold."""
    if key_bits and corrected_bits / key_bits > threshold:
        return f"Z error rate {corrected_bits / key_bits:.4f} exceeds threshold {threshold:.4f}"
    return None


GUESS_MIN_TEST_BITS = 1000
"""Test bits from which the X error rate alone sizes Cascade's blocks (below, the prior guards it)."""


def cascade_qber_guess(estimate: Estimate, prior: float, previous: float | None = None) -> float:
    """The QBER Cascade sizes its blocks for (only efficiency depends on it, never correctness).

    A disclosed Z sample if one was taken; else the exact Z error rate of the previous round; else the
    X error rate when it rests on enough bits; else the larger of the X error rate and the prior.
    """
    if estimate.z_sample_error_rate is not None:
        return estimate.z_sample_error_rate
    if previous is not None:
        return previous
    if estimate.x_bits >= GUESS_MIN_TEST_BITS:
        return estimate.phase_error_rate
    return max(prior, estimate.phase_error_rate)
