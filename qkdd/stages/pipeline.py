"""One frame through every stage, both roles in one process (benchmarks, tests, the offline demo).

This is the data flow of DESIGN.md with the network replaced by direct calls: sifting → estimation →
Cascade → confirmation → key length → privacy amplification. The daemons run the same stage objects
over the wire. Each role has its own random source, as it would on two hosts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from qkdd.bits import Bits, RandomSource
from qkdd.stages import amplify, cascade, confirm, estimation, keylength, secrecy, sifting


@dataclass(frozen=True)
class PipelineConfig:
    cascade_variant: str = cascade.DEFAULT_VARIANT
    qber_threshold: float = estimation.DEFAULT_THRESHOLD
    z_sample_fraction: float = 0.0
    qber_prior: float = 0.02  # Cascade's block size when no Z sample is taken
    eps_sec: float = keylength.DEFAULT_EPS_SEC
    eps_cor: float = keylength.DEFAULT_EPS_COR
    # the source: intensities (and their probabilities) of weak coherent pulses; empty for single photons
    intensities: tuple[float, ...] = ()
    intensity_probabilities: tuple[float, ...] = ()


@dataclass(frozen=True)
class FrameResult:
    pulses: int
    detections: int
    sifted_bits: int
    qber: float | None
    phase_error: float | None
    disclosed_bits: int
    secret_bits: int
    aborted: bool
    reason: str | None
    seconds: float
    alice_key: Bits
    bob_key: Bits


def run_frame(
    preparation: sifting.Preparation,
    detections: sifting.Detections,
    alice_random: RandomSource,
    bob_random: RandomSource,
    config: PipelineConfig = PipelineConfig(),
) -> FrameResult:
    """Distil one frame; the keys are empty unless the round completed."""
    started = time.perf_counter()
    empty = np.zeros(0, dtype=np.uint8)

    def finish(
        sifted_bits: int,
        qber: float | None,
        phase: float | None,
        disclosed: int,
        reason: str | None = None,
        keys: tuple[Bits, Bits] = (empty, empty),
    ) -> FrameResult:
        return FrameResult(
            preparation.pulses,
            int(detections.indices.size),
            sifted_bits,
            qber,
            phase,
            disclosed,
            int(keys[0].size),
            reason is not None,
            reason,
            time.perf_counter() - started,
            keys[0],
            keys[1],
        )

    def stop(
        reason: str, sifted_bits: int, qber: float | None, phase: float | None, disclosed: int
    ) -> FrameResult:
        return finish(sifted_bits, qber, phase, disclosed, reason)

    detections = sifting.resolve_double_clicks(detections, bob_random)
    announce = sifting.bob_announce(detections)
    answer, alice_sifted = sifting.alice_answer(preparation, announce)
    bob_sifted = sifting.bob_sift(detections, answer)
    sifted_bits = int(bob_sifted.bits.size)

    request = estimation.bob_request(bob_sifted, bob_random, z_sample_fraction=config.z_sample_fraction)
    reply, alice_estimate = estimation.alice_answer(alice_sifted, request, threshold=config.qber_threshold)
    estimate = estimation.bob_estimate(bob_sifted, request, reply, threshold=config.qber_threshold)
    phase = estimate.phase_error_rate if estimate.x_bits else None
    if estimate.abort_reason or alice_estimate.abort_reason:
        return stop(str(estimate.abort_reason or alice_estimate.abort_reason), sifted_bits, None, phase, 0)

    alice_key = alice_estimate.z_key(alice_sifted)
    bob_key = estimate.z_key(bob_sifted)
    qber_guess = estimation.cascade_qber_guess(estimate, config.qber_prior)
    result, _ = cascade.reconcile_in_memory(
        alice_key, bob_key, qber_guess, bob_random, variant=config.cascade_variant
    )
    qber = result.corrected_bits / alice_key.size
    disclosed = result.disclosed_bits + confirm.TAG_BITS
    reason = estimation.qber_abort_reason(result.corrected_bits, int(alice_key.size), config.qber_threshold)
    if reason:
        return stop(reason, sifted_bits, qber, phase, disclosed)

    check = confirm.alice_confirm(alice_key, alice_random)
    if not confirm.bob_confirm(result.key, check).matched:
        return stop(
            "confirmation tags differ: residual errors after reconciliation",
            sifted_bits,
            qber,
            phase,
            disclosed,
        )

    length = secrecy.round_key_length(
        config.intensities,
        config.intensity_probabilities,
        bob_sifted,
        estimate,
        disclosed,
        eps_sec=config.eps_sec,
        eps_cor=config.eps_cor,
    )
    if length.secret_bits == 0:
        return stop(f"no secret key: {length.reason}", sifted_bits, qber, phase, disclosed)
    seed = amplify.choose_seed(alice_random, int(alice_key.size), length.secret_bits)
    alice_final = amplify.amplify(alice_key, seed)
    bob_final = amplify.amplify(result.key, seed)
    return finish(sifted_bits, qber, phase, disclosed, keys=(alice_final, bob_final))


def synthetic_frame(
    rng: np.random.Generator,
    pulses: int,
    *,
    detection_probability: float,
    qber: float,
    z_probability: float = 0.9,
) -> tuple[sifting.FramePreparation, sifting.Detections]:
    """A frame with a depolarising-style channel (each detected bit flipped with probability ``qber``).

    For tests and benchmarks of the stages only; the physical link simulator is ``qkdd.links.sim``.
    """
    bits = rng.integers(0, 2, pulses, dtype=np.uint8)
    bases = (rng.random(pulses) >= z_probability).astype(np.uint8)
    intensities = np.zeros(pulses, dtype=np.uint8)
    detected = np.flatnonzero(rng.random(pulses) < detection_probability)
    bob_bases = (rng.random(detected.size) >= z_probability).astype(np.uint8)
    same = bob_bases == bases[detected]
    bob_bits = np.where(same, bits[detected], rng.integers(0, 2, detected.size, dtype=np.uint8))
    bob_bits ^= (rng.random(detected.size) < qber).astype(np.uint8)
    return (
        sifting.FramePreparation(bits, bases, intensities),
        sifting.Detections(pulses, detected, bob_bases, bob_bits.astype(np.uint8)),
    )
