"""Compiled loops behind Cascade's range parities (:mod:`qkdd.stages.cascade`).

Each kernel is a pure function of its arrays and answers exactly what the numpy code it replaces
answers (``tests/stages/test_cascade_kernels.py`` checks them against plain references): a search's
later levels ask a few ranges at a time, where numpy's per-call overhead costs more than the work, and
one loop replaces a dozen array operations.

A bit string's range parities are kept as in :class:`~qkdd.stages.cascade.RangeParity`: packed 64-bit
words (bit 0 of the string is the most significant bit of word 0), ``before[w]`` the parity of the words
before w as last counted, and ``pending`` the sorted words flipped since then, so the parity of bits
``[0, t)`` is ``before[t >> 6]``, XOR the first ``t & 63`` bits of word ``t >> 6``, XOR the number of
pending words below ``t >> 6``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit

Bits = npt.NDArray[np.uint8]
Words = npt.NDArray[np.uint64]
Int64s = npt.NDArray[np.int64]
Positions = npt.NDArray[np.int64] | npt.NDArray[np.uint32]  # Bob's bounds, and those of his requests


# The loops below are written out in full: calling a helper per bound (even one numba inlines) kept
# LLVM from optimising the loop, 8x slower per range when measured.


@njit(cache=True)
def range_parities(words: Words, before: Bits, pending: Int64s, starts: Positions, ends: Positions) -> Bits:
    """The parity of bits ``[starts[i], ends[i])`` for each i (every bound in ``[0, 64·words.size)``)."""
    out = np.empty(starts.size, dtype=np.uint8)
    for i in range(starts.size):
        parity = 0
        for bound in (starts[i], ends[i]):
            word = bound >> 6
            used = bound & 63
            parity ^= before[word]
            if used:
                # fold the word's first ``used`` bits onto a nibble, whose parity 0x6996 tabulates
                folded = words[word] >> np.uint64(64 - used)
                folded ^= folded >> np.uint64(32)
                folded ^= folded >> np.uint64(16)
                folded ^= folded >> np.uint64(8)
                folded ^= folded >> np.uint64(4)
                parity ^= (0x6996 >> np.int64(folded & np.uint64(15))) & 1
            # pending flips in earlier words: a binary search for how many lie below ``word``
            lo, hi = 0, pending.size
            while lo < hi:
                mid = (lo + hi) >> 1
                if pending[mid] < word:
                    lo = mid + 1
                else:
                    hi = mid
            parity ^= lo
        out[i] = parity & 1
    return out


@njit(cache=True)
def selected_range_parities(
    words: Words,
    before: Bits,
    pending: Int64s,
    packed: Bits,
    byte_before: Int64s,
    select8: Int64s,
    starts: Positions,
    ends: Positions,
) -> Bits:
    """:func:`range_parities` of ``[select(starts[i]), select(ends[i]))``, where ``select(r)`` is the
    position of the r-th set bit (0-based) of ``packed`` (``byte_before[b]``: the set bits before byte
    b, ascending; ``select8[v, k]``: the bit of byte v holding its k-th set bit)."""
    out = np.empty(starts.size, dtype=np.uint8)
    for i in range(starts.size):
        parity = 0
        for rank in (starts[i], ends[i]):
            # the last byte with at most ``rank`` set bits before it holds the rank-th set bit
            lo, hi = 0, byte_before.size
            while lo < hi:
                mid = (lo + hi) >> 1
                if byte_before[mid] <= rank:
                    lo = mid + 1
                else:
                    hi = mid
            byte = lo - 1
            bound = (byte << 3) + select8[packed[byte], rank - byte_before[byte]]
            word = bound >> 6
            used = bound & 63
            parity ^= before[word]
            if used:
                folded = words[word] >> np.uint64(64 - used)
                folded ^= folded >> np.uint64(32)
                folded ^= folded >> np.uint64(16)
                folded ^= folded >> np.uint64(8)
                folded ^= folded >> np.uint64(4)
                parity ^= (0x6996 >> np.int64(folded & np.uint64(15))) & 1
            lo, hi = 0, pending.size
            while lo < hi:
                mid = (lo + hi) >> 1
                if pending[mid] < word:
                    lo = mid + 1
                else:
                    hi = mid
            parity ^= lo
        out[i] = parity & 1
    return out


@njit(cache=True)
def strided_gather(bits: Bits, step: int, offset: int) -> Bits:
    """``bits`` (one bit per byte) in the order of an affine pass, packed MSB-first: pass position t holds
    key index ``(t - offset) · step mod n``, ``step`` the inverse of the pass's multiplier. One walk
    adding ``step`` modulo n, straight into packed bytes; with the small steps Bob picks on large
    frames the reads stride through ``bits`` and the prefetcher keeps up."""
    n = bits.size
    out = np.zeros((n + 7) >> 3, dtype=np.uint8)
    index = (n - offset) % n * step % n
    full = n >> 3
    for byte in range(full):
        value = 0
        for _ in range(8):
            value = (value << 1) | bits[index]
            index += step
            if index >= n:
                index -= n
        out[byte] = value
    tail = n & 7
    if tail:
        value = 0
        for _ in range(tail):
            value = (value << 1) | bits[index]
            index += step
            if index >= n:
                index -= n
        out[full] = value << (8 - tail)
    return out
