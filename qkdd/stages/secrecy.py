"""Which bound fixes a round's secret length, from the round's counts (protocol/qkdp-v2.md §8).

A link that declares intensities has a weak-coherent source: the finite-key decoy-state bound of
:mod:`qkdd.stages.decoy` applies. A link that declares none has a true single-photon source: the bound
of :mod:`qkdd.stages.keylength` applies. Both daemons call this with the same counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qkdd.stages import decoy, keylength
from qkdd.stages.estimation import Estimate
from qkdd.stages.sifting import SiftedKey


def round_key_length(
    intensities: Sequence[float],
    probabilities: Sequence[float],
    sifted: SiftedKey,
    estimate: Estimate,
    disclosed_bits: int,
    *,
    eps_sec: float,
    eps_cor: float,
) -> keylength.KeyLength:
    """Secret bits of a round whose key is the Z bits of ``sifted`` that ``estimate`` left as key."""
    # the Z bits' class counts are kept with the sifted key; the sampled bits (often none) come off.
    # Each side calls this several times a round, some of them on the critical path: with no sample
    # (the default) it takes a fraction of a millisecond instead of passes over every Z bit
    z_counts = sifted.z_class_counts
    key_counts = np.zeros(max(len(intensities), len(z_counts)), dtype=np.int64)
    key_counts[: len(z_counts)] = z_counts
    if estimate.z_sample_bits:
        sampled = sifted.z_classes[~estimate.z_key_mask]
        key_counts -= np.bincount(sampled, minlength=key_counts.size)  # sampled classes are among the Z ones
    if not intensities:
        counts = keylength.RoundCounts(
            int(key_counts.sum()), estimate.x_bits, estimate.x_errors, disclosed_bits
        )
        return keylength.single_photon_key_length(counts, eps_sec=eps_sec, eps_cor=eps_cor)
    classes = range(len(intensities))
    tested = estimate.x_by_intensity
    return decoy.decoy_key_length(
        decoy.DecoyCounts(
            tuple(intensities),
            tuple(probabilities),
            tuple(int(key_counts[k]) for k in classes),
            tuple(tested.get(k, (0, 0))[0] for k in classes),
            tuple(tested.get(k, (0, 0))[1] for k in classes),
            disclosed_bits,
        ),
        eps_sec=eps_sec,
        eps_cor=eps_cor,
    )
