"""The ``sim`` backend: a seeded simulator of a BB84 link with weak coherent pulses and decoy states.

Model (per pulse t of frame f)
------------------------------
* Alice picks an intensity class c with probabilities ``intensity_probabilities`` (mean photon numbers
  ``intensities``, e.g. signal/decoy/vacuum), the Z basis with probability ``z_probability``, and a
  uniform bit. These are *counter-based*: a hash of (seed, frame, stream, t), so her preparation at
  any pulse index costs O(1) and no whole-frame array exists. **Both daemons derive Alice's preparation
  from the shared seed** — a simulator convenience that has no security meaning.
* Channel and detectors: transmittance η = η_det · 10^(−α·L/10); the pulse's photons reach Bob with
  probability 1 − exp(−η μ_c) (Poisson statistics); each of Bob's two detectors also fires on its own
  with the dark-count probability p_d. Bob measures in Z with probability ``z_probability``. In the
  encoded basis a photon hits the detector of the encoded bit except with probability ``misalignment``;
  in the other basis either detector, uniformly. Both detectors firing is a double click (Bob assigns a
  random bit before sifting).
* ``single_photon = true`` models a true single-photon source instead (each pulse carries one photon,
  arriving with probability η); the link then declares no intensities and the single-photon bound applies.
* Eve (optional): on a fraction ``eve_fraction`` of pulses she measures the encoded state in a random
  basis and resends her result with the same intensity — an idealised intercept-resend attack that
  leaves detection statistics unchanged and causes 25% errors on the pulses she touched.

Work scales with detections: the detected pulses are drawn directly, as Bernoulli processes with
geometric gaps (signal arrivals at the largest intensity thinned per class; dark counts per detector).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from qkdd import background
from qkdd.bits import Bits
from qkdd.errors import InputError
from qkdd.links import AliceLink, BobLink, LinkInfo
from qkdd.stages.sifting import Detections

U64 = npt.NDArray[np.uint64]
_PREPARATION, _EVE = 1, 2
CHUNK_PULSES = 1 << 22


@dataclass(frozen=True)
class SimParameters:
    seed: int = 1
    pulses_per_frame: int = 1 << 24
    distance_km: float = 10.0
    fiber_loss_db_per_km: float = 0.2
    detector_efficiency: float = 0.25
    dark_count_probability: float = 1e-6
    misalignment: float = 0.01
    # signal, decoy, vacuum: chosen for a positive finite-key decoy bound at 2^24-pulse frames at 10 km;
    # qkdd init --distance-km (qkdd.keyrate.sim_options) writes settings optimised for the distance
    intensities: tuple[float, ...] = (0.5, 0.2, 0.0)
    intensity_probabilities: tuple[float, ...] = (0.4, 0.4, 0.2)
    z_probability: float = 0.8
    eve_fraction: float = 0.0
    # a true single-photon source instead of weak coherent pulses: one photon per pulse, whatever the
    # intensity class, and the link declares no intensities (the single-photon bound applies)
    single_photon: bool = False
    _cumulative: tuple[float, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> InputError:
            return InputError(f"link.sim.{key}: expected {expected}, got {getattr(self, key)!r}")

        if not 1 <= self.pulses_per_frame <= 1 << 40:
            raise bad("pulses_per_frame", "an integer in [1, 2^40]")
        for key in ("distance_km", "fiber_loss_db_per_km"):
            if not 0 <= getattr(self, key) < math.inf:
                raise bad(key, "a finite number >= 0")
        for key in ("detector_efficiency", "dark_count_probability", "misalignment", "eve_fraction"):
            if not 0 <= getattr(self, key) <= 1:
                raise bad(key, "a number in [0, 1]")
        if not 0 < self.z_probability < 1:
            raise bad("z_probability", "a number in (0, 1)")
        if not 1 <= len(self.intensities) <= 4 or any(not 0 <= mu < 100 for mu in self.intensities):
            raise bad("intensities", "1 to 4 mean photon numbers in [0, 100)")
        probabilities = self.intensity_probabilities
        if len(probabilities) != len(self.intensities) or any(p < 0 for p in probabilities):
            raise bad("intensity_probabilities", "one probability >= 0 per intensity")
        if abs(sum(probabilities) - 1) > 1e-9:
            raise bad("intensity_probabilities", "probabilities that sum to 1")
        object.__setattr__(self, "_cumulative", tuple(np.cumsum(probabilities)[:-1].tolist()))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SimParameters:
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"link.sim.{unknown[0]}: unknown option; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for name, value in options.items():
            default = getattr(cls, name)
            try:
                if isinstance(default, tuple):
                    values[name] = tuple(float(v) for v in value)
                elif isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise TypeError
                    values[name] = value
                elif (
                    isinstance(default, bool)
                    or not isinstance(value, (int, float))
                    or isinstance(value, bool)
                ):
                    raise TypeError
                elif isinstance(default, int):
                    if not isinstance(value, int):
                        raise TypeError
                    values[name] = value
                else:
                    values[name] = float(value)
            except (TypeError, ValueError):
                kind = "a list of numbers" if isinstance(default, tuple) else type(default).__name__
                raise InputError(f"link.sim.{name}: expected {kind}, got {value!r}") from None
        return cls(**values)

    @property
    def transmittance(self) -> float:
        return self.detector_efficiency * 10 ** (-self.fiber_loss_db_per_km * self.distance_km / 10)


def _frame_key(seed: int, frame: int) -> int:
    digest = hashlib.blake2b(f"qkdd-sim {seed} {frame}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


PARALLEL_AT = 1 << 20
"""From this many indices on, :meth:`SimPreparation.at` evaluates half of them on a second thread."""


@functools.cache
def _helper() -> ThreadPoolExecutor:
    """The second thread of :meth:`SimPreparation.at`, at the daemon's priority (Alice's round waits)."""
    return background.executor("qkdd-sim-at", lower=False)


_HASH_BLOCK = 1 << 16
"""Indices hashed per step: the eight passes of :func:`_hash` then run on 512 KB that stays in cache
instead of streaming the whole array through memory eight times."""


def _hash(key: int, stream: int, indices: npt.NDArray[np.int64]) -> U64:
    """64 pseudo-random bits per index from (key, stream, index): SplitMix64's finaliser."""
    offset = np.uint64((key + stream * 0xD1B54A32D192ED03) & 0xFFFFFFFFFFFFFFFF)
    out = np.empty(indices.size, dtype=np.uint64)
    scratch = np.empty(min(indices.size, _HASH_BLOCK), dtype=np.uint64)
    for start in range(0, indices.size, _HASH_BLOCK):
        x = out[start : start + _HASH_BLOCK]
        t = scratch[: x.size]
        x[:] = indices[start : start + _HASH_BLOCK]  # as unsigned 64-bit integers
        x *= np.uint64(0x9E3779B97F4A7C15)
        x += offset
        np.right_shift(x, np.uint64(30), out=t)
        x ^= t
        x *= np.uint64(0xBF58476D1CE4E5B9)
        np.right_shift(x, np.uint64(27), out=t)
        x ^= t
        x *= np.uint64(0x94D049BB133111EB)
        np.right_shift(x, np.uint64(31), out=t)
        x ^= t
    return out


