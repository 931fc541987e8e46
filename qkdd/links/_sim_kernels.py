"""Compiled loops behind the ``sim`` backend (:mod:`qkdd.links.sim`).

Every random choice of the simulator is *counter-based*: the 64-bit SplitMix64 finaliser (Steele, Lea &
Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014) of ``index·γ + offset``, where γ
is the golden-ratio increment and ``offset`` names the frame and the stream (Alice's preparation, Eve,
Bob's detector). A value therefore depends only on (seed, frame, stream, index): Alice's preparation
costs O(1) at any pulse, and Bob's detections come out of one pass over the detected pulses, with no
whole-frame or per-candidate temporary arrays. ``tests/links/test_sim.py`` checks both loops against a
plain-Python reference of the same model, value for value.

A uniform u = k·2^-24 is read from 24 bits of a hash (k in [0, 2^24)); "u < p" is then exactly
"k < ⌈p·2^24⌉" (:func:`qkdd.links.sim.threshold`).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from numba import njit

U64 = npt.NDArray[np.uint64]
Int64s = npt.NDArray[np.int64]
Bytes = npt.NDArray[np.uint8]
GapTable = tuple[U64, Int64s, np.uint64]  # thresholds, aliases, 64 − log2(size): qkdd.links.sim.gap_table

GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_S11, _S24, _S63 = np.uint64(11), np.uint64(24), np.uint64(63)
_MASK24 = np.uint64(0xFFFFFF)
_HALF = np.uint64(1 << 23)  # u < 1/2
_ONE = np.uint64(1)
_LOW32 = np.uint64(0xFFFFFFFF)
_TWO_TO_MINUS_53 = 2.0**-53


@njit(cache=True, nogil=True, inline="always")
def _mix(index: int, offset: np.uint64) -> np.uint64:
    """SplitMix64's finaliser of ``index·γ + offset`` (mod 2^64)."""
    x = np.uint64(index) * GAMMA + offset
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@njit(cache=True, nogil=True)
def hashes(indices: Int64s, offset: np.uint64) -> U64:
    """The hash of every index (tests: the reference's building block)."""
    out = np.empty(indices.size, dtype=np.uint64)
    for i in range(indices.size):
        out[i] = _mix(indices[i], offset)
    return out


@njit(cache=True, nogil=True)
def prepare(
    indices: Int64s, offset: np.uint64, class_edges: U64, z_edge: np.uint64
) -> tuple[Bytes, Bytes, Bytes]:
    """Alice's (bits, bases, intensity classes) at ``indices``: of each pulse's hash, bits 0-23 pick the
    class (the number of ``class_edges`` they reach: 3 of them, padded with 2^25), bits 24-47 the basis
    (X iff they reach ``z_edge``), bit 63 the bit value. No branch: LLVM vectorises the loop."""
    bits = np.empty(indices.size, dtype=np.uint8)
    bases = np.empty(indices.size, dtype=np.uint8)
    classes = np.empty(indices.size, dtype=np.uint8)
    e1, e2, e3 = class_edges
    for i in range(indices.size):
        x = _mix(indices[i], offset)
        k = x & _MASK24
        classes[i] = np.uint64(k >= e1) + np.uint64(k >= e2) + np.uint64(k >= e3)
        bases[i] = ((x >> _S24) & _MASK24) >= z_edge
        bits[i] = x >> _S63
    return bits, bases, classes


@njit(cache=True, nogil=True, inline="always")
def _after(position: int, draw: int, offset: np.uint64, scale: float, pulses: int) -> int:
    """The next index after ``position`` of a Bernoulli process over the pulses: a geometric gap
    1 + ⌊E·scale⌋ with E = −ln u standard exponential (u in (0, 1], 53 bits of draw number ``draw``)
    and scale = −1/ln(1 − p); ``scale < 0`` stands for p = 0 (no index: ``pulses``)."""
    if scale < 0:
        return pulses
    u = (float(_mix(draw, offset) >> _S11) + 1.0) * _TWO_TO_MINUS_53
    gap = -math.log(u) * scale
    if position + 1.0 + gap >= pulses:  # compared in floats first: the gap of a tiny p may exceed 2^63
        return pulses
    return position + 1 + int(gap)


