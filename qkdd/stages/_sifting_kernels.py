"""Compiled loops behind sifting (:mod:`qkdd.stages.sifting`, protocol/qkdp-v2.md §3).

Each kernel answers exactly what the numpy code it replaces answers (``tests/stages/test_sifting.py``
checks them against those references, kept in :mod:`qkdd.stages.sifting`): numpy needs a pass over the
detections per step (differences, masks, gathers, bit packing), and these do each side's work in one or
two passes. Every function is module level and cached on disk (``cache=True``), so a daemon loads the
machine code numba compiled on an earlier run; ``nogil=True`` lets the other threads of a daemon run
while one sifts.

The callers allocate the outputs (``out`` and ``kept_*`` arguments) with numpy, which asks the kernel
for huge pages on large arrays: a round's outputs are tens of megabytes of fresh memory, and numba's
own allocations fault them in 4 KiB at a time, about three times the cost. Some outputs hold one slack
element past the last kept one (said where), for a store that a loop makes unconditionally.

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

VARINT_MAX_BYTES = 10
"""The longest varint (a 64-bit value): how far one varint may write past a limit."""

_LOW7 = np.uint64(0x7F)
_SEVEN = np.uint64(7)


@njit(cache=True, nogil=True)
def encode_gaps(indices: Int64s, limit: int, out: Bytes) -> int:
    """Write the LEB128 varint gaps of ``indices`` (``g[0] = i[0]``, ``g[k] = i[k] − i[k−1] − 1``, each
    read as an unsigned 64-bit value, as the numpy encoder reads them) into ``out`` and return their
    size, if that is at most ``limit`` bytes; else stop there and return a size above ``limit`` (the
    bitmap is smaller). ``out`` holds ``min(limit, 10 · indices.size) + 10`` bytes; the pages of it
    that are never written are never touched."""
    at = 0
    previous = np.int64(-1)
    for i in range(indices.size):
        if at > limit:
            return at
        gap = np.uint64(indices[i] - previous - 1)
        previous = indices[i]
        while gap >= 0x80:
            out[at] = np.uint8((gap & _LOW7) | 0x80)
            gap >>= _SEVEN
            at += 1
        out[at] = np.uint8(gap)
        at += 1
    return at


@njit(cache=True, nogil=True)
def pack_bitmap(indices: Int64s, out: Bytes) -> int:
    """Set the bits of ``indices`` in ``out``, a zeroed bitmap of ``8 · out.size`` pulses packed MSB
    first; status :data:`REFUSED` if an index lies outside it (the bitmap is then incomplete)."""
    pulses = 8 * out.size
    for i in range(indices.size):
        index = indices[i]
        if index < 0 or index >= pulses:
            return REFUSED
        out[index >> 3] |= np.uint8(0x80 >> (index & 7))
    return OK


@njit(cache=True, nogil=True)
def decode_gaps(raw: Bytes, pulses: int, out: Int64s) -> int:
    """Decode exactly ``out.size`` canonical varint gaps filling ``raw`` into pulse indices in ``out``;
    status :data:`REFUSED` on a truncated, trailing, overlong or over-64-bit varint, a count other than
    ``out.size``, or an index outside ``[0, pulses)`` (``0 < pulses <= 2^62``: below that no sum of an
    index and a gap that is itself inside the frame overflows)."""
    limit = np.uint64(pulses)
    at = 0
    size = raw.size
    next_index = np.int64(0)  # the previous index + 1: where a gap of 0 lands
    for k in range(out.size):
        if at == size:
            return REFUSED  # too few varints
        byte = raw[at]
        at += 1
        gap = np.uint64(byte & 0x7F)
        if byte >= 0x80:
            shift = np.uint64(7)
            while True:
                if at == size:
                    return REFUSED  # truncated
                byte = raw[at]
                at += 1
                if shift == 63 and byte > 1:
                    return REFUSED  # over 64 bits, or longer than 10 bytes
                gap |= np.uint64(byte & 0x7F) << shift
                shift += _SEVEN
                if byte < 0x80:
                    break
            if byte == 0:
                return REFUSED  # overlong: a zero group at the top
        if gap >= limit:
            return REFUSED
        index = next_index + np.int64(gap)
        if index >= pulses:
            return REFUSED
        out[k] = index
        next_index = index + 1
    if at != size:
        return REFUSED  # trailing bytes
    return OK


@njit(cache=True, nogil=True)
def bitmap_indices(bitmap: Bytes, out: Int64s) -> None:
    """Write the positions of the set bits of a packed (MSB first) bitmap into ``out``: as many as
    :func:`popcount` counts, and 8 slack elements."""
    k = 0
    for byte_index in range(bitmap.size):
        byte = bitmap[byte_index]
        if byte == 0:  # runs of empty bytes are common in a sparse frame: skipped, not stored
            continue
        for bit in range(8):
            out[k] = byte_index * 8 + bit
            k += (byte >> (7 - bit)) & 1


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


@njit(cache=True, nogil=True)
def alice_matches(bob_bases: Bytes, bases: Bits, out: Bytes) -> int:
    """Alice's match flags, packed into ``out``: 1 where her basis (``bases``, one per detection)
    equals Bob's (``bob_bases``, packed); returns how many."""
    n = bases.size
    full = n // 8
    kept = 0
    for j in range(out.size):
        flags = 0xFF ^ bob_bases[j]  # Z = 0, X = 1: a flag is 1 where the two bits agree
        if j < full:
            for t in range(8):
                flags ^= bases[8 * j + t] << (7 - t)
        else:  # the last, partial byte: zero padding after the last detection
            for t in range(n - 8 * j):
                flags ^= bases[8 * j + t] << (7 - t)
            flags &= 0xFF << (8 - (n - 8 * j))
        out[j] = flags
        kept += _bit_count(flags)
    return kept


