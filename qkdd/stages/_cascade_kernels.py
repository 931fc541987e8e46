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


# The loops below are written out in full: calling a helper per bound (even one numba inlines) keeps
# LLVM from optimising the loop, about 8x slower per range.


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
def strided_gather(key_words: Words, n: int, step: int, multiplier: int, offset: int) -> tuple[Words, Bits]:
    """A key of ``n`` bits (``key_words``: packed MSB-first into 64-bit words, zero padded by two words)
    in the order of an affine pass, as range parities take it: pass position t holds key index
    ``(t - offset) · step mod n``, ``step`` (below n) the inverse of the pass's ``multiplier``. Returns
    the packed words (n // 64 + 1 of them, zero padded) and ``before``.

    Read as rows of ``step`` bits, the key's column j (indices j, j + step, ...) lies in pass order at
    consecutive positions from ``(j · multiplier + offset) mod n``: the pass order is the key's
    transpose, its columns rotated. So 64 x 64 tiles of bits are read a word per row, transposed in
    registers (six rounds of block swaps) and written a word per column, about a tenth of the work of
    walking the pass order a bit at a time; the one column that runs past position n goes on from 0."""
    count = (n >> 6) + 1
    rows = (n + step - 1) // step
    out = np.zeros(count + (rows >> 6) + 3, dtype=np.uint64)
    tile = np.empty(64, dtype=np.uint64)
    end = n
    for first_column in range(0, step, 64):
        columns = min(64, step - first_column)
        for first_row in range(0, rows, 64):
            for k in range(64):
                start = (first_row + k) * step + first_column
                if start >= n:
                    tile[k] = 0
                    continue
                word = start >> 6
                shift = start & 63
                value = key_words[word] << np.uint64(shift)
                if shift:
                    value |= key_words[word + 1] >> np.uint64(64 - shift)
                tile[k] = value
            # transpose: afterwards tile[j] holds column j, row k at bit 63 - k
            width = 32
            mask = np.uint64(0x00000000FFFFFFFF)
            while width:
                k = 0
                while k < 64:
                    swap = (tile[k] ^ (tile[k + width] >> np.uint64(width))) & mask
                    tile[k] ^= swap
                    tile[k + width] ^= swap << np.uint64(width)
                    k = (k + width + 1) & ~width
                width >>= 1
                mask ^= mask << np.uint64(width)
            for j in range(columns):
                column = first_column + j
                valid = min(64, (n - column + step - 1) // step - first_row)  # rows this column has
                if valid <= 0:
                    continue
                value = tile[j]
                if valid < 64:
                    value &= ~((np.uint64(1) << np.uint64(64 - valid)) - np.uint64(1))
                position = (column * multiplier + offset) % n + first_row
                end = max(end, position + valid)
                word = position >> 6
                shift = position & 63
                out[word] |= value >> np.uint64(shift)
                if shift:
                    out[word + 1] |= value << np.uint64(64 - shift)
    for done in range(0, end - n, 64):
        start = n + done
        word = start >> 6
        shift = start & 63
        value = out[word] << np.uint64(shift)
        if shift:
            value |= out[word + 1] >> np.uint64(64 - shift)
        left = end - n - done
        if left < 64:
            value &= ~((np.uint64(1) << np.uint64(64 - left)) - np.uint64(1))
        out[done >> 6] |= value
    words = out[:count].copy()
    tail = n & 63
    words[count - 1] &= ~((np.uint64(1) << np.uint64(64 - tail)) - np.uint64(1)) if tail else np.uint64(0)
    before = np.zeros(count, dtype=np.uint8)
    parity = 0
    for word in range(count - 1):
        folded = words[word]
        folded ^= folded >> np.uint64(32)
        folded ^= folded >> np.uint64(16)
        folded ^= folded >> np.uint64(8)
        folded ^= folded >> np.uint64(4)
        parity ^= int((0x6996 >> np.int64(folded & np.uint64(15))) & 1)
        before[word + 1] = parity
    return words, before


# --------------------------------------------------------------------------- Bob's searches
#
# Bob's searches under way in one pass are parallel arrays, one entry per search: the current node
# ``[starts, ends)`` in pass order, its slot ``node`` and ``offset`` (see ``_BobPass``), Alice's parity of
# the node ``node_parity`` and the ``blocks`` searched. ``packed`` is empty for an affine pass; for a
# halves pass it and ``byte_before`` are its select (ranges are then ranks, mapped through the select).


@njit(cache=True)
def prune_searches(
    starts: Int64s,
    ends: Int64s,
    node: Int64s,
    offset: Int64s,
    node_parity: Bits,
    blocks: Int64s,
    searching: npt.NDArray[np.bool_],
    touched: npt.NDArray[np.bool_],
    words: Words,
    before: Bits,
    pending: Int64s,
    packed: Bits,
    byte_before: Int64s,
    select8: Int64s,
    known: Bits,
    revisiting: bool,
    maybe: npt.NDArray[np.bool_],
    candidates: Int64s,
    candidate_count: int,
) -> tuple[int, Int64s, Bits, Int64s, Int64s, int, int]:
    """One pass's searches before a round trip, in place.

    1. A search whose block is ``touched`` (a flip landed in it since the last look; ``touched`` empty:
       none is looked at) and whose node Bob's bits now make even has found its error elsewhere: it ends.
       ``touched`` is cleared.
    2. A search at a single position has found an error there: it ends, and the position and Alice's
       parity of it are returned (the caller checks and flips it).
    3. The rest move to the front, in order (``searching`` cleared for every ended search's block), and
       get their left child ``[starts, mid)`` and its slot.
    4. With ``revisiting``, every search whose left child's parity Alice disclosed before (``known``)
       descends one level here, with no round trip.

    Every ended search's block becomes a candidate for a new search (see :func:`start_searches`).
    Returns the number of searches kept, the found positions and Alice's parities of them, ``mid`` and
    ``slots`` of the kept searches, the number that descended in step 4 and the new candidate count.
    """
    count = 0
    leaves = 0
    found = np.empty(starts.size, dtype=np.int64)
    found_parity = np.empty(starts.size, dtype=np.uint8)
    check = touched.size > 0
    for i in range(starts.size):
        if check and touched[blocks[i]]:
            bob = 0
            for rank in (starts[i], ends[i]):
                bound = rank
                if packed.size:
                    # a halves pass: the rank-th set bit of the select's slots
                    lo, hi = 0, byte_before.size
                    while lo < hi:
                        middle = (lo + hi) >> 1
                        if byte_before[middle] <= rank:
                            lo = middle + 1
                        else:
                            hi = middle
                    bound = ((lo - 1) << 3) + select8[packed[lo - 1], rank - byte_before[lo - 1]]
                word = bound >> 6
                used = bound & 63
                bob ^= before[word]
                if used:
                    folded = words[word] >> np.uint64(64 - used)
                    folded ^= folded >> np.uint64(32)
                    folded ^= folded >> np.uint64(16)
                    folded ^= folded >> np.uint64(8)
                    folded ^= folded >> np.uint64(4)
                    bob ^= (0x6996 >> np.int64(folded & np.uint64(15))) & 1
                lo, hi = 0, pending.size
                while lo < hi:
                    middle = (lo + hi) >> 1
                    if pending[middle] < word:
                        lo = middle + 1
                    else:
                        hi = middle
                bob ^= lo
            bob &= 1
            if bob == node_parity[i]:
                searching[blocks[i]] = False
                if not maybe[blocks[i]]:
                    maybe[blocks[i]] = True
                    candidates[candidate_count] = blocks[i]
                    candidate_count += 1
                continue
        if ends[i] - starts[i] == 1:
            found[leaves] = starts[i]
            found_parity[leaves] = node_parity[i]
            leaves += 1
            searching[blocks[i]] = False
            if not maybe[blocks[i]]:
                maybe[blocks[i]] = True
                candidates[candidate_count] = blocks[i]
                candidate_count += 1
            continue
        starts[count] = starts[i]
        ends[count] = ends[i]
        node[count] = node[i]
        offset[count] = offset[i]
        node_parity[count] = node_parity[i]
        blocks[count] = blocks[i]
        count += 1
    if check:
        touched[:] = False  # every flip so far is checked
    mid = np.empty(count, dtype=np.int64)
    slots = np.empty(count, dtype=np.int64)
    for i in range(count):
        mid[i] = starts[i] + ((ends[i] - starts[i] + 1) >> 1)
        slots[i] = 2 * node[i] + offset[i]
    moved = 0
    if revisiting and known.size:
        moved = descend(
            known,
            True,
            words,
            before,
            pending,
            packed,
            byte_before,
            select8,
            starts[:count],
            ends[:count],
            node[:count],
            node_parity[:count],
            mid,
            slots,
            known,
        )
    return count, found[:leaves], found_parity[:leaves], mid, slots, moved, candidate_count


@njit(cache=True)
def descend(
    alice_left: Bits,
    by_slot: bool,
    words: Words,
    before: Bits,
    pending: Int64s,
    packed: Bits,
    byte_before: Int64s,
    select8: Int64s,
    starts: Int64s,
    ends: Int64s,
    node: Int64s,
    node_parity: Bits,
    mid: Int64s,
    slots: Int64s,
    known: Bits,
) -> int:
    """Move searches one level down, in place, given Alice's parity of their left child
    ``[starts, mid)`` at slot ``slots``: ``alice_left[i]`` (``by_slot``: ``alice_left[slots[i] >> 1]``),
    where 2 leaves search i where it is. Remembers Alice's parity of the left child in
    ``known[slots[i] >> 1]`` (empty: no reuse; a left child's slot is odd, and the right child's parity
    follows from its parent's, so only left children are kept). Returns the number of searches moved."""
    moved = 0
    for i in range(starts.size):
        left = alice_left[slots[i] >> 1] if by_slot else alice_left[i]
        if left == 2:
            continue
        moved += 1
        right = node_parity[i] ^ left
        if known.size:
            known[slots[i] >> 1] = left
        bob = 0
        for rank in (starts[i], mid[i]):
            bound = rank
            if packed.size:
                # a halves pass: the rank-th set bit of the select's slots
                lo, hi = 0, byte_before.size
                while lo < hi:
                    middle = (lo + hi) >> 1
                    if byte_before[middle] <= rank:
                        lo = middle + 1
                    else:
                        hi = middle
                bound = ((lo - 1) << 3) + select8[packed[lo - 1], rank - byte_before[lo - 1]]
            word = bound >> 6
            used = bound & 63
            bob ^= before[word]
            if used:
                folded = words[word] >> np.uint64(64 - used)
                folded ^= folded >> np.uint64(32)
                folded ^= folded >> np.uint64(16)
                folded ^= folded >> np.uint64(8)
                folded ^= folded >> np.uint64(4)
                bob ^= (0x6996 >> np.int64(folded & np.uint64(15))) & 1
            lo, hi = 0, pending.size
            while lo < hi:
                middle = (lo + hi) >> 1
                if pending[middle] < word:
                    lo = middle + 1
                else:
                    hi = middle
            bob ^= lo
        bob &= 1
        if bob == left:
            starts[i] = mid[i]
            node[i] = slots[i] + 1
            node_parity[i] = right
        else:
            ends[i] = mid[i]
            node[i] = slots[i]
            node_parity[i] = left
    return moved


# --------------------------------------------------------------------------- flips
#
# A pass's geometry for the kernels below, an int64 array: [halves (0/1), multiplier, offset, n,
# block_size, H, two_blocks (0/1), the multiplier's inverse, log2(block_size) or -1 if not a power of
# two] (see ``_Pass``), with a halves pass's packed membership mask beside it.


@njit(cache=True)
def flip_positions(
    words: Words, before: Bits, pending: Int64s, count: int, positions: Int64s, limit: int
) -> int:
    """Toggle the bits at ``positions`` of a range-parity string (a position listed twice toggles twice).

    ``pending[:count]`` holds the sorted words flipped since ``before`` was last counted (``pending`` has
    room for ``limit`` + 1). When that would exceed ``limit``, ``before`` is recounted from the first
    changed word and nothing stays pending. Returns the new pending count."""
    recount = count + positions.size > limit
    first = pending[0] if count else words.size
    for i in range(positions.size):
        position = positions[i]
        word = position >> 6
        words[word] ^= np.uint64(1) << np.uint64(63 - (position & 63))
        if recount:
            first = min(first, word)
        else:
            # insert into the sorted pending words
            j = count
            while j > 0 and pending[j - 1] > word:
                pending[j] = pending[j - 1]
                j -= 1
            pending[j] = word
            count += 1
    if not recount:
        return count
    parity = before[first]
    for word in range(first, words.size - 1):
        folded = words[word]
        folded ^= folded >> np.uint64(32)
        folded ^= folded >> np.uint64(16)
        folded ^= folded >> np.uint64(8)
        folded ^= folded >> np.uint64(4)
        parity ^= (0x6996 >> np.int64(folded & np.uint64(15))) & 1
        before[word + 1] = parity
    return 0


@njit(cache=True)
def sync_pass(
    flips: Int64s,
    geometry: Int64s,
    mask: Bits,
    odd: npt.NDArray[np.bool_],
    touched: npt.NDArray[np.bool_],
    blocks_from: int,
    words: Words,
    before: Bits,
    pending: Int64s,
    pending_count: int,
    ranges_from: int,
    limit: int,
    maybe: npt.NDArray[np.bool_],
    candidates: Int64s,
    candidate_count: int,
) -> tuple[int, int, int]:
    """Bring one pass up to date with Bob's flips (key indices, in order): toggle ``odd`` and set
    ``touched`` (empty: not kept) for the block of each of ``flips[blocks_from:]``, and toggle the
    range-parity string's bit of each of ``flips[ranges_from:]`` (``words`` empty: not built) as
    :func:`flip_positions` does. Each toggled block becomes a candidate for a new search (see
    :func:`start_searches`). Returns the new pending count, the change in odd blocks and the new
    candidate count."""
    halves = geometry[0] != 0
    multiplier, offset, n, block_size, half, two_blocks, shift = (
        geometry[1],
        geometry[2],
        geometry[3],
        geometry[4],
        geometry[5],
        geometry[6] != 0,
        geometry[8],
    )
    first = min(blocks_from, ranges_from)
    slots = np.empty(flips.size - first, dtype=np.int64)
    keep_touched = touched.size > 0
    odd_change = 0
    for i in range(first, flips.size):
        index = flips[i]
        if halves:
            member = (mask[index >> 3] >> (7 - (index & 7))) & 1
            slot = index if member else index + half
            block = 0 if member or not two_blocks else 1
        else:
            slot = (index * multiplier + offset) % n
            block = slot >> shift if shift >= 0 else slot // block_size  # a shift costs less
        slots[i - first] = slot
        if i >= blocks_from:
            odd_change += -1 if odd[block] else 1
            odd[block] = not odd[block]
            if not maybe[block]:
                maybe[block] = True
                candidates[candidate_count] = block
                candidate_count += 1
            if keep_touched:
                touched[block] = True
    if words.size == 0 or ranges_from >= flips.size:
        return pending_count, odd_change, candidate_count
    pending_count = flip_positions(words, before, pending, pending_count, slots[ranges_from - first :], limit)
    return pending_count, odd_change, candidate_count


@njit(cache=True)
def start_searches(
    odd_words: Words,
    searching_words: Words,
    odd: npt.NDArray[np.bool_],
    searching: npt.NDArray[np.bool_],
    searched: npt.NDArray[np.bool_],
    block_starts: Int64s,
    block_ends: Int64s,
    alice_top: Bits,
    width: int,
    count: int,
    blocks: Int64s,
    starts: Int64s,
    ends: Int64s,
    node: Int64s,
    offset: Int64s,
    node_parity: Bits,
    maybe: npt.NDArray[np.bool_],
    candidates: Int64s,
    candidate_count: int,
    scan: bool,
) -> tuple[int, bool]:
    """Start a search at the root of every odd block that has none: append one entry per new search,
    in block order, to the ``count`` searches under way (the arrays of ``prune_searches``, each with
    room for one search per block). Returns the new count, and whether a new search's block was
    searched before (``searched`` marks them; empty: parities are not reused).

    Only the ``candidates[:candidate_count]`` (blocks a flip toggled or whose search ended since the
    last start, each once: ``maybe``) can have turned odd without a search; they are looked at and
    let go. With ``scan``, or when they are many (sorting them would cost more), every block is:
    ``odd_words`` and ``searching_words`` are the flags' bytes 8 at a time (the flags padded with False
    to whole words), so the scan skips 8 blocks at once."""
    revisiting = False
    reuse = searched.size > 0
    pending = candidates[:candidate_count]
    for block in pending:
        maybe[block] = False
    if scan or candidate_count > odd.size >> 5:
        for word in range(odd_words.size):
            if not odd_words[word] & ~searching_words[word]:
                continue
            for block in range(word << 3, min((word + 1) << 3, odd.size)):
                if not odd[block] or searching[block]:
                    continue
                searching[block] = True
                if reuse:
                    revisiting |= searched[block]
                    searched[block] = True
                root = block * width
                blocks[count] = block
                starts[count] = block_starts[block]
                ends[count] = block_ends[block]
                node[count] = root
                offset[count] = 1 - root
                node_parity[count] = alice_top[block]
                count += 1
        return count, revisiting
    # the same start as the scan's above, written out again: this hot loop runs slower through a shared
    # inline kernel
    pending.sort()
    for block in pending:
        if not odd[block] or searching[block]:
            continue
        searching[block] = True
        if reuse:
            revisiting |= searched[block]
            searched[block] = True
        root = block * width
        blocks[count] = block
        starts[count] = block_starts[block]
        ends[count] = block_ends[block]
        node[count] = root
        offset[count] = 1 - root
        node_parity[count] = alice_top[block]
        count += 1
    return count, revisiting


@njit(cache=True)
def flip_found(
    positions: Int64s,
    alice: Bits,
    geometry: Int64s,
    packed: Bits,
    byte_before: Int64s,
    select8: Int64s,
    key: Bits,
    original: Bits,
    flips: Int64s,
    count: int,
) -> int:
    """Correct the errors Bob's searches found at pass-order ``positions`` of one pass (distinct),
    where Alice's bits are ``alice``: flip the key bits there and append their key indices to
    ``flips[count:]`` (room for all). A halves pass maps positions through its select (``packed``,
    ``byte_before``, as in :func:`selected_range_parities`); an affine pass by ``geometry[7]``, the
    multiplier's inverse.

    Returns 0, or changes nothing and returns 1 if Alice's bit equals Bob's at some position (her
    answers contradict each other) or 2 if some bit was flipped before (an honest Alice makes Bob flip
    each error once)."""
    halves = geometry[0] != 0
    offset, n, half, inverse = geometry[2], geometry[3], geometry[5], geometry[7]
    indices = flips[count : count + positions.size]
    for i in range(positions.size):
        position = positions[i]
        if halves:
            lo, hi = 0, byte_before.size
            while lo < hi:
                middle = (lo + hi) >> 1
                if byte_before[middle] <= position:
                    lo = middle + 1
                else:
                    hi = middle
            slot = ((lo - 1) << 3) + select8[packed[lo - 1], position - byte_before[lo - 1]]
            indices[i] = slot - half if slot >= half else slot
        else:
            indices[i] = (position - offset) % n * inverse % n
    for i in range(positions.size):
        if key[indices[i]] == alice[i]:
            return 1
    for i in range(positions.size):
        if key[indices[i]] != original[indices[i]]:
            return 2
    for i in range(positions.size):
        key[indices[i]] ^= 1
    return 0


# --------------------------------------------------------------------------- Alice's answers


@njit(cache=True)
def check_ranges(
    passes: Bits, starts: Positions, ends: Positions, n: int, pass_count: int
) -> tuple[int, Int64s]:
    """Check a range request (arrays of equal length): 1 if it names a pass not started, else 2 if a
    range breaks ``start < end <= n``, else 0 and the indices where it turns from one pass's ranges to
    another's."""
    for i in range(passes.size):
        if passes[i] >= pass_count:
            return 1, np.zeros(0, dtype=np.int64)
    for i in range(starts.size):
        if starts[i] >= ends[i] or ends[i] > n:
            return 2, np.zeros(0, dtype=np.int64)
    changes = 0
    for i in range(1, passes.size):
        if passes[i] != passes[i - 1]:
            changes += 1
    cuts = np.empty(changes, dtype=np.int64)
    changes = 0
    for i in range(1, passes.size):
        if passes[i] != passes[i - 1]:
            cuts[changes] = i
            changes += 1
    return 0, cuts
