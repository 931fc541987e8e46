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
Bob's choices are counter-based too, from a key of his own, and one compiled pass
(:mod:`qkdd.links._sim_kernels`) yields his detections.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
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
_PREPARATION, _EVE = 1, 2  # streams of the frame's key
_BOB_STREAMS = (1, 2, 3, 4, 5)  # of Bob's key: candidates, dark counts (two detectors), choices, detector


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


def _frame_key(seed: int, frame: int, label: str = "qkdd-sim") -> int:
    digest = hashlib.blake2b(f"{label} {seed} {frame}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def stream_offset(key: int, stream: int) -> np.uint64:
    """The offset of one stream of hashes: a value of stream ``stream`` at index i is the SplitMix64
    finaliser of i·γ + key + stream·0xD1B54A32D192ED03 (mod 2^64)."""
    return np.uint64((key + stream * 0xD1B54A32D192ED03) & 0xFFFFFFFFFFFFFFFF)


def threshold(probability: float) -> int:
    """⌈probability·2^24⌉: u = k·2^-24 is below ``probability`` iff k is below this (exact: scaling by
    2^24 rounds nothing)."""
    return min(math.ceil(probability * 2.0**24), 1 << 24)


def _edges(probabilities: Sequence[float]) -> npt.NDArray[np.uint64]:
    return np.array([threshold(p) for p in probabilities], dtype=np.uint64)


def _padded(values: npt.NDArray[np.uint64], size: int, fill: int) -> npt.NDArray[np.uint64]:
    return np.concatenate((values, np.full(size - values.size, fill, dtype=np.uint64)))


def gap_table(probability: float) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64], np.uint64]:
    """The gaps 1, 2, … between the events of a Bernoulli process with ``probability`` per pulse, as a
    Walker alias table (Walker, ACM TOMS 3 (1977) 253; Vose's construction, IEEE TSE 17 (1991) 972):
    K entries, K a power of two near 8/p (2^4 … 2^12); outcome j < K − 1 is the gap j + 1, with
    probability p(1 − p)^j, and outcome K − 1, probability (1 − p)^(K − 1), is a gap of at least K: K − 1
    and a fresh draw. Entry j is kept iff the low 32 bits of the draw's hash are below thresholds[j],
    else it is aliases[j]. Returns (thresholds, aliases, 64 − log2 K); empty tables for p = 0."""
    if probability <= 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64), np.uint64(64)
    p = min(probability, 1.0)
    bits = min(max(math.ceil(math.log2(8 / p)), 4), 12)
    size = 1 << bits
    q = 1.0 - p
    scaled = [size * p * q**j for j in range(size - 1)] + [size * q ** (size - 1)]
    thresholds = np.full(size, 1 << 32, dtype=np.uint64)
    aliases = np.arange(size, dtype=np.int64)
    small = [j for j in range(size) if scaled[j] < 1]
    large = [j for j in range(size) if scaled[j] >= 1]
    while small and large:
        j, k = small.pop(), large.pop()
        thresholds[j], aliases[j] = round(scaled[j] * 2.0**32), k
        scaled[k] += scaled[j] - 1
        (small if scaled[k] < 1 else large).append(k)
    return thresholds, aliases, np.uint64(64 - bits)  # left over: whole entries (rounding), kept always


def _scale(probability: float) -> float:
    """The geometric scale −1/ln(1 − p) of a Bernoulli process (:func:`_sim_kernels._after`): −1 for
    p = 0 (no event), 0 for p = 1 (every pulse)."""
    if probability <= 0:
        return -1.0
    if probability >= 1:
        return 0.0
    return -1.0 / math.log1p(-probability)


def warm_up() -> None:
    """Load both kernels (compiling them on the first run after an install), so that the first frame
    does not wait for them: a few hundredths of a second when numba's cache has them, seconds when not."""
    parameters = SimParameters(pulses_per_frame=1 << 12, dark_count_probability=1e-3, eve_fraction=0.5)
    detections = SimBob(parameters, ahead=False).simulate(0)
    SimPreparation(parameters, 0).at(detections.indices)


@dataclass(frozen=True)
class SimPreparation:
    """Alice's preparation of one frame, evaluated at any pulse indices on demand."""

    parameters: SimParameters
    frame: int

    @property
    def pulses(self) -> int:
        return self.parameters.pulses_per_frame

    @property
    def offset(self) -> np.uint64:
        return stream_offset(_frame_key(self.parameters.seed, self.frame), _PREPARATION)

    def at(self, indices: npt.NDArray[np.int64]) -> tuple[Bits, Bits, npt.NDArray[np.uint8]]:
        # one 64-bit hash per pulse: bits 0-23 pick the intensity, 24-47 the basis, bit 63 the bit value
        from qkdd.links import _sim_kernels  # noqa: PLC0415 (numba: imported by the first frame)

        p = self.parameters
        contiguous = np.ascontiguousarray(indices, dtype=np.int64)
        bits, bases, classes = _sim_kernels.prepare(
            contiguous,
            self.offset,
            _padded(_edges(p._cumulative), 3, 1 << 25),
            np.uint64(threshold(p.z_probability)),
        )
        return bits, bases, classes


