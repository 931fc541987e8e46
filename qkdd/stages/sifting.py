"""Sifting (protocol/qkdp-v2.md §3).

Theory of operation: Bob announces which pulses of the frame he detected and in which basis he measured
each; Alice answers, per detection, whether her basis matched and, for matches, the intensity class she
sent. Both then keep the matching detections, in detection order, as the sifted key (bits tagged with
basis and intensity class). No key bit crosses the channel.

Wire form: detection indices travel either as a bitmap over the frame's pulses or as varint gaps
(``gap[0] = index[0]``, ``gap[i] = index[i] - index[i-1] - 1``), whichever is smaller; bases and match
flags as packed bits (Z = 0, X = 1), intensity classes as two bits each.

Alice's side never needs the whole frame: it asks its preparation only for the detected pulse indices
(:class:`Preparation`), so work scales with detections, not pulses.

Each side's work runs in compiled loops (:mod:`qkdd.stages._sifting_kernels`), one or two passes over
the detections where numpy needs one per step. The numpy code they replaced stays here as the reference
the tests hold them to (the ``*_numpy`` functions); the peer's malformed input is handed to it, so that
every refusal raises the error, and the message, the reference raises. :func:`warm_up` loads the kernels
ahead of the first round.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from qkdd.bits import (
    Bits,
    RandomSource,
    as_bits,
    as_index_array,
    check_packed,
    decode_varints,
    encode_varints,
    pack_bits,
    random_bits,
    unpack_bits,
)
from qkdd.errors import InputError, RemoteProtocolError

if TYPE_CHECKING:
    from qkdd.stages import _sifting_kernels as _kernels
else:

    class _Kernels:
        """:mod:`qkdd.stages._sifting_kernels`, imported at the first kernel called (importing numba takes
        about 0.15 s, which a process that never sifts should not pay at import), as in
        :mod:`qkdd.stages.cascade`. Each kernel, once looked up, is an attribute of this object."""

        def __getattr__(self, name: str) -> Any:
            from qkdd.stages import _sifting_kernels  # noqa: PLC0415

            kernel = getattr(_sifting_kernels, name)
            setattr(self, name, kernel)
            return kernel

    _kernels = _Kernels()

Z, X = 0, 1
MAX_INTENSITY_CLASSES = 4
MAX_FRAME_PULSES = 1 << 40
NO_PULSE_INDICES: npt.NDArray[np.int64] = np.empty(0, dtype=np.int64)
"""A sifted key's pulse indices where they were not asked for (read-only): nothing after sifting reads
them, and at 8 bytes per sifted bit they are the largest array a round would keep."""
NO_PULSE_INDICES.flags.writeable = False


class Preparation(Protocol):
    """Alice's record of a frame: what she sent at given pulse indices."""

    @property
    def pulses(self) -> int:
        """Pulses in the frame."""
        ...

    def at(self, indices: npt.NDArray[np.int64]) -> tuple[Bits, Bits, npt.NDArray[np.uint8]]:
        """(bits, bases, intensity classes) of the pulses ``indices``."""
        ...


@dataclass(frozen=True)
class FramePreparation:
    """A :class:`Preparation` held as whole-frame arrays (tests, small frames)."""

    bits: Bits
    bases: Bits
    intensities: npt.NDArray[np.uint8]

    def __post_init__(self) -> None:
        bits = as_bits(self.bits, "preparation bits")
        bases = as_bits(self.bases, "preparation bases")
        classes = as_index_array(self.intensities, "intensity classes", bound=MAX_INTENSITY_CLASSES)
        if not bits.size == bases.size == classes.size:
            raise InputError(
                f"preparation arrays differ in length: bits {bits.size}, bases {bases.size}, "
                f"intensities {classes.size}"
            )
        if bits.size == 0:
            raise InputError("preparation: empty frame")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "bases", bases)
        object.__setattr__(self, "intensities", classes.astype(np.uint8))

    @property
    def pulses(self) -> int:
        return int(self.bits.size)

    def at(self, indices: npt.NDArray[np.int64]) -> tuple[Bits, Bits, npt.NDArray[np.uint8]]:
        return self.bits[indices], self.bases[indices], self.intensities[indices]