def _field(x: U64, shift: int) -> npt.NDArray[np.uint32]:
    """Bits [shift, shift + 24) of each hash: the k of a uniform u = k·2^-24 in [0, 1) (as 32-bit
    integers, half the memory traffic of the hashes for every comparison that follows)."""
    field = (x >> np.uint64(shift) if shift else x).astype(np.uint32)  # keeps the low 32 bits
    field &= np.uint32(0xFFFFFF)
    return field


def _threshold(probability: float) -> int:
    """⌈probability·2^24⌉: u = k·2^-24 reaches ``probability`` iff k is at least this (exact: scaling by
    2^24 rounds nothing)."""
    return min(math.ceil(probability * 2.0**24), 1 << 24)


def _at_least(field: npt.NDArray[np.uint32], probability: float) -> npt.NDArray[np.bool_]:
    """Whether u = k·2^-24 reaches ``probability`` (``field`` holds the k)."""
    return field >= np.uint32(_threshold(probability))


@dataclass(frozen=True)
class SimPreparation:
    """Alice's preparation of one frame, evaluated at any pulse indices on demand."""

    parameters: SimParameters
    frame: int

    @property
    def pulses(self) -> int:
        return self.parameters.pulses_per_frame

    def at(self, indices: npt.NDArray[np.int64]) -> tuple[Bits, Bits, npt.NDArray[np.uint8]]:
        if indices.size < PARALLEL_AT:
            return self._at(indices)
        # Alice's sifting waits for this while Bob's core idles: half on a second thread (numpy
        # releases the GIL) halves the wait
        half = indices.size // 2
        second = _helper().submit(self._at, indices[half:])
        bits, bases, classes = self._at(indices[:half])
        more_bits, more_bases, more_classes = second.result()
        return (
            np.concatenate((bits, more_bits)),
            np.concatenate((bases, more_bases)),
            np.concatenate((classes, more_classes)),
        )

    def _at(self, indices: npt.NDArray[np.int64]) -> tuple[Bits, Bits, npt.NDArray[np.uint8]]:
        x = self.hashes(indices)
        return (*self.bits_and_bases(x), self.classes(x))

    # one 64-bit hash per pulse: bits 0-23 pick the intensity, 24-47 the basis, bit 63 the bit value

    def hashes(self, indices: npt.NDArray[np.int64]) -> U64:
        return _hash(_frame_key(self.parameters.seed, self.frame), _PREPARATION, indices)

    def classes(self, x: U64) -> npt.NDArray[np.uint8]:
        classes = np.zeros(x.size, dtype=np.uint8)
        field = _field(x, 0)  # one field, compared with every class edge
        for edge in self.parameters._cumulative:
            classes += _at_least(field, edge)
        return classes

    def bits_and_bases(self, x: U64) -> tuple[Bits, Bits]:
        # without extracting the fields: bits 24-47 of x reach k iff x's low 48 bits reach k·2^24 (the
        # 24 bits below add less than 2^24), and bit 63 is set iff x reaches 2^63
        low48 = np.bitwise_and(x, np.uint64((1 << 48) - 1))
        bases = low48 >= np.uint64(_threshold(self.parameters.z_probability) << 24)
        return (x >= np.uint64(1 << 63)).view(np.uint8), bases.view(np.uint8)


