"""The compiled kernels of Cascade against plain numpy references, edge cases included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdd.stages import _cascade_kernels as kernels
from qkdd.stages import cascade


def _prefix_reference(bits: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(bits, dtype=np.int64)])[t] & 1


def _ranges(n: int, draw: st.DataObject) -> tuple[np.ndarray, np.ndarray]:
    pairs = draw.draw(st.lists(st.tuples(st.integers(0, n), st.integers(0, n)), max_size=20))
    starts = np.array([min(p) for p in pairs], dtype=np.int64)
    ends = np.array([max(p) for p in pairs], dtype=np.int64)
    return starts, ends


@given(st.integers(1, 400), st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 5, 300]), st.data())
def test_range_parities_match_prefix_sums(n: int, seed: int, flips: int, data: st.DataObject) -> None:
    """Empty ranges, single bits, word edges and the last partial word, with and without pending flips,
    for the int64 bounds Bob passes and the uint32 bounds of Alice's requests."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    ranges = cascade.RangeParity(np.packbits(bits), n)
    flipped = rng.integers(0, n, flips)
    np.bitwise_xor.at(bits, flipped, 1)
    ranges.flip(flipped)
    starts, ends = _ranges(n, data)
    edges = np.array([0, n, min(n, 63), min(n, 64), min(n, 65), n - 1], dtype=np.int64)
    starts, ends = np.concatenate([starts, edges, edges]), np.concatenate([ends, edges, np.full(6, n)])
    expected = _prefix_reference(bits, ends) ^ _prefix_reference(bits, starts)
    for dtype in (np.int64, np.uint32):
        got = kernels.range_parities(
            ranges.words, ranges.before, ranges.pending, starts.astype(dtype), ends.astype(dtype)
        )
        assert got.dtype == np.uint8
        assert got.tolist() == expected.tolist()
        # the numpy path the kernel replaced, kept as RangeParity.at
        assert (ranges.at(ends.astype(dtype)) ^ ranges.at(starts.astype(dtype))).tolist() == expected.tolist()


def test_range_parities_of_no_ranges() -> None:
    ranges = cascade.RangeParity(np.packbits(np.ones(10, dtype=np.uint8)), 10)
    empty = np.zeros(0, dtype=np.int64)
    assert kernels.range_parities(ranges.words, ranges.before, ranges.pending, empty, empty).size == 0


@given(st.integers(1, 300), st.binary(min_size=16, max_size=16), st.integers(0, 2**32 - 1), st.data())
def test_selected_range_parities_match_the_halves_order(
    n: int, seed: bytes, bits_seed: int, data: st.DataObject
) -> None:
    """A halves pass's ranges go through the select: members first, then the rest, down to single-bit
    and empty blocks (a mask with no member, or all members, on tiny frames)."""
    bits = np.random.default_rng(bits_seed).integers(0, 2, n, dtype=np.uint8)
    shared = cascade._Pass(cascade.PassLayout("halves", seed=seed), n)
    members = cascade.halves_mask(seed, n).astype(bool)
    order = np.concatenate([np.flatnonzero(members), np.flatnonzero(~members)])
    parities = shared.range_parity(bits)
    assert parities.select is not None
    starts, ends = _ranges(n, data)
    starts = np.concatenate([starts, shared.block_starts, [0, n]])
    ends = np.concatenate([ends, shared.block_ends, [0, n]])
    expected = _prefix_reference(bits[order], ends) ^ _prefix_reference(bits[order], starts)
    ranges, select = parities.ranges, parities.select
    for dtype in (np.int64, np.uint32):
        got = kernels.selected_range_parities(
            ranges.words,
            ranges.before,
            ranges.pending,
            select.packed,
            select.before,
            cascade._SELECT8,
            starts.astype(dtype),
            ends.astype(dtype),
        )
        assert got.tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("n", "step", "offset"),
    [(1, 1, 0), (2, 1, 1), (7, 3, 6), (8, 5, 0), (9, 2, 4), (63, 2, 62), (64, 3, 1), (65, 64, 64)],
)
def test_strided_gather_small_frames(n: int, step: int, offset: int) -> None:
    bits = np.random.default_rng(n).integers(0, 2, n, dtype=np.uint8)
    order = (np.arange(n) - offset) % n * step % n
    assert np.array_equal(kernels.strided_gather(bits, step, offset), np.packbits(bits[order]))


@given(st.integers(2, 5000), st.integers(1, cascade.MAX_STRIDED_STEP), st.integers(0, 2**32 - 1))
def test_strided_gather_matches_the_definition(n: int, step: int, seed: int) -> None:
    step = step % n or 1
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    offset = int(rng.integers(0, n))
    order = (np.arange(n) - offset) % n * step % n
    assert np.array_equal(kernels.strided_gather(bits, step, offset), np.packbits(bits[order]))