@dataclass(frozen=True)
class Detections:
    """Bob's detections in one frame: strictly increasing pulse indices, bases, and bits.

    ``double_clicks`` marks detections where both detectors fired; :func:`resolve_double_clicks`
    gives each a uniformly random bit (the squashing model's prescription).
    """

    pulses: int
    indices: npt.NDArray[np.int64]
    bases: Bits
    bits: Bits
    double_clicks: npt.NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.pulses <= MAX_FRAME_PULSES:
            raise InputError(
                f"detections: frame pulses must lie in [1, {MAX_FRAME_PULSES}], got {self.pulses}"
            )
        indices = np.asarray(self.indices)
        if indices.ndim == 1 and indices.dtype == np.int64:  # every backend's: one pass checks both
            indices = np.ascontiguousarray(indices)
            inside, increasing = _kernels.detection_order(_frozen(indices, np.int64), self.pulses)
            if not inside:
                raise InputError(f"detection indices: values must lie in [0, {self.pulses})")
        else:
            indices = as_index_array(indices, "detection indices", bound=self.pulses)
            increasing = indices.size < 2 or not np.logical_or.reduce(indices[1:] <= indices[:-1])
        bases = as_bits(self.bases, "detection bases")
        bits = as_bits(self.bits, "detection bits")
        if not indices.size == bases.size == bits.size:
            raise InputError(
                f"detection arrays differ in length: indices {indices.size}, bases {bases.size}, "
                f"bits {bits.size}"
            )
        if not increasing:
            raise InputError("detection indices must be strictly increasing")
        if self.double_clicks is not None and np.asarray(self.double_clicks).shape != indices.shape:
            raise InputError("double_clicks must have one flag per detection")
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "bases", bases)
        object.__setattr__(self, "bits", bits)

    @functools.cached_property
    def encoded_indices(self) -> tuple[Literal["bitmap", "gaps"], bytes]:
        """The indices as Bob announces them (:func:`encode_indices`), computed once. A backend may ask
        for it ahead of time, e.g. where it records the next frame, to take it off the round's path."""
        return encode_indices(self.indices, self.pulses)


def resolve_double_clicks(detections: Detections, source: RandomSource) -> Detections:
    """Replace the bit of every double click by a uniformly random bit."""
    if detections.double_clicks is None:
        return detections
    flags = np.asarray(detections.double_clicks, dtype=bool)
    bits = detections.bits.copy()
    bits[flags] = random_bits(source, int(flags.sum()))
    # the same validated detections with other bits (still 0 or 1): a copy, not a second validation of
    # millions of indices on Bob's critical path; an encoding of the indices made ahead comes along
    resolved = copy.copy(detections)
    object.__setattr__(resolved, "bits", bits)
    object.__setattr__(resolved, "double_clicks", None)
    return resolved


@dataclass(frozen=True, slots=True)
class SiftAnnounce:
    """Bob → Alice: which pulses Bob detected and the basis of each."""

    pulses: int
    detections: int
    encoding: Literal["bitmap", "gaps"]
    indices: bytes
    bases: bytes

    @property
    def wire_bytes(self) -> int:
        return len(self.indices) + len(self.bases)


@dataclass(frozen=True, slots=True)
class SiftAnswer:
    """Alice → Bob: basis match per detection; intensity class (2 bits) per match."""

    matches: bytes
    intensities: bytes

    @property
    def wire_bytes(self) -> int:
        return len(self.matches) + len(self.intensities)