FLOAT32_GAP_SCALE = float(1 << 19)
"""Largest mean-gap scale −1/ln(1 − p) that :func:`_bernoulli_indices` draws in single precision:
2^24 / 32, so that E·scale keeps integer resolution unless E exceeds 32 (probability e^-32)."""


def _bernoulli_indices(rng: np.random.Generator, n: int, p: float) -> npt.NDArray[np.int64]:
    """Indices in [0, n) each included independently with probability p (geometric gaps)."""
    if p <= 0 or n <= 0:
        return np.zeros(0, dtype=np.int64)
    if p >= 1:
        return np.arange(n, dtype=np.int64)
    chunks = []
    position = -1
    scale = -1.0 / math.log1p(-p)
    # single precision where it resolves every gap: E·scale stays below 2^24 unless E > 32 (e^-32);
    # a quarter less time for the simulator's detections, whose gaps are a dozen pulses
    single = scale < FLOAT32_GAP_SCALE
    while True:
        expected = (n - position) * p
        # geometric gaps on {1, 2, ...}: 1 + floor(E / -ln(1 - p)) with E standard exponential
        draws = int(expected + 6 * math.sqrt(expected) + 16)
        if single:
            exponentials = rng.standard_exponential(draws, dtype=np.float32)
            exponentials *= np.float32(scale)
            gaps = exponentials.astype(np.int32)
        else:
            exponentials64 = rng.standard_exponential(draws)
            exponentials64 *= scale
            gaps = exponentials64.astype(np.int64)
        gaps += 1
        indices = np.cumsum(gaps, dtype=np.int64)
        indices += position
        inside = indices[: np.searchsorted(indices, n)]  # sorted: the ones below n are a prefix
        chunks.append(inside)
        if inside.size < indices.size:
            return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        position = int(indices[-1])


class SimAlice:
    def __init__(self, parameters: SimParameters) -> None:
        self.parameters = parameters
        self.info = _info(parameters)

    def preparation(self, frame: int) -> SimPreparation:
        return SimPreparation(self.parameters, frame)