def _capacity(mean: float) -> int:
    """Room for a frame's detections, ``mean`` expected: six standard deviations more."""
    return int(mean + 6 * math.sqrt(mean) + 64)


class SimAlice:
    def __init__(self, parameters: SimParameters) -> None:
        self.parameters = parameters
        self.info = _info(parameters)

    def preparation(self, frame: int) -> SimPreparation:
        return SimPreparation(self.parameters, frame)

    def warm_up(self) -> None:
        warm_up()


class SimBob:
    """Bob's detector. Like real hardware, which records the next frame while the current one is being
    post-processed, it simulates frame f + 1 in a background thread (:mod:`qkdd.background`: at a lower
    priority) once frame f has been asked for."""

    def __init__(self, parameters: SimParameters, *, ahead: bool = True) -> None:
        self.parameters = parameters
        self.info = _info(parameters)
        self._worker = background.executor("qkdd-sim") if ahead else None
        self._next: tuple[int, Future[Detections]] | None = None

    def warm_up(self) -> None:
        warm_up()

    def detections(self, frame: int) -> Detections:
        ahead = self._next
        if self._worker is not None:
            self._next = (frame + 1, self._worker.submit(self.simulate, frame + 1))
        if ahead is not None and ahead[0] == frame:
            return ahead[1].result()
        if ahead is not None:
            ahead[1].cancel()
        return self.simulate(frame)

    def simulate(self, frame: int) -> Detections:
        """Bob's detections in ``frame``, a function of the seed and the frame number alone: one pass
        over the detected pulses (:func:`qkdd.links._sim_kernels.detect`)."""
        from qkdd.links import _sim_kernels  # noqa: PLC0415 (numba: imported by the first frame)

        p = self.parameters
        if p.single_photon:
            arrival = [p.transmittance for _ in p.intensities]
        else:
            arrival = [1 - math.exp(-p.transmittance * mu) for mu in p.intensities]
        top = max(arrival)
        alice_key = _frame_key(p.seed, frame)
        bob_key = _frame_key(p.seed, frame, "qkdd-sim-bob")
        offsets = [stream_offset(alice_key, _PREPARATION), stream_offset(alice_key, _EVE)]
        offsets += [stream_offset(bob_key, stream) for stream in _BOB_STREAMS]
        edges = [p.z_probability, p.z_probability, p.misalignment, p.eve_fraction]
        rate = sum(q * a for q, a in zip(p.intensity_probabilities, arrival, strict=True))
        expected = p.pulses_per_frame * (rate + 2 * p.dark_count_probability)
        capacity = _capacity(expected)
        while True:
            out = (
                np.empty(capacity, dtype=np.int64),
                np.empty(capacity, dtype=np.uint8),
                np.empty(capacity, dtype=np.uint8),
                np.empty(capacity, dtype=np.bool_),
            )
            count = _sim_kernels.detect(
                p.pulses_per_frame,
                np.array(offsets, dtype=np.uint64),
                gap_table(top),
                _scale(p.dark_count_probability),
                _padded(_edges(p._cumulative), 3, 1 << 25),
                _edges(edges),
                # a candidate (an arrival at the largest intensity's rate) of class c is kept with
                # probability arrival[c] / top: Poisson thinning
                _padded(_edges([a / top if top > 0 else 0.0 for a in arrival]), 4, 0),
                out,
            )
            if count >= 0:
                break
            capacity *= 2  # more than six standard deviations above the mean: about once in 10^9 frames
        indices, bases, bits, double_clicks = out
        detections = Detections(
            p.pulses_per_frame, indices[:count], bases[:count], bits[:count], double_clicks[:count]
        )
        _ = detections.encoded_indices  # Bob's announcement, encoded here rather than in the round
        return detections


def _info(parameters: SimParameters) -> LinkInfo:
    if parameters.single_photon:
        return LinkInfo("sim", parameters.pulses_per_frame)
    return LinkInfo(
        "sim", parameters.pulses_per_frame, parameters.intensities, parameters.intensity_probabilities
    )


def open_link(role: str, options: Mapping[str, Any]) -> AliceLink | BobLink:
    parameters = SimParameters.from_options(options)
    return SimAlice(parameters) if role == "alice" else SimBob(parameters)