@dataclass(frozen=True)
class SiftedKey:
    """One side's sifted key: bits in detection order with their basis and intensity class."""

    bits: Bits
    bases: Bits
    intensities: npt.NDArray[np.uint8]
    pulse_indices: npt.NDArray[np.int64]

    @functools.cached_property
    def z_mask(self) -> npt.NDArray[np.bool_]:
        """Which sifted bits are Z bits (computed once: every stage asks for it; read-only)."""
        mask: npt.NDArray[np.bool_] = self.bases == Z
        mask.flags.writeable = False
        return mask

    @functools.cached_property
    def _by_basis(self) -> dict[int, Bits]:
        return {}

    @functools.cached_property
    def z_classes(self) -> npt.NDArray[np.uint8]:
        """The intensity class of each sifted Z bit (computed once; read-only)."""
        classes: npt.NDArray[np.uint8] = self.intensities[self.z_mask]
        classes.flags.writeable = False
        return classes

    @functools.cached_property
    def z_class_counts(self) -> tuple[int, ...]:
        """How many sifted Z bits each intensity class has (index: class, for every possible class),
        counted in one pass (:func:`~qkdd.stages._sifting_kernels.z_class_counts`): this is on the
        round's critical path."""
        return _kernels.z_class_counts(_frozen(self.bases, np.uint8), _frozen(self.intensities, np.uint8))

    def select(self, basis: int, intensity: int | None = None) -> Bits:
        """The sifted bits of one basis (and, optionally, one intensity class). A whole basis is
        selected once and kept (read-only): estimation and the key cut ask for each more than once."""
        if intensity is None and basis in self._by_basis:
            return self._by_basis[basis]
        keep: npt.NDArray[np.bool_] = self.z_mask if basis == Z else ~self.z_mask
        if intensity is not None:
            keep = keep & (self.intensities == intensity)
        selected: Bits = self.bits[keep]
        if intensity is None:
            selected.flags.writeable = False
            self._by_basis[basis] = selected
        return selected

    def counts(self) -> dict[tuple[int, int], int]:
        """Number of sifted bits per (basis, intensity class)."""
        combined = self.bases.astype(np.int64) * MAX_INTENSITY_CLASSES + self.intensities
        tally = np.bincount(combined, minlength=2 * MAX_INTENSITY_CLASSES)
        return {
            (b, c): int(tally[b * MAX_INTENSITY_CLASSES + c])
            for b in (Z, X)
            for c in range(MAX_INTENSITY_CLASSES)
        }


def encode_indices(indices: npt.NDArray[np.int64], pulses: int) -> tuple[Literal["bitmap", "gaps"], bytes]:
    """The smaller of the bitmap and varint-gap encodings of strictly increasing indices (the gaps on a
    tie), as :func:`encode_indices_numpy` gives them: the gaps are built until they outgrow the bitmap.

    Raises:
        InputError: an index outside ``[0, pulses)``.
    """
    frozen = _frozen(indices, np.int64)
    limit = (pulses + 7) // 8
    gaps = np.empty(min(limit, 10 * frozen.size) + _VARINT_MAX_BYTES, dtype=np.uint8)
    size = _kernels.encode_gaps(frozen, limit, gaps)
    if size <= limit:
        return "gaps", gaps[:size].tobytes()
    bitmap = np.zeros(limit, dtype=np.uint8)
    if _kernels.pack_bitmap(frozen, bitmap) != _OK:
        raise InputError(f"detection indices: values must lie in [0, {pulses})")
    return "bitmap", bitmap.tobytes()


def decode_indices(message: SiftAnnounce) -> npt.NDArray[np.int64]:
    """Alice's side: the detection indices, validated against the frame (§3) as
    :func:`decode_indices_numpy` validates them, with the same errors.

    Raises:
        RemoteProtocolError: inconsistent count, out-of-frame index, unknown encoding, bad padding,
            truncated, trailing, overlong or over-64-bit varints.
    """
    _check_counts(message)
    if message.encoding == "bitmap":
        bitmap = check_packed(message.indices, message.pulses, "sift bitmap")
        if _kernels.popcount(bitmap) != message.detections:
            raise RemoteProtocolError("sift: bitmap population differs from the detection count")
        indices = np.empty(message.detections + 8, dtype=np.int64)
        _kernels.bitmap_indices(bitmap, indices)
        return indices[: message.detections]
    # the kernel takes frames up to 2^62 pulses and counts the bytes can hold (a varint takes a byte at
    # least; the peer's count is not allocated before that check); the numpy decoder refuses the others
    if (
        message.encoding == "gaps"
        and message.pulses <= _KERNEL_MAX_PULSES
        and message.detections <= len(message.indices)
    ):
        indices = np.empty(message.detections, dtype=np.int64)
        raw = np.frombuffer(message.indices, dtype=np.uint8)
        if _kernels.decode_gaps(raw, message.pulses, indices) != _OK:
            # the numpy decoder names the rule broken (the same one, or the one it checks first)
            decode_indices_numpy(message)
            raise RemoteProtocolError("sift: malformed detection gaps")  # not reached: both refuse
        return indices
    return decode_indices_numpy(message)