@njit(cache=True, nogil=True, inline="always")
def _next_candidate(
    position: int, draw: int, offset: np.uint64, table: GapTable, pulses: int
) -> tuple[int, int]:
    """The next signal candidate after ``position`` and the next draw number: the gap from a Walker
    alias table over gaps 1 … K − 1 and a last entry K − 1 + "draw again" (a geometric gap has no memory),
    with the table's index in the top bits of the draw's hash and its threshold compared with the low 32:
    twice as fast as −ln u (dark counts, whose gaps are millions, keep :func:`_after`)."""
    thresholds, aliases, shift = table
    if thresholds.size == 0:
        return pulses, draw
    tail = thresholds.size - 1
    while True:
        h = _mix(draw, offset)
        draw += 1
        j = np.int64(h >> shift)
        outcome = j if (h & _LOW32) < thresholds[j] else aliases[j]
        if outcome != tail:
            return min(position + 1 + int(outcome), pulses), draw
        position += tail
        if position >= pulses:
            return pulses, draw


@njit(cache=True, nogil=True)
def _events(offset: np.uint64, scale: float, pulses: int) -> Int64s:
    """Every index of one Bernoulli process over the pulses (:func:`_after`), in order."""
    out = np.empty(16, dtype=np.int64)
    n = 0
    position = _after(-1, 0, offset, scale, pulses)
    while position < pulses:
        if n == out.size:
            out = _grown(out, 2 * n)
        out[n] = position
        n += 1
        position = _after(position, n, offset, scale, pulses)
    return out[:n]


BLOCK = 4096
"""Signal candidates handled per step of :func:`detect`: their positions and outcomes stay in cache."""


@njit(cache=True, nogil=True)
def _outcomes(
    candidates: Int64s,
    offsets: U64,
    class_edges: U64,
    edges: U64,
    keep_edges: U64,
    out: tuple[Bytes, Bytes, Bytes],
) -> None:
    """For each candidate pulse: whether its photon arrives, the detector it hits, Bob's basis (see
    :func:`detect` for the arguments; ``class_edges`` padded to 3 entries, ``keep_edges`` to 4). One
    loop with no branch and no call, which LLVM turns into vector code."""
    arrived, hits, bob_bases = out
    prep, eve, _, _, _, choice, detector = offsets
    z_alice, z_bob, misaligned, eve_edge = edges
    e1, e2, e3 = class_edges
    k0, k1, k2, k3 = keep_edges
    for i in range(candidates.size):
        t = candidates[i]
        x = _mix(t, prep)
        y = _mix(t, choice)  # bits 0-23: does the candidate arrive; bits 24-47: Bob's basis
        u = _mix(t, detector) & _MASK24  # which detector the photon hits
        k = x & _MASK24
        c = np.uint64(k >= e1) + np.uint64(k >= e2) + np.uint64(k >= e3)
        keep = k0 if c == 0 else (k1 if c == 1 else (k2 if c == 2 else k3))
        bit = x >> _S63
        basis = np.uint64(((x >> _S24) & _MASK24) >= z_alice)
        # Eve, on her share of the pulses, measures in her basis and resends what she saw
        e = _mix(t, eve)
        caught = np.uint64((e & _MASK24) < eve_edge)
        eve_basis = np.uint64(((e >> _S24) & _MASK24) < _HALF)
        bit ^= caught & (eve_basis ^ basis) & (bit ^ (e >> _S63))
        basis ^= caught & (eve_basis ^ basis)
        bob_basis = np.uint64(((y >> _S24) & _MASK24) >= z_bob)
        same = np.uint64(bob_basis == basis)
        flip = (same & np.uint64(u < misaligned)) | ((same ^ _ONE) & np.uint64(u < _HALF))
        arrived[i] = (y & _MASK24) < keep
        hits[i] = bit ^ flip
        bob_bases[i] = bob_basis


