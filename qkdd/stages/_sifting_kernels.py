"""Compiled loops behind sifting (:mod:`qkdd.stages.sifting`, protocol/qkdp-v2.md §3).

Each kernel answers exactly what the numpy code it replaces answers (``tests/stages/test_sifting.py``
checks them against those references, kept in :mod:`qkdd.stages.sifting`): numpy needs a pass over the
detections per step (differences, masks, gathers, bit packing), and these do each side's work in one or
two passes. Every function is module level and cached on disk (``cache=True``), so a daemon loads the
machine code numba compiled on an earlier run; ``nogil=True`` lets the other threads of a daemon run
while one sifts.

The callers pass only C-contiguous arrays of the dtypes named here, read-only where they come from the
peer's bytes, and check lengths and padding first: numba does not check bounds. A kernel that meets
input it refuses returns a non-zero status instead of raising, and the caller raises the same error the
numpy reference raises.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit

Bits = npt.NDArray[np.uint8]
Bytes = npt.NDArray[np.uint8]
Int64s = npt.NDArray[np.int64]

OK = 0
"""Status: the input was valid."""
REFUSED = 1
"""Status: the input breaks a rule (the caller finds which, with the numpy reference)."""

_LOW7 = np.uint64(0x7F)
_SEVEN = np.uint64(7)


@njit(cache=True, nogil=True)
def encode_gaps(indices: Int64s, limit: int) -> tuple[Bytes, int]:
    """The LEB128 varint gaps of ``indices`` (``g[0] = i[0]``, ``g[k] = i[k] − i[k−1] − 1``, each read as
    an unsigned 64-bit value, as the numpy encoder reads them) and their size, if that is at most
    ``limit`` bytes; else a size above ``limit`` and an unfinished buffer (the bitmap is smaller). Pages
    of the buffer past what is written are never touched, so its size costs nothing."""
    out = np.empty(min(limit, 10 * indices.size) + 10, dtype=np.uint8)
    at = 0
    previous = np.int64(-1)
    for i in range(indices.size):
        if at > limit:
            return out, at
        gap = np.uint64(indices[i] - previous - 1)
        previous = indices[i]
        while gap >= 0x80:
            out[at] = np.uint8((gap & _LOW7) | 0x80)
            gap >>= _SEVEN
            at += 1
        out[at] = np.uint8(gap)
        at += 1
    return out[:at], at


@njit(cache=True, nogil=True)
def pack_bitmap(indices: Int64s, pulses: int) -> tuple[Bytes, int]:
    """The frame's bitmap of ``indices``, packed MSB first; status :data:`REFUSED` if an index lies
    outside ``[0, pulses)`` (the bitmap is then incomplete)."""
    out = np.zeros((pulses + 7) // 8, dtype=np.uint8)
    for i in range(indices.size):
        index = indices[i]
        if index < 0 or index >= pulses:
            return out, REFUSED
        out[index >> 3] |= np.uint8(0x80 >> (index & 7))
    return out, OK


@njit(cache=True, nogil=True)
def decode_gaps(raw: Bytes, count: int, pulses: int) -> tuple[Int64s, int]:
    """Exactly ``count`` canonical varint gaps filling ``raw``, as pulse indices; status
    :data:`REFUSED` on a truncated, trailing, overlong or over-64-bit varint, a count other than
    ``count``, or an index outside ``[0, pulses)`` (``0 < pulses <= 2^62``: below that no sum of an
    index and a gap that is itself inside the frame overflows)."""
    if count > raw.size:  # every varint takes a byte at least: refused before the peer's count is allocated
        return np.empty(0, dtype=np.int64), REFUSED
    out = np.empty(count, dtype=np.int64)
    limit = np.uint64(pulses)
    at = 0
    size = raw.size
    next_index = np.int64(0)  # the previous index + 1: where a gap of 0 lands
    for k in range(count):
        if at == size:
            return out, REFUSED  # too few varints
        byte = raw[at]
        at += 1
        gap = np.uint64(byte & 0x7F)
        if byte >= 0x80:
            shift = np.uint64(7)
            while True:
                if at == size:
                    return out, REFUSED  # truncated
                byte = raw[at]
                at += 1
                if shift == 63 and byte > 1:
                    return out, REFUSED  # over 64 bits, or longer than 10 bytes
                gap |= np.uint64(byte & 0x7F) << shift
                shift += _SEVEN
                if byte < 0x80:
                    break
            if byte == 0:
                return out, REFUSED  # overlong: a zero group at the top
        if gap >= limit:
            return out, REFUSED
        index = next_index + np.int64(gap)
        if index >= pulses:
            return out, REFUSED
        out[k] = index
        next_index = index + 1
    if at != size:
        return out, REFUSED  # trailing bytes
    return out, OK


@njit(cache=True, nogil=True)
def bitmap_indices(bitmap: Bytes, detections: int) -> tuple[Int64s, int]:
    """The set bits of a packed (MSB first) bitmap as indices; status :data:`REFUSED` if there are not
    exactly ``detections`` of them."""
    if popcount(bitmap) != detections:
        return np.empty(0, dtype=np.int64), REFUSED
    out = np.empty(detections + 8, dtype=np.int64)  # slack for the stores after the last set bit
    k = 0
    for byte_index in range(bitmap.size):
        byte = bitmap[byte_index]
        if byte == 0:  # runs of empty bytes are common in a sparse frame: skipped, not stored
            continue
        for bit in range(8):
            out[k] = byte_index * 8 + bit
            k += (byte >> (7 - bit)) & 1
    return out[:detections], OK


@njit(cache=True, nogil=True)
def _bit_count(byte: int) -> int:
    byte = (byte & 0x55) + ((byte >> 1) & 0x55)
    byte = (byte & 0x33) + ((byte >> 2) & 0x33)
    return (byte & 0x0F) + (byte >> 4)


@njit(cache=True, nogil=True)
def popcount(packed: Bytes) -> int:
    """Set bits in ``packed``."""
    total = 0
    for i in range(packed.size):
        total += _bit_count(packed[i])
    return total


# The gathers below write every element and advance the output position by the match flag, instead of
# branching on it: matches are random (four in five), and a mispredicted branch costs more than a store.
# Their buffers hold one slack element (and byte) for the store after the last match.


@njit(cache=True, nogil=True)
def alice_sift(
    bob_bases: Bytes, bits: Bits, bases: Bits, classes: Bits, indices: Int64s
) -> tuple[Bytes, Bytes, Bits, Bits, Bits, Int64s]:
    """Alice's side of a frame, from Bob's packed bases and her ``bits``, ``bases`` and intensity
    ``classes`` at his detections ``indices``: (packed match flags, kept classes packed two bits each,
    then the kept bits, bases, classes and indices)."""
    n = indices.size
    full = n // 8
    matches = np.empty((n + 7) // 8, dtype=np.uint8)
    kept = 0
    for j in range(matches.size):
        flags = 0xFF ^ bob_bases[j]  # a match flag per bit: 1 where the bases agree (Alice's Z = 0, X = 1)
        if j < full:
            for t in range(8):
                flags ^= bases[8 * j + t] << (7 - t)
        else:  # the last, partial byte: zero padding after the last detection
            for t in range(n - 8 * j):
                flags ^= bases[8 * j + t] << (7 - t)
            flags &= 0xFF << (8 - (n - 8 * j))
        matches[j] = flags
        kept += _bit_count(flags)
    kept_bits = np.empty(kept + 1, dtype=np.uint8)
    kept_bases = np.empty(kept + 1, dtype=np.uint8)
    kept_classes = np.empty(kept + 4, dtype=np.uint8)
    kept_indices = np.empty(kept + 1, dtype=np.int64)
    k = 0
    for i in range(n):
        kept_bits[k] = bits[i]
        kept_bases[k] = bases[i]
        kept_classes[k] = classes[i]
        kept_indices[k] = indices[i]
        k += (matches[i >> 3] >> (7 - (i & 7))) & 1
    kept_classes[kept:] = 0  # the packing's padding (and over the store after the last match)
    # four classes to a byte, each byte written once (or-ing into bytes as the classes come chains each
    # byte's store to the next load)
    packed_classes = np.empty((2 * kept + 7) // 8, dtype=np.uint8)
    for b in range(packed_classes.size):
        packed_classes[b] = (
            ((kept_classes[4 * b] & 3) << 6)
            | ((kept_classes[4 * b + 1] & 3) << 4)
            | ((kept_classes[4 * b + 2] & 3) << 2)
            | (kept_classes[4 * b + 3] & 3)
        )
    return (
        matches,
        packed_classes,
        kept_bits[:kept],
        kept_bases[:kept],
        kept_classes[:kept],
        kept_indices[:kept],
    )


@njit(cache=True, nogil=True)
def bob_sift(
    matches: Bytes, packed_classes: Bytes, kept: int, bits: Bits, bases: Bits, indices: Int64s
) -> tuple[Bits, Bits, Bits, Int64s]:
    """Bob's sifted key: his ``bits``, ``bases`` and ``indices`` where Alice's packed ``matches`` flag
    a match (``kept`` of them, :func:`popcount`), with the classes she sent packed two bits each."""
    kept_bits = np.empty(kept + 1, dtype=np.uint8)
    kept_bases = np.empty(kept + 1, dtype=np.uint8)
    kept_indices = np.empty(kept + 1, dtype=np.int64)
    k = 0
    for i in range(indices.size):
        match = (matches[i >> 3] >> (7 - (i & 7))) & 1
        kept_bits[k] = bits[i]
        kept_bases[k] = bases[i]
        kept_indices[k] = indices[i]
        k += match
    kept_classes = np.empty(kept, dtype=np.uint8)
    for k in range(kept):
        kept_classes[k] = (packed_classes[k >> 2] >> (6 - 2 * (k & 3))) & 3
    return kept_bits[:kept], kept_bases[:kept], kept_classes, kept_indices[:kept]


@njit(cache=True, nogil=True)
def z_class_counts(bases: Bits, classes: Bits) -> Int64s:
    """How many of the bits with basis Z (0) each intensity class 0 to 3 has."""
    counts = np.zeros(4, dtype=np.int64)
    # four running sums in registers: incrementing counts[classes[i]] in memory chains each store to
    # the load of the next (most bits share a class)
    c0 = c1 = c2 = c3 = 0
    for i in range(bases.size):
        z = bases[i] == 0
        c = classes[i]
        c0 += z & (c == 0)
        c1 += z & (c == 1)
        c2 += z & (c == 2)
        c3 += z & (c == 3)
    counts[0], counts[1], counts[2], counts[3] = c0, c1, c2, c3
    return counts


@njit(cache=True, nogil=True)
def detection_order(indices: Int64s, pulses: int) -> tuple[bool, bool]:
    """(every index lies in ``[0, pulses)``, the indices strictly increase)."""
    if indices.size == 0:
        return True, True
    inside = True
    increasing = True
    previous = indices[0] - 1
    for i in range(indices.size):
        index = indices[i]
        inside &= (index >= 0) & (index < pulses)
        increasing &= index > previous
        previous = index
    return inside, increasing