class SimBob:
    """Bob's detector. Like real hardware, which records the next frame while the current one is being
    post-processed, it simulates frame f + 1 in a background thread (:mod:`qkdd.background`: at a lower
    priority) once frame f has been asked for."""

    def __init__(self, parameters: SimParameters) -> None:
        self.parameters = parameters
        self.info = _info(parameters)
        self._worker = background.executor("qkdd-sim")
        self._next: tuple[int, Future[Detections]] | None = None

    def detections(self, frame: int) -> Detections:
        ahead = self._next
        self._next = (frame + 1, self._worker.submit(self.simulate, frame + 1))
        if ahead is not None and ahead[0] == frame:
            return ahead[1].result()
        if ahead is not None:
            ahead[1].cancel()
        return self.simulate(frame)

    def simulate(self, frame: int) -> Detections:
        """Bob's detections in ``frame`` (deterministic in the seed and the frame number), simulated in
        chunks of ``CHUNK_PULSES`` pulses so that every temporary array stays a few megabytes, whatever
        the frame size: the allocator reuses those warm pages instead of faulting in fresh ones."""
        p = self.parameters
        rng = np.random.default_rng([p.seed, frame, 0xB0B])
        preparation = SimPreparation(p, frame)
        parts = [
            self._chunk(rng, preparation, start, min(CHUNK_PULSES, p.pulses_per_frame - start))
            for start in range(0, p.pulses_per_frame, CHUNK_PULSES)
        ]
        indices, bob_bases, bits, double_clicks = (
            np.concatenate(arrays) for arrays in zip(*parts, strict=True)
        )
        detections = Detections(p.pulses_per_frame, indices, bob_bases, bits, double_clicks=double_clicks)
        _ = detections.encoded_indices  # Bob's announcement, encoded here rather than in the round
        return detections

    def _chunk(
        self, rng: np.random.Generator, preparation: SimPreparation, start: int, n: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
        """Detections among pulses [start, start + n): indices, Bob's bases, bits, double clicks."""
        p = self.parameters
        if p.single_photon:
            arrival = [p.transmittance for _ in p.intensities]
        else:
            arrival = [1 - math.exp(-p.transmittance * mu) for mu in p.intensities]
        top = max(arrival)
        candidates = _bernoulli_indices(rng, n, top)
        candidates += start
        x = preparation.hashes(candidates)
        # a candidate of class c is a detection with probability arrival[c] / top (single precision draws:
        # the probabilities move by at most 2^-24, and the simulator's draws take half the time)
        chance = np.array([each / top for each in arrival], dtype=np.float32)
        keep = np.flatnonzero(rng.random(candidates.size, dtype=np.float32) < chance[preparation.classes(x)])
        indices, x = candidates[keep], x[keep]
        bits, bases = preparation.bits_and_bases(x)
        # dark counts are rare: merge both detectors' into the sorted detections as one small batch
        dark_counts = [_bernoulli_indices(rng, n, p.dark_count_probability) + start for _ in (0, 1)]
        extra = np.union1d(*dark_counts)
        extra = extra[~_members(extra, indices)]
        at = np.searchsorted(indices, extra)
        extra_bits, extra_bases, _ = preparation.at(extra)
        indices = np.insert(indices, at, extra)
        bits = np.insert(bits, at, extra_bits)
        bases = np.insert(bases, at, extra_bases)
        has_signal = np.insert(np.ones(keep.size, dtype=bool), at, False)
        dark = np.zeros((2, indices.size), dtype=bool)  # which detector had a dark count
        for which, counts in enumerate(dark_counts):
            dark[which, np.searchsorted(indices, counts)] = True
        if p.eve_fraction > 0:
            x = _hash(_frame_key(p.seed, preparation.frame), _EVE, indices)
            eve = ~_at_least(_field(x, 0), p.eve_fraction)
            eve_bases = (~_at_least(_field(x, 24), 0.5)).astype(np.uint8)
            eve_bits = np.where(eve_bases == bases, bits, (x >> np.uint64(63)).astype(np.uint8))
            bases = np.where(eve, eve_bases, bases)
            bits = np.where(eve, eve_bits, bits)
        bob_bases = (rng.random(indices.size, dtype=np.float32) >= p.z_probability).view(np.uint8)
        u = rng.random(indices.size, dtype=np.float32)  # one draw decides the detector, in either basis
        flip = np.where(bob_bases == bases, u < p.misalignment, u < 0.5)
        detector = bits ^ flip.astype(np.uint8)  # which detector the photon hits
        click = [(has_signal & (detector == d)) | dark[d] for d in (0, 1)]
        return indices, bob_bases, click[1].astype(np.uint8), click[0] & click[1]


def _members(values: npt.NDArray[np.int64], sorted_set: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Which of ``values`` lie in the sorted array ``sorted_set``."""
    if sorted_set.size == 0:
        return np.zeros(values.size, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return np.asarray(sorted_set[at] == values)


def _info(parameters: SimParameters) -> LinkInfo:
    if parameters.single_photon:
        return LinkInfo("sim", parameters.pulses_per_frame)
    return LinkInfo(
        "sim", parameters.pulses_per_frame, parameters.intensities, parameters.intensity_probabilities
    )


def open_link(role: str, options: Mapping[str, Any]) -> AliceLink | BobLink:
    parameters = SimParameters.from_options(options)
    return SimAlice(parameters) if role == "alice" else SimBob(parameters)