@njit(cache=True, nogil=True)
def detect(
    pulses: int,
    offsets: U64,
    signal_gaps: GapTable,
    dark_scale: float,
    class_edges: U64,
    edges: U64,
    keep_edges: U64,
    out: tuple[Int64s, Bytes, Bytes, npt.NDArray[np.bool_]],
) -> int:
    """Bob's detections in a frame of ``pulses`` pulses, written to ``out`` (indices, Bob's bases, bits,
    double clicks); returns their number, or −1 if they do not fit (the caller asks again with larger
    arrays: the result is the same, a function of the offsets alone).

    ``offsets``: Alice's preparation, Eve, and Bob's streams — signal candidates, dark counts of
    detector 0 and 1 (draw counters), his choices at a pulse (index), his detector's (index).
    ``signal_gaps``: the gaps between signal candidates (arrivals at the largest intensity), and
    ``dark_scale`` the geometric scale of each detector's dark counts. ``class_edges``: Alice's class
    edges, padded to 3 with 2^25 (never reached); ``edges``: Alice's Z edge, Bob's Z edge, the
    misalignment edge, Eve's edge (0: no Eve). ``keep_edges[c]``: a candidate of class c arrives iff its u
    is below this (the thinning arrival[c] / arrival[top]), padded to 4.

    Candidates go a block at a time through three loops: their positions (:func:`_next_candidate`),
    their outcomes (:func:`_outcomes`, vector code), and the detections among them, merged with the dark
    counts (a few per million pulses, on a rarely taken branch). No branch depends on a draw: each
    candidate is written at the next slot, which advances iff a detector fired.
    """
    indices, bases, bits, doubles = out
    signal, choice = offsets[2], offsets[5]
    darks = (_events(offsets[3], dark_scale, pulses), _events(offsets[4], dark_scale, pulses))
    # both detectors' dark counts as one sorted list of (index, detector), ending in a sentinel
    dark_at = np.empty(darks[0].size + darks[1].size + 1, dtype=np.int64)
    dark_which = np.zeros(dark_at.size, dtype=np.uint8)
    i = j = 0
    for m in range(dark_at.size - 1):
        if j == darks[1].size or (i < darks[0].size and darks[0][i] <= darks[1][j]):
            dark_at[m] = darks[0][i]
            i += 1
        else:
            dark_at[m], dark_which[m] = darks[1][j], 1
            j += 1
    dark_at[-1] = pulses
    candidates = np.empty(BLOCK, dtype=np.int64)
    arrived = np.empty(BLOCK, dtype=np.uint8)
    hits = np.empty(BLOCK, dtype=np.uint8)
    bob_bases = np.empty(BLOCK, dtype=np.uint8)
    n = 0
    next_dark = 0
    s, draw = _next_candidate(-1, 0, signal, signal_gaps, pulses)
    while True:
        m = 0
        while m < BLOCK and s < pulses:
            candidates[m] = s
            m += 1
            s, draw = _next_candidate(s, draw, signal, signal_gaps, pulses)
        _outcomes(candidates[:m], offsets, class_edges, edges, keep_edges, (arrived, hits, bob_bases))
        i = 0
        while True:
            # the next pulse where something happened: a candidate of this block, or a dark count before
            # the next candidate (s, the next block's first; the frame's end after the last block)
            bound = candidates[i] if i < m else s
            if dark_at[next_dark] < bound:
                t, candidate = dark_at[next_dark], False
            elif i < m:
                t, candidate = bound, True
            else:
                break
            if n == indices.size:
                return -1
            fired0 = fired1 = False
            while dark_at[next_dark] == t:  # rare: one or both detectors fire on their own here
                if dark_which[next_dark]:
                    fired1 = True
                else:
                    fired0 = True
                next_dark += 1
            if candidate:
                photon = arrived[i] == 1
                hit = hits[i]
                bob_basis = bob_bases[i]
                i += 1
            else:  # a dark count alone: only Bob's basis is drawn
                photon = False
                hit = 0
                bob_basis = ((_mix(t, choice) >> _S24) & _MASK24) >= edges[1]
            click1 = (photon & (hit == 1)) | fired1
            click0 = (photon & (hit == 0)) | fired0
            indices[n] = t
            bases[n] = bob_basis
            bits[n] = click1
            doubles[n] = click0 & click1
            n += click0 | click1
        if s >= pulses:
            return n


@njit(cache=True, nogil=True)
def _grown(array: Int64s, size: int) -> Int64s:
    out = np.empty(size, dtype=array.dtype)
    out[: array.size] = array
    return out
