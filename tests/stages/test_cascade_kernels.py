"""The compiled kernels of Cascade against plain numpy references, edge cases included."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdd.stages import _cascade_kernels as kernels
from qkdd.stages import cascade

_ROOT = str(Path(__file__).resolve().parents[2])


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
    _assert_range_parity_of(_strided_gather(bits, step, offset), bits[order])


def _strided_gather(bits: np.ndarray, step: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    n = bits.size
    ranges = cascade._affine_ranges(bits, pow(step, -1, n) if n > 1 else 1, offset)
    if n > 1:
        words = np.zeros((n + 63) // 64 * 8 + 16, dtype=np.uint8)
        words[: (n + 7) // 8] = np.packbits(bits)
        direct = kernels.strided_gather(
            words.view(">u8").astype(np.uint64), n, step, pow(step, -1, n), offset
        )
        assert direct[0].tolist() == ranges.words.tolist() and direct[1].tolist() == ranges.before.tolist()
    return ranges.words, ranges.before


def _assert_range_parity_of(gathered: tuple[np.ndarray, np.ndarray], in_order: np.ndarray) -> None:
    """The words and ``before`` of :class:`cascade.RangeParity` of ``in_order``."""
    expected = cascade.RangeParity(np.packbits(in_order), in_order.size)
    words, before = gathered
    assert words.dtype == np.uint64 and before.dtype == np.uint8
    assert words.tolist() == expected.words.tolist()
    assert before.tolist() == expected.before.tolist()


@given(st.integers(2, 5000), st.integers(1, cascade.MAX_STRIDED_STEP), st.integers(0, 2**32 - 1))
def test_strided_gather_matches_the_definition(n: int, step: int, seed: int) -> None:
    step = step % n or 1
    if math.gcd(step, n) != 1:
        step = 1  # an affine pass's step is invertible modulo n
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    offset = int(rng.integers(0, n))
    order = (np.arange(n) - offset) % n * step % n
    _assert_range_parity_of(_strided_gather(bits, step, offset), bits[order])


# --------------------------------------------------------------------------- Bob's searches

_FIELDS = ("starts", "ends", "node", "offset", "node_parity", "blocks")


def _searches(
    n: int, kind: str, seed: int, data: st.DataObject
) -> tuple[cascade.PassParity, dict, np.ndarray]:
    """A pass over n random bits with random searches under way (any node of any block, leaves included,
    in the order Bob keeps them), and the bits in pass order."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    if kind == "affine":
        block_size = data.draw(st.integers(1, n))
        shared = cascade._Pass(cascade.PassLayout("affine", block_size, 1, 0), n)
        in_order = bits
    else:
        shared = cascade._Pass(cascade.PassLayout("halves", seed=rng.bytes(16)), n)
        members = cascade.halves_mask(shared.layout.seed, n).astype(bool)
        in_order = bits[np.concatenate([np.flatnonzero(members), np.flatnonzero(~members)])]
    parities = shared.range_parity(bits)
    width = 1 << (shared.depth + 1)
    blocks = np.flatnonzero(rng.integers(0, 2, shared.block_count)).astype(np.int64)
    starts, ends = [], []
    for block in blocks.tolist():
        lo, hi = int(shared.block_starts[block]), int(shared.block_ends[block])
        start = int(rng.integers(lo, hi))
        starts.append(start)
        ends.append(int(rng.integers(start + 1, hi + 1)))
    heap = rng.integers(0, max(1, width // 2 - 1), blocks.size)
    node = blocks * width + heap
    searches = {
        "starts": np.array(starts, dtype=np.int64),
        "ends": np.array(ends, dtype=np.int64),
        "node": node.astype(np.int64),
        "offset": (1 - blocks * width).astype(np.int64),
        "node_parity": rng.integers(0, 2, blocks.size, dtype=np.uint8),
        "blocks": blocks,
        "searching": np.isin(np.arange(shared.block_count), blocks),
        "known": rng.choice(np.array([0, 1, 2, 2], dtype=np.uint8), shared.block_count * width // 2),
    }
    return parities, searches, in_order


def _kernel_ranges(parities: cascade.PassParity) -> tuple:
    ranges, select = parities.ranges, parities.select
    if select is None:
        return (
            ranges.words,
            ranges.before,
            ranges.pending,
            cascade._NO_BITS,
            cascade._NO_INDICES,
            cascade._SELECT8,
        )
    return ranges.words, ranges.before, ranges.pending, select.packed, select.before, cascade._SELECT8


def _descend_reference(
    alice_left: np.ndarray, in_order: np.ndarray, s: dict, mid: np.ndarray, slots: np.ndarray
) -> int:
    """The numpy code the kernel replaced (``_BobPass.descend`` and ``remember``), on a prefix sum."""
    prefix = np.concatenate([[0], np.cumsum(in_order, dtype=np.int64)])
    rows = np.flatnonzero(alice_left != 2)
    left = alice_left[rows]
    bob_left = (prefix[mid[rows]] ^ prefix[s["starts"][rows]]) & 1
    right = s["node_parity"][rows] ^ left
    if s["known"].size:
        s["known"][slots[rows] >> 1] = left  # left children only: their slots are odd
    go_right = left == bob_left
    s["ends"][rows] = np.where(go_right, s["ends"][rows], mid[rows])
    s["starts"][rows] = np.where(go_right, mid[rows], s["starts"][rows])
    s["node"][rows] = slots[rows] + go_right
    s["node_parity"][rows] = np.where(go_right, right, left)
    return int(rows.size)


def _prune_reference(in_order: np.ndarray, s: dict, touched: np.ndarray, revisiting: bool) -> tuple:
    """The numpy code the kernel replaced (``CascadeBob._drop_found``, the leaf step of ``_settle``,
    ``_BobPass.keep`` and ``left_children``, and the descent through known parities)."""
    prefix = np.concatenate([[0], np.cumsum(in_order, dtype=np.int64)])
    keep = np.ones(s["blocks"].size, dtype=bool)
    if touched.size:
        rows = np.flatnonzero(touched[s["blocks"]])
        bob = (prefix[s["ends"][rows]] ^ prefix[s["starts"][rows]]) & 1
        keep[rows[bob == s["node_parity"][rows]]] = False
    leaves = keep & (s["ends"] - s["starts"] == 1)
    found, found_parity = s["starts"][leaves], s["node_parity"][leaves]
    keep &= ~leaves
    s["searching"][s["blocks"][~keep]] = False
    for field in _FIELDS:
        s[field] = s[field][keep]
    mid = s["starts"] + (s["ends"] - s["starts"] + 1) // 2
    slots = 2 * s["node"] + s["offset"]
    moved = 0
    if revisiting and s["known"].size:
        moved = _descend_reference(s["known"][slots >> 1], in_order, s, mid, slots)
    return int(keep.sum()), found, found_parity, mid, slots, moved


_KINDS = st.sampled_from(["affine", "halves"])


@given(st.integers(1, 300), _KINDS, st.integers(0, 2**32 - 1), st.booleans(), st.data())
def test_descend_matches_the_numpy_steps(
    n: int, kind: str, seed: int, by_slot: bool, data: st.DataObject
) -> None:
    """Single-bit blocks, the last partial block, no search at all; parities from an answer or from
    ``known`` (2: the search stays), remembered or not."""
    parities, s, in_order = _searches(n, kind, seed, data)
    if not data.draw(st.booleans()):
        s["known"] = cascade._NO_BITS.copy()
    rng = np.random.default_rng(seed + 1)
    wide = s["ends"] - s["starts"] > 1
    for field in _FIELDS:
        s[field] = s[field][wide]
    mid = s["starts"] + (s["ends"] - s["starts"] + 1) // 2
    slots = 2 * s["node"] + s["offset"]
    answer = rng.choice(np.array([0, 1, 2], dtype=np.uint8), s["starts"].size)
    expected = {key: value.copy() for key, value in s.items()}
    alice_left = expected["known"][slots >> 1] if by_slot and s["known"].size else answer
    moved = _descend_reference(alice_left, in_order, expected, mid, slots)
    got = kernels.descend(
        s["known"] if by_slot and s["known"].size else answer,
        by_slot and bool(s["known"].size),
        *_kernel_ranges(parities),
        s["starts"],
        s["ends"],
        s["node"],
        s["node_parity"],
        mid,
        slots,
        s["known"],
    )
    assert got == moved
    for key, wanted in expected.items():
        assert s[key].tolist() == wanted.tolist(), key


@given(st.integers(1, 300), _KINDS, st.integers(0, 2**32 - 1), st.booleans(), st.data())
def test_prune_searches_matches_the_numpy_steps(
    n: int, kind: str, seed: int, revisiting: bool, data: st.DataObject
) -> None:
    parities, s, in_order = _searches(n, kind, seed, data)
    rng = np.random.default_rng(seed + 2)
    blocks = s["searching"].size
    touched = rng.integers(0, 2, blocks).astype(bool) if data.draw(st.booleans()) else cascade._NO_FLAGS
    expected = {key: value.copy() for key, value in s.items()}
    count, found, found_parity, mid, slots, moved = _prune_reference(in_order, expected, touched, revisiting)
    ended = sorted(set(s["blocks"].tolist()) - set(expected["blocks"].tolist()))
    maybe, candidates = np.zeros(blocks, dtype=bool), np.empty(blocks, dtype=np.int64)
    got = kernels.prune_searches(
        s["starts"],
        s["ends"],
        s["node"],
        s["offset"],
        s["node_parity"],
        s["blocks"],
        s["searching"],
        touched,
        *_kernel_ranges(parities),
        s["known"],
        revisiting,
        maybe,
        candidates,
        0,
    )
    assert got[0] == count
    for actual, wanted in zip(got[1:5], (found, found_parity, mid, slots), strict=True):
        assert actual.tolist() == wanted.tolist()
    assert got[5] == moved
    for field in _FIELDS:
        assert s[field][:count].tolist() == expected[field].tolist(), field
    assert s["searching"].tolist() == expected["searching"].tolist()
    assert s["known"].tolist() == expected["known"].tolist()
    assert not touched.any()  # every flip so far checked
    # every ended search's block is a candidate for a new search, once
    assert sorted(candidates[: got[6]].tolist()) == ended
    assert np.flatnonzero(maybe).tolist() == ended


def test_kernels_take_no_searches() -> None:
    parities = cascade._Pass(cascade.PassLayout("affine", 4, 1, 0), 10).range_parity(np.ones(10, np.uint8))
    none = np.zeros(0, dtype=np.int64)
    no_bits = np.zeros(0, dtype=np.uint8)
    known = np.full(24, 2, dtype=np.uint8)
    assert (
        kernels.descend(
            no_bits, False, *_kernel_ranges(parities), none, none, none, no_bits, none, none, known
        )
        == 0
    )
    count, found, _, mid, _, moved, candidates = kernels.prune_searches(
        none,
        none.copy(),
        none.copy(),
        none.copy(),
        no_bits,
        none.copy(),
        np.zeros(3, dtype=bool),
        np.ones(3, dtype=bool),
        *_kernel_ranges(parities),
        known,
        True,
        np.zeros(3, dtype=bool),
        np.empty(3, dtype=np.int64),
        0,
    )
    assert (count, found.size, mid.size, moved, candidates) == (0, 0, 0, 0, 0)


def test_importing_cascade_leaves_numba_for_later() -> None:
    code = "import sys, qkdd.stages.cascade; assert 'numba' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": _ROOT})


@pytest.mark.parametrize("variant", ["parallel", "original"])
def test_warm_up_leaves_nothing_to_compile(variant: str) -> None:
    """Every kernel signature a large frame uses is loaded by warm_up (and a second call is free)."""
    cascade.warm_up()
    cascade.warm_up()
    dispatchers = [kernels.range_parities, kernels.selected_range_parities, kernels.strided_gather]
    dispatchers += [kernels.prune_searches, kernels.descend, kernels.start_searches]
    dispatchers += [kernels.sync_pass, kernels.flip_positions, kernels.flip_found, kernels.check_ranges]
    signatures = [len(each.signatures) for each in dispatchers]
    rng = np.random.default_rng(3)
    n = cascade.STRIDED_FRAME_BITS + 1
    alice_key = rng.integers(0, 2, n, dtype=np.uint8)
    bob_key = alice_key.copy()
    bob_key[rng.choice(n, n // 30, replace=False)] ^= 1
    result, alice = cascade.reconcile_in_memory(alice_key, bob_key, 1 / 30, rng, variant=variant)
    assert np.array_equal(result.key, alice_key)
    # a request as the daemon decodes it (qkdd.rounds): pass indices read-only, bounds copied
    alice.finished = False
    ends = np.arange(1, 3, dtype="<u4").astype(np.uint32)
    alice.handle(cascade.RangeRequest(np.frombuffer(bytes(2), dtype=np.uint8), ends - 1, ends))
    assert [len(each.signatures) for each in dispatchers] == signatures


# --------------------------------------------------------------------------- flips


@given(st.integers(1, 700), st.integers(0, 2**32 - 1), st.lists(st.integers(0, 400), max_size=6))
def test_flips_in_batches_keep_range_parities_exact(n: int, seed: int, batches: list[int]) -> None:
    """Batches that stay pending, fill the pending words past the limit or exceed it at once; a position
    flipped twice in a batch; after each, every prefix parity is exact and the pending words sorted."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    ranges = cascade.RangeParity(np.packbits(bits), n)
    t = np.arange(n + 1, dtype=np.int64)
    for size in batches:
        positions = rng.integers(0, n, size).astype(np.int64)
        np.bitwise_xor.at(bits, positions, 1)
        ranges.flip(positions)
        assert ranges.pending.size <= cascade.RangeParity.PENDING_FLIPS
        assert np.all(np.diff(ranges.pending) >= 0)
        assert ranges.parity(np.zeros_like(t), t).tolist() == _prefix_reference(bits, t).tolist()


def _sync_reference(
    shared: cascade._Pass, flips: np.ndarray, odd: np.ndarray, touched: np.ndarray, blocks_from: int
) -> None:
    """The numpy code ``sync_pass`` replaced (``CascadeBob._sync_odd`` and the touched blocks of
    ``CascadeBob._prune``)."""
    blocks = shared.block_of(flips[blocks_from:])
    np.logical_xor.at(odd, blocks, True)
    if touched.size:
        touched[blocks] = True


@given(
    st.integers(1, 300),
    _KINDS,
    st.integers(0, 2**32 - 1),
    st.booleans(),
    st.booleans(),
    st.data(),
)
def test_sync_pass_matches_block_of_and_the_range_parities(
    n: int, kind: str, seed: int, keep_touched: bool, built: bool, data: st.DataObject
) -> None:
    """Odd and touched blocks of the flips from one cursor on, and the pass-order parities of those from
    another (or none: not built), for affine and halves passes."""
    rng = np.random.default_rng(seed)
    if kind == "affine":
        multipliers = [a for a in range(1, max(n, 2)) if np.gcd(a, n) == 1] or [1]
        layout = cascade.PassLayout(
            "affine",
            data.draw(st.integers(1, n)),
            data.draw(st.sampled_from(multipliers)),
            int(rng.integers(n)),
        )
    else:
        layout = cascade.PassLayout("halves", seed=rng.bytes(16))
    shared = cascade._Pass(layout, n)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    flips = rng.choice(n, data.draw(st.integers(0, n)), replace=False).astype(np.int64)
    blocks_from = data.draw(st.integers(0, flips.size))
    ranges_from = data.draw(st.integers(0, flips.size))
    bits[flips[:ranges_from]] ^= 1  # what the parities were built on
    parities = shared.range_parity(bits)
    odd = rng.integers(0, 2, shared.block_count).astype(bool)
    touched = rng.integers(0, 2, shared.block_count).astype(bool) if keep_touched else cascade._NO_FLAGS
    expected_odd, expected_touched, before_odd = odd.copy(), touched.copy(), odd.copy()
    _sync_reference(shared, flips, expected_odd, expected_touched, blocks_from)
    ranges = parities.ranges
    words = ranges.words if built else cascade._NO_WORDS
    maybe, candidates = np.zeros(shared.block_count, dtype=bool), np.empty(shared.block_count, dtype=np.int64)
    pending, odd_change, candidate_count = kernels.sync_pass(
        flips,
        shared.geometry,
        cascade._NO_BITS if shared.packed_mask is None else shared.packed_mask,
        odd,
        touched,
        blocks_from,
        words,
        ranges.before,
        ranges.pending_room,
        ranges.pending.size,
        ranges_from,
        cascade.RangeParity.PENDING_FLIPS,
        maybe,
        candidates,
        0,
    )
    assert odd.tolist() == expected_odd.tolist()
    # every toggled block is a candidate for a new search, once
    toggled = sorted(set(shared.block_of(flips[blocks_from:]).tolist()))
    assert sorted(candidates[:candidate_count].tolist()) == toggled
    assert np.flatnonzero(maybe).tolist() == toggled
    assert odd_change == int(expected_odd.sum()) - int(before_odd.sum())
    assert touched.tolist() == expected_touched.tolist()
    if built:
        ranges.pending = ranges.pending_room[:pending]
        bits[flips[ranges_from:]] ^= 1
        fresh = shared.range_parity(bits)
        ends = np.arange(n + 1, dtype=np.int64)
        starts = np.zeros_like(ends)
        assert parities.parity(starts, ends).tolist() == fresh.parity(starts, ends).tolist()


@given(st.integers(1, 200), st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_start_searches_matches_the_numpy_steps(blocks: int, seed: int, reuse: bool, scan: bool) -> None:
    """Every block scanned, or only the candidates: those that may have turned odd without a search
    (all such blocks, and some others), in any order."""
    rng = np.random.default_rng(seed)
    width = 8
    odd, odd_words = cascade._flags(blocks)
    odd[:] = rng.integers(0, 2, blocks)
    searching, searching_words = cascade._flags(blocks)
    searching[:] = rng.integers(0, 2, blocks)
    searched = (searching | rng.integers(0, 2, blocks).astype(bool)) if reuse else cascade._NO_FLAGS.copy()
    block_starts = np.arange(blocks, dtype=np.int64) * 3
    block_ends = block_starts + 3
    alice_top = rng.integers(0, 2, blocks, dtype=np.uint8)
    under_way = int(searching.sum())
    s = {field: rng.integers(0, 100, under_way).astype(np.int64) for field in _FIELDS}
    s["node_parity"] = s["node_parity"].astype(np.uint8) & 1
    # the numpy code the kernel replaced (``_BobPass.start_searches``)
    new = np.flatnonzero(odd & ~searching)
    roots = new * width
    expected = {
        "blocks": np.concatenate([s["blocks"], new]),
        "starts": np.concatenate([s["starts"], block_starts[new]]),
        "ends": np.concatenate([s["ends"], block_ends[new]]),
        "node": np.concatenate([s["node"], roots]),
        "offset": np.concatenate([s["offset"], 1 - roots]),
        "node_parity": np.concatenate([s["node_parity"], alice_top[new]]),
    }
    expected_revisiting = reuse and bool(searched[new].any())
    expected_searching = searching.copy()
    expected_searching[new] = True
    expected_searched = searched.copy()
    if reuse:
        expected_searched[new] = True
    fields = ("blocks", "starts", "ends", "node", "offset", "node_parity")
    room = [np.zeros(blocks, dtype=s[field].dtype) for field in fields]  # one search per block at most
    for array, field in zip(room, fields, strict=True):
        array[:under_way] = s[field]
    others = np.flatnonzero(rng.integers(0, 2, blocks))
    listed = (
        rng.permutation(np.union1d(new, others)).astype(np.int64) if not scan else others.astype(np.int64)
    )
    maybe = np.zeros(blocks, dtype=bool)
    maybe[listed] = True
    candidates = np.zeros(blocks, dtype=np.int64)
    candidates[: listed.size] = listed
    count, revisiting = kernels.start_searches(
        odd_words,
        searching_words,
        odd,
        searching,
        searched,
        block_starts,
        block_ends,
        alice_top,
        width,
        under_way,
        *room,
        maybe,
        candidates,
        listed.size,
        scan,
    )
    assert not maybe.any()  # every candidate let go
    assert count == expected["blocks"].size
    for array, field in zip(room, fields, strict=True):
        assert array[:count].tolist() == expected[field].tolist(), field
    assert revisiting == expected_revisiting
    assert searching.tolist() == expected_searching.tolist()
    assert searched.tolist() == expected_searched.tolist()


@given(st.integers(1, 300), _KINDS, st.integers(0, 2**32 - 1), st.data())
def test_flip_found_matches_index_at_and_the_checks(
    n: int, kind: str, seed: int, data: st.DataObject
) -> None:
    """Key indices by the pass's inverse map, Bob's bits flipped and logged after the current flips;
    or, when Alice's bit equals Bob's (1) or a bit was flipped before (2), nothing changed."""
    rng = np.random.default_rng(seed)
    if kind == "affine":
        multipliers = [a for a in range(1, max(n, 2)) if np.gcd(a, n) == 1] or [1]
        layout = cascade.PassLayout(
            "affine", 1, data.draw(st.sampled_from(multipliers)), int(rng.integers(n))
        )
    else:
        layout = cascade.PassLayout("halves", seed=rng.bytes(16))
    shared = cascade._Pass(layout, n)
    _, packed, byte_before, select8 = _kernel_ranges(shared.range_parity(np.zeros(n, np.uint8)))[2:]
    positions = rng.choice(n, data.draw(st.integers(0, n)), replace=False).astype(np.int64)
    original = rng.integers(0, 2, n, dtype=np.uint8)
    key = original.copy()
    key[rng.choice(n, data.draw(st.integers(0, n)), replace=False)] ^= 1
    indices = shared.index_at(positions)
    alice = key[indices] ^ 1  # honest: Alice's bit differs from Bob's at every error
    if data.draw(st.booleans()) and positions.size:
        alice[rng.integers(positions.size)] ^= 1
    expected = 1 if (key[indices] == alice).any() else 2 if (key[indices] != original[indices]).any() else 0
    count = data.draw(st.integers(0, 5))
    flips = np.full(count + positions.size + 3, -1, dtype=np.int64)
    before = key.copy()
    got = kernels.flip_found(
        positions, alice, shared.geometry, packed, byte_before, select8, key, original, flips, count
    )
    assert got == expected
    if expected:
        assert key.tolist() == before.tolist()
        return
    assert flips[count : count + positions.size].tolist() == indices.tolist()
    before[indices] ^= 1
    assert key.tolist() == before.tolist()


@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=30)
)
def test_check_ranges_matches_the_numpy_checks(ranges: list[tuple[int, int, int]]) -> None:
    """Passes not started before bad bounds; where the request turns from one pass to another."""
    passes = np.array([r[0] for r in ranges], dtype=np.uint8)
    starts = np.array([r[1] for r in ranges], dtype=np.uint32)
    ends = np.array([r[2] for r in ranges], dtype=np.uint32)
    n, pass_count = 32, 3
    expected = 1 if passes.max() >= pass_count else 2 if (starts >= ends).any() or ends.max() > n else 0
    outcome, cuts = kernels.check_ranges(passes, starts, ends, n, pass_count)
    assert outcome == expected
    if expected == 0:
        assert cuts.tolist() == (np.flatnonzero(passes[1:] != passes[:-1]) + 1).tolist()