def _check_counts(message: SiftAnnounce) -> None:
    """The announced frame and detection counts fit each other and the largest frame (§3)."""
    if not 0 < message.pulses <= MAX_FRAME_PULSES or not 0 <= message.detections <= message.pulses:
        raise RemoteProtocolError("sift: pulse or detection count out of range")


def bob_announce(detections: Detections) -> SiftAnnounce:
    """Bob's first message of a frame."""
    if detections.double_clicks is not None:
        raise InputError("resolve double clicks (resolve_double_clicks) before sifting")
    encoding, payload = detections.encoded_indices
    return SiftAnnounce(
        detections.pulses, int(detections.indices.size), encoding, payload, pack_bits(detections.bases)
    )


def alice_answer(
    preparation: Preparation, announce: SiftAnnounce, *, pulse_indices: bool = True
) -> tuple[SiftAnswer, SiftedKey]:
    """Alice's answer, and her sifted key, in two passes over the detections
    (:mod:`~qkdd.stages._sifting_kernels`' ``alice_matches`` and ``alice_gather``);
    :func:`alice_answer_numpy` is the reference. Without ``pulse_indices`` the key's
    :attr:`~SiftedKey.pulse_indices` are left empty (see :data:`NO_PULSE_INDICES`).

    Raises:
        RemoteProtocolError: the announcement does not fit the frame Alice prepared.
        InputError: the preparation answered with arrays of another length than the detections.
    """
    if announce.pulses != preparation.pulses:
        raise RemoteProtocolError(
            f"sift: Bob's frame has {announce.pulses} pulses, Alice's {preparation.pulses}"
        )
    indices = decode_indices(announce)
    bob_bases = check_packed(announce.bases, announce.detections, "sift bases")
    bits, bases, classes = preparation.at(indices)
    if not bits.size == bases.size == classes.size == indices.size:
        raise InputError(
            f"preparation gave {bits.size} bits, {bases.size} bases and {classes.size} intensity "
            f"classes for {indices.size} pulses"
        )
    bases = _frozen(bases, np.uint8)
    matches = np.empty((bases.size + 7) // 8, dtype=np.uint8)
    kept = _kernels.alice_matches(bob_bases, bases, matches)
    kept_bits, kept_bases, kept_classes = (np.empty(kept + slack, dtype=np.uint8) for slack in (1, 1, 4))
    kept_indices = np.empty(kept + 1 if pulse_indices else 0, dtype=np.int64)
    packed_classes = np.empty((2 * kept + 7) // 8, dtype=np.uint8)
    _kernels.alice_gather(
        matches,
        _frozen(bits, np.uint8),
        bases,
        _frozen(classes, np.uint8),
        _frozen(indices, np.int64),
        kept_bits,
        kept_bases,
        kept_classes,
        kept_indices,
        packed_classes,
        pulse_indices,
    )
    answer = SiftAnswer(matches.tobytes(), packed_classes.tobytes())
    kept_pulses = kept_indices[:kept] if pulse_indices else NO_PULSE_INDICES
    return answer, SiftedKey(kept_bits[:kept], kept_bases[:kept], kept_classes[:kept], kept_pulses)


def bob_sift(detections: Detections, answer: SiftAnswer, *, pulse_indices: bool = True) -> SiftedKey:
    """Bob's sifted key from Alice's answer, in one pass over the detections
    (:func:`~qkdd.stages._sifting_kernels.bob_gather`); :func:`bob_sift_numpy` is the reference.
    Without ``pulse_indices`` the key's :attr:`~SiftedKey.pulse_indices` are left empty.

    Raises:
        RemoteProtocolError: the answer's lengths or padding do not fit Bob's detections.
    """
    matches = check_packed(answer.matches, int(detections.indices.size), "sift matches")
    kept = _kernels.popcount(matches)
    packed_classes = check_packed(answer.intensities, 2 * kept, "sift intensity classes")
    kept_bits, kept_bases = np.empty(kept + 1, dtype=np.uint8), np.empty(kept + 1, dtype=np.uint8)
    kept_classes = np.empty(kept, dtype=np.uint8)
    kept_indices = np.empty(kept + 1 if pulse_indices else 0, dtype=np.int64)
    _kernels.bob_gather(
        matches,
        packed_classes,
        _frozen(detections.bits, np.uint8),
        _frozen(detections.bases, np.uint8),
        _frozen(detections.indices, np.int64),
        kept_bits,
        kept_bases,
        kept_classes,
        kept_indices,
        pulse_indices,
    )
    kept_pulses = kept_indices[:kept] if pulse_indices else NO_PULSE_INDICES
    return SiftedKey(kept_bits[:kept], kept_bases[:kept], kept_classes, kept_pulses)


_warmed_up = False


def warm_up() -> None:
    """Import numba and load every sifting kernel (compiling it on the first run after an install), so
    that the first round does not pay for it: sifts a small frame announced as gaps and one announced as
    a bitmap, with the array types a round passes. Later calls return at once; safe on another thread."""
    global _warmed_up  # noqa: PLW0603
    if _warmed_up:
        return
    rng = np.random.default_rng(0)
    for pulses, detected in ((1000, 10), (16, 12)):  # gaps, then a bitmap
        indices = np.sort(rng.choice(pulses, detected, replace=False)).astype(np.int64)
        preparation = FramePreparation(
            rng.integers(0, 2, pulses, dtype=np.uint8),
            rng.integers(0, 2, pulses, dtype=np.uint8),
            rng.integers(0, 3, pulses, dtype=np.uint8),
        )
        detections = Detections(
            pulses, indices, preparation.bases[indices].copy(), rng.integers(0, 2, detected, dtype=np.uint8)
        )
        answer, alice = alice_answer(preparation, bob_announce(detections))
        _ = bob_sift(detections, answer).z_class_counts, alice.z_class_counts
    _warmed_up = True


_OK = 0  # a kernel's status for valid input (qkdd.stages._sifting_kernels.OK, without importing numba)
_VARINT_MAX_BYTES = 10  # ..._sifting_kernels.VARINT_MAX_BYTES
_KERNEL_MAX_PULSES = 1 << 62  # the gap decoder's running index cannot overflow up to this frame size


def _frozen(values: npt.ArrayLike, dtype: type[np.generic]) -> npt.NDArray[Any]:
    """``values`` as a read-only C-contiguous array of ``dtype`` (a view where it already is one): the
    kernels then see one array type per argument, the one :func:`warm_up` loads, whichever arrays a
    backend hands over (numba compiles a writable and a read-only array type separately)."""
    array = np.ascontiguousarray(values, dtype=dtype).view()
    array.flags.writeable = False
    return array


# ------------------------------------------------------------------------------- numpy references
# The code the kernels replaced: the tests hold the kernels to it bit for bit, and a refused
# announcement is decoded again here for the error to raise.


def encode_indices_numpy(
    indices: npt.NDArray[np.int64], pulses: int
) -> tuple[Literal["bitmap", "gaps"], bytes]:
    """:func:`encode_indices` in numpy."""
    gaps = np.empty_like(indices)  # index minus previous index minus 1 (the first: the index itself)
    gaps[:1] = indices[:1]
    np.subtract(indices[1:], indices[:-1], out=gaps[1:])
    gaps[1:] -= 1
    gap_bytes = encode_varints(gaps.view(np.uint64))  # all >= 0: read as unsigned in place, not copied
    if len(gap_bytes) <= (pulses + 7) // 8:
        return "gaps", gap_bytes
    bitmap = np.zeros(pulses, dtype=np.uint8)
    bitmap[indices] = 1
    return "bitmap", pack_bits(bitmap)


def decode_indices_numpy(message: SiftAnnounce) -> npt.NDArray[np.int64]:
    """:func:`decode_indices` in numpy.

    Raises:
        RemoteProtocolError: inconsistent count, out-of-frame index, unknown encoding, bad padding,
            truncated, trailing, overlong or over-64-bit varints.
    """
    _check_counts(message)
    if message.encoding == "bitmap":
        bitmap = unpack_bits(message.indices, message.pulses, "sift bitmap")
        indices = np.flatnonzero(bitmap.view(np.bool_)).astype(np.int64)  # 0/1 bytes read as booleans
        if indices.size != message.detections:
            raise RemoteProtocolError("sift: bitmap population differs from the detection count")
        return indices
    if message.encoding == "gaps":
        gaps = decode_varints(message.indices, message.detections, "sift gaps")
        # the last index is the sum of (gap + 1), less 1: it lies in the frame iff that sum is at most the
        # frame size. With every gap below the frame size, the 64-bit running sum cannot overflow while
        # count · frame size stays below 2^62 (every real frame): then the last index tells. Otherwise the
        # sum is taken in floats first (exact below 2^53, so for every sum that can fit), so that gaps that
        # each fit but together overflow 64 bits are refused too
        if gaps.size and (
            gaps.max() >= message.pulses
            or (
                gaps.size * message.pulses >= 1 << 62
                and float(gaps.sum(dtype=np.float64)) + gaps.size > message.pulses
            )
        ):
            raise RemoteProtocolError("sift: detection index outside the frame")
        indices = gaps.view(np.int64)  # in place: every gap is below the frame size, far below 2^63
        indices += 1
        np.cumsum(indices, out=indices)
        indices -= 1
        if indices.size and indices[-1] >= message.pulses:
            raise RemoteProtocolError("sift: detection index outside the frame")
        return indices
    raise RemoteProtocolError(f"sift: unknown index encoding {message.encoding!r}")


def alice_answer_numpy(preparation: Preparation, announce: SiftAnnounce) -> tuple[SiftAnswer, SiftedKey]:
    """:func:`alice_answer` in numpy."""
    if announce.pulses != preparation.pulses:
        raise RemoteProtocolError(
            f"sift: Bob's frame has {announce.pulses} pulses, Alice's {preparation.pulses}"
        )
    indices = decode_indices_numpy(announce)
    bob_bases = unpack_bits(announce.bases, announce.detections, "sift bases")
    bits, bases, classes = preparation.at(indices)
    matches = bases == bob_bases
    keep = np.flatnonzero(matches)  # one pass over the mask, then four gathers
    kept_classes = classes[keep].astype(np.uint8)
    answer = SiftAnswer(pack_bits(matches.view(np.uint8)), _pack_classes(kept_classes))
    return answer, SiftedKey(bits[keep], bases[keep], kept_classes, indices[keep])


def bob_sift_numpy(detections: Detections, answer: SiftAnswer) -> SiftedKey:
    """:func:`bob_sift` in numpy."""
    # read as booleans (the bits are 0 or 1): numpy finds the set ones about seven times faster in a bool
    # array than in a uint8 one
    matches = np.flatnonzero(
        unpack_bits(answer.matches, int(detections.indices.size), "sift matches").view(np.bool_)
    )
    classes = _unpack_classes(answer.intensities, int(matches.size))
    return SiftedKey(
        detections.bits[matches], detections.bases[matches], classes, detections.indices[matches]
    )


def _pack_classes(classes: npt.NDArray[np.uint8]) -> bytes:
    pairs = np.stack([(classes >> 1) & 1, classes & 1], axis=1).reshape(-1)
    return pack_bits(pairs.astype(np.uint8))


def _unpack_classes(data: bytes, count: int) -> npt.NDArray[np.uint8]:
    pairs = unpack_bits(data, 2 * count, "sift intensity classes").reshape(-1, 2)
    return (pairs[:, 0] * 2 + pairs[:, 1]).astype(np.uint8)