@njit(cache=True, nogil=True)
def alice_gather(
    matches: Bytes,
    bits: Bits,
    bases: Bits,
    classes: Bits,
    indices: Int64s,
    kept_bits: Bits,
    kept_bases: Bits,
    kept_classes: Bits,
    kept_indices: Int64s,
    packed_classes: Bytes,
    with_indices: bool,
) -> None:
    """Alice's kept bits, bases, classes and (``with_indices``) indices where ``matches`` flags a match
    (each output one slack element long, ``kept_classes`` four), and the kept classes packed two bits
    each."""
    k = 0
    for i in range(indices.size):
        kept_bits[k] = bits[i]
        kept_bases[k] = bases[i]
        kept_classes[k] = classes[i]
        if with_indices:  # the same for every i: LLVM makes two loops of it
            kept_indices[k] = indices[i]
        k += (matches[i >> 3] >> (7 - (i & 7))) & 1
    kept_classes[k:] = 0  # the packing's padding (and over the store after the last match)
    # four classes to a byte, each byte written once (or-ing into bytes as the classes come chains each
    # byte's store to the next load)
    for b in range(packed_classes.size):
        packed_classes[b] = (
            ((kept_classes[4 * b] & 3) << 6)
            | ((kept_classes[4 * b + 1] & 3) << 4)
            | ((kept_classes[4 * b + 2] & 3) << 2)
            | (kept_classes[4 * b + 3] & 3)
        )


@njit(cache=True, nogil=True)
def bob_gather(
    matches: Bytes,
    packed_classes: Bytes,
    bits: Bits,
    bases: Bits,
    indices: Int64s,
    kept_bits: Bits,
    kept_bases: Bits,
    kept_classes: Bits,
    kept_indices: Int64s,
    with_indices: bool,
) -> None:
    """Bob's kept bits, bases and (``with_indices``) indices where Alice's packed ``matches`` flag a
    match (each output one slack element long), and the classes she sent packed two bits each
    (``kept_classes``, exact)."""
    k = 0
    for i in range(indices.size):
        kept_bits[k] = bits[i]
        kept_bases[k] = bases[i]
        if with_indices:
            kept_indices[k] = indices[i]
        k += (matches[i >> 3] >> (7 - (i & 7))) & 1
    for k in range(kept_classes.size):
        kept_classes[k] = (packed_classes[k >> 2] >> (6 - 2 * (k & 3))) & 3


@njit(cache=True, nogil=True)
def z_class_counts(bases: Bits, classes: Bits) -> tuple[int, int, int, int]:
    """How many of the bits with basis Z (0) each intensity class 0 to 3 has."""
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
    return c0, c1, c2, c3


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
