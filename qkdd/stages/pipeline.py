"""Synthetic frames for the stages' tests and benchmarks (a depolarising-style channel).

A whole round, both roles, runs only in the protocol engine (:mod:`qkdd.engine`); :mod:`qkdd.loopback`
joins two engines in memory where no network is wanted.
"""

from __future__ import annotations

import numpy as np

from qkdd.stages import sifting


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
