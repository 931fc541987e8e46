"""Cascade information reconciliation, batched (protocol/qkdp-v2.md §5).

Theory of operation
-------------------
Bob holds a noisy copy of Alice's sifted key and drives; Alice only answers parity questions, so what
Alice sends is exactly what is disclosed, and both sides count it identically.

* A *pass* is a layout of the n key bits into blocks: a bijection ``position(i)`` from key index to pass
  order, then contiguous blocks of ``block_size`` positions (the last may be shorter). Two kinds:
  ``affine`` (``position(i) = (a·i + b) mod n``, gcd(a, n) = 1) for small blocks, and ``halves`` (a random
  subset from AES-128-CTR(seed) in index order, then its complement: two blocks) for the late
  BICONF-style passes, whose top parities cost two popcounts instead of a permutation. Bob draws each
  affine pass so that no two bits sharing a block of an earlier one share a block again, and on large
  frames with a small step ``a^-1 mod n``, which both sides lay out by transposing the key read as rows
  of that many bits.
* When a pass starts Alice sends every block parity. Bob compares with his own: a block with odd error
  parity holds at least one error, which a binary search finds with one disclosed parity per level
  (the right half's parity follows from the parent's and the left's, so it is never asked).
* Fixing an error flips the parity of the block holding it in every other pass: blocks that were even
  become odd and are searched in turn (the cascade). Bob always searches the odd blocks of the pass with
  the smallest blocks first (cheapest searches, and the same order a sequential Cascade would take),
  all of them in one batch: a step of the batch is one round trip carrying one range per block, so round
  trips grow with passes × log2(block size) and not with the number of blocks.
* Searches of the same pass never overlap, and every search ends on a bit where Alice and Bob differ, so
  flipping all found bits at the end of a batch is always correct.
* With ``reuse_parities`` (the improved variants) Bob remembers every sub-block parity Alice has
  disclosed or that follows from disclosed ones, and never asks for it again when a later cascade step
  searches the same block.
* Computation: each side holds, per pass, its bits as packed 64-bit words with a running parity per
  word (:class:`RangeParity`): an affine pass's in pass order, a halves pass's in key order with pass
  positions mapped to them by a select (:class:`_Pass`), so any range's parity costs two lookups and a
  popcount. Bob flips his in place as he corrects errors; the other passes' odd-block flags catch up
  with the flips only when they are next looked at.

Variants (Martinez-Mateo, Pacher, Peev, Ciurana, Martin, "Demystifying the information reconciliation
protocol Cascade", QIC 15 (2015), compares them):

* ``original`` — Brassard & Salvail 1993: k1 = ⌈0.73/Q⌉, k_{i+1} = 2·k_i, four passes, no parity reuse.
* ``biconf`` — the original's first two passes, then BICONF (Buttler et al. 2003) random-halves passes
  until ``clean_passes`` in a row find no odd block, with parity reuse. Two passes leave errors in pairs
  that share both their blocks, which only a halves pass can see, and each halves pass misses all of
  them with probability 1/2: a frame keeps an error when c clean passes in a row follow one that still
  had errors, so the frame error rate falls as 2^-c. ``biconf`` asks for c = 16: at 2^14 bits and 5%
  QBER about one frame in 1000 then keeps an error.
* ``optimized`` — the 2015 paper's guidelines: block sizes are powers of two (every binary search
  discloses exactly log2 k parities), k1 = 2^⌈log2(0.8/Q)⌉, a second pass of larger blocks (and,
  outside 2^16-2^18 bits, a third of n/64 bits, at most ``THIRD_BLOCK_MAX``), then
  random-halves passes until ``clean_passes`` in a row are clean; parity reuse throughout.
* ``fast`` — ``optimized`` with first blocks of 2^⌈log2(0.5/Q)⌉ bits: half as large below 2.5% QBER
  (the same above). Fewer error pairs survive the first pass, so far fewer back-searches follow, for
  about +0.01 in efficiency (``FIRST_BLOCK_ERRORS``): on most links the round trips and the
  post-processing's speed limit the key rate more than the last percent of efficiency does.
* ``parallel`` — ``fast``'s passes, but every affine pass starts before any search, and then the odd
  blocks of all passes are searched at once, a pass's own once the passes of smaller blocks are down to
  ``PARALLEL_TAIL_BLOCKS`` odd blocks (fewer on frames below 2^20 bits). What costs ``fast`` its round
  trips is the chains between its first two passes (an error found in one makes a block of the other odd,
  a full binary search per link); the third pass's blocks, searched alongside, cut them short. On long
  frames at 1% QBER that is about a third fewer round trips than ``fast``, for about +0.007 in
  efficiency. The daemons' default: each round trip saved is the link's round-trip time saved.

Bob's side is written as a generator that yields requests and receives replies; :class:`CascadeBob`
wraps it in a sans-IO interface: ``outgoing()`` / ``receive()``, or ``next_message()`` / ``receive()`` for
a driver that sends one request at a time. Requests whose answers cannot change what Bob asks next go
in one flight, a round trip for all (§5 "Flights"): the starts of ``parallel``'s affine passes, and the
random-halves passes that a clean finish still needs. Either driver gets the same passes, parities and
disclosure; a flight only saves the waits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qkdd.bits import Bits, RandomSource, as_bits, pack_bits, unpack_bits
from qkdd.errors import InputError, LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from qkdd.stages import _cascade_kernels as _kernels
else:

    class _Kernels:
        """:mod:`qkdd.stages._cascade_kernels`, imported at the first kernel called: importing numba takes
        about 0.15 s, which a process that never reconciles (or warms up on another thread, see
        :func:`warm_up`) should not pay at import. Each kernel, once looked up, is an attribute of this
        object, as fast to reach as a module's."""

        def __getattr__(self, name: str) -> Any:
            from qkdd.stages import _cascade_kernels  # noqa: PLC0415

            kernel = getattr(_cascade_kernels, name)
            setattr(self, name, kernel)
            return kernel

    _kernels = _Kernels()

Int64s = npt.NDArray[np.int64]
Positions = npt.NDArray[np.int64] | npt.NDArray[np.uint32]
PassKind = Literal["affine", "halves"]

MAX_PASSES = 64
"""Most passes one reconciliation may use (spec bound)."""
MAX_RANGES_PER_REQUEST = 1 << 22
"""Most parity ranges in one request (spec bound)."""
MIN_QBER = 1e-3
"""Block sizes are chosen as if the QBER were at least this."""
SMALL_FRAME_BITS = (1 << 16, 1 << 18)
"""Frame lengths for which ``optimized`` uses two affine passes instead of three (see for_variant)."""
BICONF_CLEAN_PASSES = 16
"""Clean random-halves passes in a row that end ``biconf`` (see the variants above)."""
THIRD_BLOCK_MAX = 1 << 13
"""The third pass of ``optimized`` and ``fast`` has blocks of n/64 bits up to this size. Larger ones
disclose fewer parities but leave more error pairs hidden in one block, each costing another search
wave later: on 2^22-bit frames the cap takes about a sixth of the round trips off at 1% QBER and more
than two thirds at 5%, for about +0.002 in efficiency. 4096 would cut further at 5% but costs
efficiency at 2^20 bits and 2%."""
PARALLEL_TAIL_BLOCKS = 64
"""``parallel``: a pass's searches start while the passes of smaller blocks hold at most this many odd
blocks. A larger threshold saves round trips and costs efficiency: on long frames at 1-5% QBER, 64
takes about a third of ``fast``'s round trips off for less than +0.01 in f; larger thresholds save a
few more for much more in f (every pass at once: about +0.15). Shorter frames hold fewer errors, and a
fixed 64 has nearly every search start at once there (at 2^14 bits and 1% QBER, f about 1.28 against
``fast``'s 1.11). So the threshold scales with the frame, one odd block per
``PARALLEL_TAIL_BITS`` key bits, up to 64 (:func:`_tail_blocks`)."""
PARALLEL_TAIL_BITS = 1 << 14
"""``parallel``: key bits per odd block of the threshold below 2^20 bits: 1 at 2^14 bits, where
``parallel`` then costs what ``fast`` does, and 16 at 2^18. A larger threshold on short frames saves
round trips but costs more in efficiency than on long ones."""
STRIDED_FRAME_BITS = 1 << 17
"""From this frame length on, Bob picks affine passes whose step a^-1 mod n lies in ``STEP_RANGE``."""
STEP_RANGE = (128, 640)
MAX_STRIDED_STEP = 1024
"""Either side lays out an affine pass by a transpose (of the key read as rows of this many bits) when
its step is at most this."""

VARIANTS = ("original", "biconf", "optimized", "fast", "parallel")
DEFAULT_VARIANT = "parallel"
"""What Bob runs unless told otherwise (the daemons' ``post.cascade_variant``)."""
FIRST_BLOCK_ERRORS = {"optimized": 0.8, "fast": 0.5, "parallel": 0.5}
"""The ``optimized`` and ``fast`` first block: the smallest power of two holding at least this many
expected errors. A block with an even number of errors hides them from its pass; the fewer such pairs
the first pass leaves, the fewer searches cascade back and forth later (each a few round trips), and the
more first-pass parities are disclosed. At 2^20 bits and 0.5-2% QBER, ``fast``'s first block, half of
``optimized``'s, about halves the round trips for about +0.01 in efficiency."""


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class PassLayout:
    """How one pass arranges the key into blocks (both sides build it from these fields alone)."""

    kind: PassKind
    block_size: int = 0  # affine: positions per block; halves: 0
    multiplier: int = 1  # affine: a, with gcd(a, n) == 1
    offset: int = 0  # affine: b in [0, n)
    seed: bytes = b""  # halves: 16 bytes, the AES-128-CTR key of the membership mask


@dataclass(frozen=True, slots=True)
class StartPass:
    """Bob → Alice: begin pass ``index`` with ``layout``; Alice answers every block parity."""

    index: int
    layout: PassLayout


@dataclass(frozen=True, slots=True)
class RangeRequest:
    """Bob → Alice: parities of ``[starts[i], ends[i])`` in the order of pass ``passes[i]``."""

    passes: npt.NDArray[np.uint8]
    starts: npt.NDArray[np.uint32]
    ends: npt.NDArray[np.uint32]


@dataclass(frozen=True, slots=True)
class Parities:
    """Alice → Bob: the requested parities, packed MSB-first."""

    count: int
    parities: bytes


@dataclass(frozen=True, slots=True)
class Finished:
    """Bob → Alice: reconciliation is over; both sides have counted ``disclosed_bits``."""

    disclosed_bits: int


BobMessage = StartPass | RangeRequest | Finished


@dataclass(frozen=True, slots=True)
class _Flight:
    """Requests Bob's generator sends together, before any answer, with the number of parities each
    answer must hold; it receives the answers' parities, checked, in request order."""

    messages: tuple[StartPass | RangeRequest, ...]
    counts: tuple[int, ...]


_Request = _Flight | Finished
_Reply = list[Bits]


# --------------------------------------------------------------------------- pass layouts


def halves_mask(seed: bytes, n: int) -> Bits:
    """The membership mask of a ``halves`` pass: the first n bits of the AES-128-CTR keystream under key
    ``seed`` from counter block 0, MSB-first."""
    return np.unpackbits(_packed_halves_mask(seed, n), count=n)


def _packed_halves_mask(seed: bytes, n: int) -> Bits:
    # AES-CTR rather than an extendable-output hash: any public pseudorandom mask serves, and with AES
    # instructions it is about ten times faster than SHAKE-128
    keystream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes((n + 7) // 8))
    packed = np.frombuffer(keystream, dtype=np.uint8).copy()
    if n % 8:
        packed[-1] &= 0xFF << (8 - n % 8) & 0xFF
    return packed


class RangeParity:
    """Parities of the ranges of a bit string, from its packed form: O(n/64) to build, O(1) a range, and
    flips in O(1) amortised.

    ``P(t)``, the parity of bits ``[0, t)``, is the parity of the whole 64-bit words before bit t (a
    running count) XOR the parity of the first ``t mod 64`` bits of t's word; a range's parity is
    ``P(end) XOR P(start)``. Both roles keep one per pass, over their bits in pass order. A flip toggles
    its bit in its word at once but only notes the word in ``pending`` (sorted): the running count stays
    as it was, and a lookup corrects it by the number of pending flips in earlier words, until
    ``PENDING_FLIPS`` of them make it cheaper to recount.
    """

    PENDING_FLIPS = 256

    def __init__(self, packed: Bits, n: int) -> None:
        words = n // 64 + 1  # bit n's word exists, so P(n) needs no special case
        padded = np.zeros(words * 8, dtype=np.uint8)
        padded[: packed.size] = packed[: words * 8]
        self.words: npt.NDArray[np.uint64] = padded.view(">u8").astype(np.uint64)
        self.before: Bits = np.zeros(words, dtype=np.uint8)
        self.pending_room: Int64s = np.zeros(self.PENDING_FLIPS + 1, dtype=np.int64)
        self.pending: Int64s = self.pending_room[:0]  # always a prefix of ``pending_room``
        self._count(0)

    @classmethod
    def from_words(cls, words: npt.NDArray[np.uint64], before: Bits) -> RangeParity:
        """The range parities of a string already in ``words`` (n // 64 + 1 of them) with ``before``
        counted."""
        ranges = cls.__new__(cls)
        ranges.words, ranges.before = words, before
        ranges.pending_room = np.zeros(cls.PENDING_FLIPS + 1, dtype=np.int64)
        ranges.pending = ranges.pending_room[:0]
        return ranges

    def _count(self, first: int) -> None:
        """Recompute ``before`` after the words from ``first`` on changed."""
        tail = self.before[first + 1 :]
        np.cumsum(np.bitwise_count(self.words[first:-1]), dtype=np.uint8, out=tail)
        tail += self.before[first]
        tail &= 1

    def flip(self, positions: Int64s) -> None:
        """Toggle the bits at ``positions`` (a position listed twice is toggled twice)."""
        count = _kernels.flip_positions(
            self.words, self.before, self.pending_room, self.pending.size, positions, self.PENDING_FLIPS
        )
        self.pending = self.pending_room[:count]

    def at(self, t: Positions) -> Bits:
        """``P(t)`` for each t in ``[0, n]``."""
        word = t >> 6
        partial = self.words[word]
        partial &= _HIGH_BITS[t & 63]
        parity: Bits = np.bitwise_count(partial)
        parity ^= self.before[word]
        if self.pending.size:
            np.bitwise_xor(parity, np.searchsorted(self.pending, word), out=parity, casting="unsafe")
        parity &= 1
        return parity

    def parity(self, starts: Positions, ends: Positions) -> Bits:
        """Parity of ``[starts[i], ends[i])`` for each i."""
        return _kernels.range_parities(self.words, self.before, self.pending, starts, ends)


_HIGH_BITS = np.array([((1 << k) - 1) << (64 - k) for k in range(64)], dtype=np.uint64)
"""``_HIGH_BITS[k]``: a word's first (most significant) k bits."""


_SELECT8 = np.argsort(
    1 - np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1), axis=1, kind="stable"
).astype(np.int64)
"""``_SELECT8[v, k]``: the bit (0 = most significant) holding the k-th set bit of byte v."""
_NO_BITS: Bits = np.zeros(0, dtype=np.uint8)
_NO_INDICES: Int64s = np.zeros(0, dtype=np.int64)
_NO_FLAGS: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)
_NO_WORDS: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
"""Empty arrays standing for "none" in kernel arguments (an affine pass's select, no parity reuse, no
block to check)."""


class _Select:
    """The position of the r-th set bit (0-based) of a packed bit string, for many r at once: a binary
    search over running byte counts, then a 2 KiB table within the byte; r = the number of set bits
    gives the string's length."""

    def __init__(self, packed: Bits) -> None:
        self.packed = np.append(packed, np.uint8(0))  # rank = count lands on this extra byte's bit 0
        self.before = np.zeros(self.packed.size, dtype=np.int64)
        np.cumsum(np.bitwise_count(packed), out=self.before[1:])

    def __call__(self, ranks: Int64s) -> Int64s:
        byte = np.searchsorted(self.before, ranks, side="right")
        byte -= 1
        position: Int64s = _SELECT8[self.packed[byte], ranks - self.before[byte]]
        position += byte << 3
        return position


class _Pass:
    """One pass's layout, shared by both roles: block bounds and how to keep range parities in pass
    order (:meth:`range_parity`).

    An affine pass keeps a side's bits rearranged into pass order. A halves pass rearranges nothing: its
    bits live in ``2·H`` *slots* (H = n rounded up to whole words), a member's bit at slot i and any other
    bit at slot H + i, the remaining slots zero. Pass position t then holds the bit of the t-th occupied
    slot, so a prefix of pass order is a prefix of the slots up to a select, and building one costs two
    ANDs and a running count instead of an n-element permutation.
    """

    def __init__(self, layout: PassLayout, n: int) -> None:
        self.layout = layout
        self.n = n
        if layout.kind == "affine":
            k = layout.block_size
            self.block_starts: Int64s = np.arange(0, n, k, dtype=np.int64)
            self.block_ends: Int64s = self.block_starts + k
            self.block_ends[-1] = n  # the last block may be shorter
            longest = min(k, n)
            self._mask: Bits | None = None
        else:
            self._mask = _packed_halves_mask(layout.seed, n)
            members = int(np.bitwise_count(_words(self._mask)).sum())
            bounds = [0, members, n] if 0 < members < n else [0, n]
            self.block_starts = np.array(bounds[:-1], dtype=np.int64)
            self.block_ends = np.array(bounds[1:], dtype=np.int64)
            longest = max(members, n - members)
        self.block_count = self.block_starts.size
        self.depth = math.ceil(math.log2(longest)) if longest > 1 else 0
        self.half = -(-n // 64) * 64  # H, the halves pass's slot offset of non-members
        # how a key index finds its slot and block, for the kernels (_cascade_kernels.sync_pass)
        self.geometry: Int64s = np.array(
            [
                layout.kind == "halves",
                layout.multiplier,
                layout.offset,
                n,
                max(layout.block_size, 1),
                self.half,
                self.block_count == 2,
                pow(layout.multiplier, -1, n) if layout.kind == "affine" and n > 1 else 0,
                k.bit_length() - 1 if (k := max(layout.block_size, 1)) & (k - 1) == 0 else -1,
            ],
            dtype=np.int64,
        )
        self._slot_mask: Bits | None = None
        self._select: _Select | None = None
        # Bob: his range parities in this pass's order, built ahead (CascadeBob.prepare), and the length
        # of his flip log then
        self.prepared: tuple[PassParity, int] | None = None

    @property
    def packed_mask(self) -> Bits | None:
        """A halves pass's membership mask, packed (rebuilt if released); ``None`` for an affine pass."""
        if self._mask is None and self.layout.kind == "halves":
            self._mask = _packed_halves_mask(self.layout.seed, self.n)
        return self._mask

    def release_mask(self) -> None:
        """Let the membership mask go until it is needed again (Alice's, once her block parities are
        out: Bob rarely searches a halves pass, and n/8 bytes per pass add up)."""
        self._mask = None

    def _slots(self) -> tuple[Bits, _Select]:
        """A halves pass's occupied slots, packed, and their select (built lazily: O(n/8))."""
        if self._slot_mask is None or self._select is None:
            mask = self.packed_mask
            assert mask is not None
            members = np.zeros(self.half // 8, dtype=np.uint8)
            members[: mask.size] = mask
            others = ~members
            others[mask.size :] = 0
            if self.n % 8:
                others[mask.size - 1] &= 0xFF << (8 - self.n % 8) & 0xFF
            self._slot_mask = np.concatenate([members, others])
            self._select = _Select(self._slot_mask)
        return self._slot_mask, self._select

    def _is_member(self, indices: Int64s) -> Bits:
        mask = self.packed_mask
        assert mask is not None
        shift = (7 - (indices & 7)).astype(np.uint8)
        member: Bits = mask[indices >> 3] >> shift
        member &= 1
        return member

    def slots(self, indices: Int64s) -> Int64s:
        """Where each key index lives in :meth:`range_parity`'s bit string: its pass-order position
        (affine) or its slot (halves)."""
        if self.layout.kind == "affine":
            return (indices * self.layout.multiplier + self.layout.offset) % self.n
        return indices + self.half * (1 - self._is_member(indices).astype(np.int64))

    def index_at(self, positions: Int64s) -> Int64s:
        """The key index at each pass-order position."""
        if self.layout.kind == "affine":
            inverse = pow(self.layout.multiplier, -1, self.n)
            return ((positions - self.layout.offset) % self.n) * inverse % self.n
        slots = self._slots()[1](positions)
        return np.where(slots >= self.half, slots - self.half, slots)

    def block_of(self, indices: Int64s) -> Int64s:
        """The block holding each key index."""
        if self.layout.kind == "affine":
            return self.slots(indices) // self.layout.block_size
        if self.block_count == 1:
            return np.zeros(indices.size, dtype=np.int64)
        return (1 - self._is_member(indices)).astype(np.int64)

    def range_parity(self, bits: Bits, packed: Bits | None = None) -> PassParity:
        """Range parities of ``bits`` (``packed``: the same, packed, if at hand) in this pass's order."""
        if self.layout.kind == "affine":
            layout = self.layout
            return PassParity(self, _affine_ranges(bits, layout.multiplier, layout.offset, packed))
        slot_mask, select = self._slots()
        doubled = np.zeros(slot_mask.size, dtype=np.uint8)
        source = np.packbits(bits) if packed is None else packed
        doubled[: source.size] = source
        doubled[self.half // 8 : self.half // 8 + source.size] = source
        doubled &= slot_mask
        return PassParity(self, RangeParity(doubled, 2 * self.half), select)

    def halves_parities(self, packed_bits: Bits, total: int | None = None) -> Bits:
        """A halves pass's block parities, by two popcounts and no rearrangement (affine passes take
        theirs from :meth:`range_parity`, which their searches need anyway); ``total``: the parity of
        all of ``packed_bits``, if known."""
        mask = self.packed_mask
        assert mask is not None
        if total is None:
            total = _parity(packed_bits)
        if self.block_count == 1:
            return np.array([total], dtype=np.uint8)
        inside = _parity(packed_bits & mask)
        return np.array([inside, inside ^ total], dtype=np.uint8)


def _words(packed: Bits) -> npt.NDArray[np.uint64]:
    """Packed bits as 64-bit words (zero padded), for popcounts a word at a time."""
    if packed.size % 8:
        packed = np.concatenate([packed, np.zeros(8 - packed.size % 8, dtype=np.uint8)])
    return packed.view(np.uint64)


def _parity(packed: Bits) -> int:
    """The parity of all bits of ``packed``."""
    return int(np.bitwise_count(np.bitwise_xor.reduce(_words(packed)))) & 1


class PassParity:
    """One side's range parities in one pass's order, kept up to date as its bits flip."""

    def __init__(self, layout: _Pass, ranges: RangeParity, select: _Select | None = None) -> None:
        self.layout = layout
        self.ranges = ranges
        self.select = select

    def parity(self, starts: Positions, ends: Positions) -> Bits:
        """Parity of pass-order positions ``[starts[i], ends[i])`` for each i."""
        ranges, select = self.ranges, self.select
        if select is None:
            return ranges.parity(starts, ends)
        return _kernels.selected_range_parities(
            ranges.words, ranges.before, ranges.pending, select.packed, select.before, _SELECT8, starts, ends
        )

    def flip(self, indices: Int64s) -> None:
        """Toggle the bits at key ``indices``."""
        self.ranges.flip(self.layout.slots(indices))


_GATHER_ROWS = 64
"""Rows of 1024 positions gathered at a time by :func:`_affine_gather` (its buffers stay in cache)."""


def _affine_ranges(bits: Bits, multiplier: int, offset: int, packed: Bits | None = None) -> RangeParity:
    """Range parities of ``bits`` (``packed``: the same, packed, if at hand) in the order of the affine
    pass (a, b). With a small step ``c = a^-1 mod n`` (the layouts Bob picks for large frames), by
    transposing the key read as rows of c bits (:func:`qkdd.stages._cascade_kernels.strided_gather`);
    otherwise by :func:`_affine_gather`."""
    n = bits.size
    if n > 1 and (inverse := pow(multiplier, -1, n)) <= MAX_STRIDED_STEP:
        source = np.packbits(bits) if packed is None else packed
        key_words = np.zeros((n + 63) // 64 * 8 + 16, dtype=np.uint8)  # two words of zeros after
        key_words[: source.size] = source
        words = key_words.view(">u8").astype(np.uint64)
        return RangeParity.from_words(*_kernels.strided_gather(words, n, inverse, multiplier, offset))
    return RangeParity(_affine_gather(bits, multiplier, offset), n)


def _affine_gather(bits: Bits, multiplier: int, offset: int) -> Bits:
    """``bits`` in the order of the affine pass (a, b), packed: position t holds key index
    ``(t - b) · a^-1 mod n``, by table lookups.

    Position ``1024·r + c`` holds index ``(H[r] + L[c]) mod n`` with ``H[r] = (1024·r·a^-1 + s) mod n``
    and ``L[c] = c·a^-1 mod n``: two small tables and one add per element instead of a 64-bit multiply
    and modulo, and no modulo at all, because ``H[r] + L[c] < 2n`` indexes ``bits`` written out twice.
    Positions are built and gathered a few rows at a time, so no n-sized index array is ever written.
    """
    n = bits.size
    if n == 1:
        return np.packbits(bits)
    inverse = pow(multiplier, -1, n)
    rows = (n + 1023) >> 10
    twice = np.concatenate([bits, bits])
    low = np.arange(1024, dtype=np.int64) * inverse % n
    high = (np.arange(rows, dtype=np.int64) * (1024 * inverse % n) + (-offset * inverse) % n) % n
    width = min(rows, _GATHER_ROWS)
    index = np.empty((width, 1024), dtype=np.int64)
    gathered = np.empty((width, 1024), dtype=np.uint8)
    out = np.empty(rows * 128, dtype=np.uint8)
    for row in range(0, rows, width):
        count = min(width, rows - row)
        np.add(high[row : row + count, None], low[None, :], out=index[:count])
        np.take(twice, index[:count], out=gathered[:count])
        out[row * 128 : (row + count) * 128] = np.packbits(gathered[:count])
    return out[: (n + 7) // 8]


def _validate_layout(layout: PassLayout, n: int) -> None:
    if layout.kind == "affine":
        if not 1 <= layout.block_size <= n:
            raise RemoteProtocolError(f"cascade: block size {layout.block_size} outside [1, {n}]")
        if not 0 <= layout.offset < n or not 1 <= layout.multiplier < max(n, 2):
            raise RemoteProtocolError("cascade: affine offset or multiplier out of range")
        if math.gcd(layout.multiplier, n) != 1:
            raise RemoteProtocolError("cascade: affine multiplier is not coprime to the frame length")
    elif layout.kind == "halves":
        if len(layout.seed) != 16:
            raise RemoteProtocolError("cascade: a halves pass needs a 16-byte seed")
    else:
        raise RemoteProtocolError(f"cascade: unknown pass kind {layout.kind!r}")


# --------------------------------------------------------------------------- Alice


class CascadeAlice:
    """Alice's side: answers parity questions about her fixed key and counts what she disclosed."""

    def __init__(self, key: Bits, *, max_disclosed_fraction: float = 1.0) -> None:
        self.key = as_bits(key, "key")
        if self.key.size == 0:
            raise InputError("key: cascade needs at least one bit")
        self.n = self.key.size
        self._packed = np.packbits(self.key)
        self._parity = _parity(self._packed)  # of the whole key
        self._passes: list[_Pass] = []
        self._parities: dict[int, PassParity] = {}
        self.disclosed_bits = 0
        self.answers = 0  # requests answered: a round trip each, unless Bob sent several in one flight
        self.finished = False
        self._max_disclosed = int(max_disclosed_fraction * self.n) + 64

    def handle(self, message: BobMessage) -> Parities | None:
        """Answer one of Bob's messages (``None`` for :class:`Finished`).

        Raises:
            RemoteProtocolError: the message is out of order, out of bounds or inconsistent.
        """
        if self.finished:
            raise RemoteProtocolError("cascade: message after Finished")
        match message:
            case StartPass(index=index, layout=layout):
                if index != len(self._passes) or index >= MAX_PASSES:
                    raise RemoteProtocolError(f"cascade: expected pass {len(self._passes)}, got {index}")
                _validate_layout(layout, self.n)
                cascade_pass = _Pass(layout, self.n)
                self._passes.append(cascade_pass)
                if layout.kind == "affine":
                    self._parities[index] = cascade_pass.range_parity(self.key, self._packed)
                    parities = self._parities[index].parity(
                        cascade_pass.block_starts, cascade_pass.block_ends
                    )
                else:
                    parities = cascade_pass.halves_parities(self._packed, self._parity)
                    cascade_pass.release_mask()
                return self._reply(parities)
            case RangeRequest(passes=passes, starts=starts, ends=ends):
                pass_ids, starts_, ends_, cuts = _check_ranges(
                    passes, starts, ends, self.n, len(self._passes)
                )
                if cuts.size == 0:
                    return self._reply(self._pass_parity(int(pass_ids[0])).parity(starts_, ends_))
                parities = np.empty(pass_ids.size, dtype=np.uint8)
                # Bob asks pass by pass, so a request is a few runs of one pass each; slices, not masks
                if cuts.size < MAX_PASSES:
                    bounds = [0, *cuts.tolist(), int(pass_ids.size)]
                    for lo, hi in itertools.pairwise(bounds):
                        ranges = self._pass_parity(int(pass_ids[lo]))
                        parities[lo:hi] = ranges.parity(starts_[lo:hi], ends_[lo:hi])
                    return self._reply(parities)
                for index in np.unique(pass_ids).tolist():
                    mine = pass_ids == index
                    parities[mine] = self._pass_parity(index).parity(starts_[mine], ends_[mine])
                return self._reply(parities)
            case Finished(disclosed_bits=claimed):
                if claimed != self.disclosed_bits:
                    raise RemoteProtocolError(
                        f"cascade: Bob counted {claimed} disclosed bits, Alice {self.disclosed_bits}"
                    )
                self.finished = True
                return None
            case _:
                raise RemoteProtocolError(f"cascade: unexpected message {type(message).__name__}")

    def _pass_parity(self, index: int) -> PassParity:
        """Range parities of Alice's key in the order of pass ``index`` (built on first use)."""
        ranges = self._parities.get(index)
        if ranges is None:
            ranges = self._parities[index] = self._passes[index].range_parity(self.key, self._packed)
        return ranges

    def _reply(self, parities: Bits) -> Parities:
        self.disclosed_bits += int(parities.size)
        self.answers += 1
        if self.disclosed_bits > self._max_disclosed:
            raise RemoteProtocolError("cascade: disclosure limit exceeded; aborting reconciliation")
        return Parities(int(parities.size), pack_bits(parities))


def _check_ranges(
    passes: object, starts: object, ends: object, n: int, pass_count: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint32], npt.NDArray[np.uint32], Int64s]:
    """A range request's arrays, checked, and the indices where it turns from one pass's ranges to
    another's (none: one pass)."""
    p, s, e = np.asarray(passes), np.asarray(starts), np.asarray(ends)
    if (
        p.ndim != 1
        or p.shape != s.shape
        or s.shape != e.shape
        or p.dtype != np.uint8
        or s.dtype != np.uint32
        or e.dtype != np.uint32
    ):
        raise RemoteProtocolError("cascade: a range request is a uint8 and two uint32 arrays of equal length")
    if s.size == 0 or s.size > MAX_RANGES_PER_REQUEST:
        raise RemoteProtocolError(f"cascade: a range request holds 1..{MAX_RANGES_PER_REQUEST} ranges")
    outcome, cuts = _kernels.check_ranges(p, s, e, n, pass_count)
    if outcome == 1:
        raise RemoteProtocolError("cascade: range request names a pass that was not started")
    if outcome == 2:
        raise RemoteProtocolError("cascade: every range must satisfy start < end <= frame length")
    return p, s, e, cuts


# --------------------------------------------------------------------------- Bob


@dataclass(frozen=True, slots=True)
class Schedule:
    """Bob's choice of passes; not part of the protocol (Alice follows any valid layout)."""

    variant: str
    block_sizes: tuple[int, ...]  # the affine passes, in order
    clean_passes: int  # halves passes in a row without an odd block that end reconciliation (0: none)
    reuse_parities: bool
    # None: each pass settles before the next starts, one pass's odd blocks searched at a time. T: every
    # affine pass starts first, then the odd blocks of all passes are searched at once, a pass's own
    # starting while the passes of smaller blocks hold at most T odd blocks (``parallel``)
    tail_blocks: int | None = None

    @property
    def first_block(self) -> int:
        return self.block_sizes[0]

    @classmethod
    def for_variant(cls, variant: str, qber: float, n: int, *, clean_passes: int | None = None) -> Schedule:
        """Block sizes for ``variant`` at estimated ``qber`` on a frame of ``n`` bits."""
        q = min(max(qber, MIN_QBER), 0.25)
        if variant in ("original", "biconf"):
            k1 = max(1, min(n, math.ceil(0.73 / q)))
            if variant == "original":
                return cls(variant, tuple(min(n, k1 << i) for i in range(4)), 0, reuse_parities=False)
            clean = BICONF_CLEAN_PASSES if clean_passes is None else clean_passes
            return cls(variant, (k1, min(n, 2 * k1)), clean, reuse_parities=True)
        if variant in FIRST_BLOCK_ERRORS:
            top = _pow2_at_most(n)
            first = _pow2_at_least(FIRST_BLOCK_ERRORS[variant] / q)
            # a third pass of n/64-bit blocks hits every error cycle left by the first two at once,
            # so they unravel in parallel rather than one random-halves pass at a time
            if SMALL_FRAME_BITS[0] <= n < SMALL_FRAME_BITS[1]:
                # 2^16-2^18 bits: few error cycles survive two passes; a larger second block is cheaper
                # (at 2^14 bits it lets about 1 frame in 1000 keep an error at 3-5% QBER: not used there)
                sizes = [first, _pow2_at_least(4.0 / q)]
            else:
                third = min(max(1, top // 64), THIRD_BLOCK_MAX)
                sizes = [first, _pow2_at_least(2.0 / q), third]
            sizes = [min(size, top) for size in sizes]
            clean = _default_clean_passes(n) if clean_passes is None else clean_passes
            # with two affine passes there is no chain for a third to break: searching at once only adds
            # disclosure there (at 2^16 bits and 1% QBER: the same round trips for +0.008 in f)
            tail = _tail_blocks(n) if variant == "parallel" and len(sizes) > 2 else None
            return cls(variant, tuple(sizes), clean, reuse_parities=True, tail_blocks=tail)
        raise InputError(f"unknown cascade variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def _tail_blocks(n: int) -> int:
    """``parallel``'s threshold on a frame of ``n`` bits (:data:`PARALLEL_TAIL_BITS`)."""
    return min(PARALLEL_TAIL_BLOCKS, max(1, n // PARALLEL_TAIL_BITS))


def _block_size(state: _BobPass) -> int:
    return int(state.layout.block_ends[0] - state.layout.block_starts[0])


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1.0))))


def _pow2_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _default_clean_passes(n: int) -> int:
    """Enough clean random-halves passes that a hidden error pair survives with probability < ~1e-4."""
    return 14 if n >= 1 << 16 else 12


class _BobPass:
    """Bob's per-pass state on top of the shared layout, including the searches under way in it.

    A search's node is named by its slot: block b's sub-block with heap index h (root 0, children
    2h + 1 and 2h + 2) has slot ``b·width + h``, so a node's left child is ``2·node + offset`` with
    ``offset = 1 - b·width`` fixed per search, and ``known`` keeps left children (odd slots) at
    slot // 2. The searches start, move and catch up with Bob's flips a pass at a time by compiled
    kernels (:mod:`qkdd.stages._cascade_kernels`): ``start_searches``, ``sync_pass``,
    ``prune_searches`` before a round trip and ``descend`` on its answer (a few searches per pass and
    step, where a dozen numpy calls cost more than the work).
    """

    def __init__(
        self, index: int, layout: _Pass, alice_top: Bits, reuse: bool, parallel: bool, flips: int
    ) -> None:
        self.index = index
        self.layout = layout
        self.alice_top = alice_top
        # blocks whose parity differs between Alice and Bob; set by Bob once his parities are known
        self.odd, self._odd_words = _flags(layout.block_count)
        self.odd_blocks = 0  # how many
        # the blocks that may have turned odd without a search since searches last started: those a
        # flip toggled or whose search ended, each once (``maybe``); or, with ``scan``, any
        self.maybe = np.zeros(layout.block_count, dtype=bool)
        self.candidates = np.empty(layout.block_count, dtype=np.int64)
        self.candidate_count = 0
        self.scan = True
        # ``parallel``: the blocks that flips landed in since the searches were last checked against them
        self.touched = np.zeros(layout.block_count, dtype=bool) if parallel else _NO_FLAGS
        self.synced = flips  # entries of the flip log applied to ``odd`` and ``touched`` (CascadeBob._sync)
        self.searching, self._searching_words = _flags(layout.block_count)
        self.current: PassParity | None = None  # range parities of Bob's bits in pass order (built lazily)
        self.flips_seen = 0  # entries of the flip log applied to ``current``
        self.width = 1 << (layout.depth + 1)
        # Alice's parities of left children, by slot // 2 (a right child's follows from its parent's);
        # 2 = unknown. Only a block searched before has any, so ``revisiting`` says whether a search
        # under way may find some (else nobody looks)
        self.known: Bits | None = np.full(0, 2, dtype=np.uint8) if reuse else None
        self.searched = np.zeros(layout.block_count if reuse else 0, dtype=bool)
        self.revisiting = False
        # searches under way: block, current node [start, end), its slot, Alice's node parity; each a
        # prefix of room for one search per block, where they start and move in place
        count = layout.block_count
        self._room = (
            np.empty(count, dtype=np.int64),
            np.empty(count, dtype=np.int64),
            np.empty(count, dtype=np.int64),
            np.empty(count, dtype=np.int64),
            np.empty(count, dtype=np.int64),
            np.empty(count, dtype=np.uint8),
        )
        self.blocks: Int64s = self._room[0][:0]
        self.starts: Int64s = self._room[1][:0]
        self.ends: Int64s = self._room[2][:0]
        self.node: Int64s = self._room[3][:0]
        self.offset: Int64s = self._room[4][:0]
        self.node_parity: Bits = self._room[5][:0]
        self.pass_ids = np.full(count, index, dtype=np.uint8)  # a request's pass index for each search

    def keep_searches(self, count: int) -> None:
        """Keep the first ``count`` searches under way."""
        blocks, starts, ends, node, offset, node_parity = self._room
        self.blocks, self.starts, self.ends = blocks[:count], starts[:count], ends[:count]
        self.node, self.offset, self.node_parity = node[:count], offset[:count], node_parity[:count]

    def set_odd(self, odd: npt.NDArray[np.bool_]) -> None:
        self.odd[:] = odd
        self.odd_blocks = int(np.count_nonzero(odd))
        self.scan = True

    def start_searches(self) -> None:
        """Start a search at the root of every odd block that has none."""
        if not self.scan and not self.candidate_count:
            return
        count, revisiting = _kernels.start_searches(
            self._odd_words,
            self._searching_words,
            self.odd,
            self.searching,
            self.searched,
            self.layout.block_starts,
            self.layout.block_ends,
            self.alice_top,
            self.width,
            self.blocks.size,
            *self._room,
            self.maybe,
            self.candidates,
            self.candidate_count,
            self.scan,
        )
        if count != self.blocks.size:
            self.keep_searches(count)
        self.revisiting = self.revisiting or revisiting
        self.candidate_count, self.scan = 0, False


def _flags(count: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.uint64]]:
    """``count`` flags, all False, and the same memory as words of 8 (padded with False)."""
    padded = np.zeros(-(-count // 8) * 8, dtype=bool)
    return padded[:count], padded.view(np.uint64)


@dataclass(frozen=True, slots=True)
class CascadeResult:
    """What reconciliation did: Bob's corrected key and the exact disclosure."""

    key: Bits
    disclosed_bits: int
    corrected_bits: int
    passes: int
    round_trips: int


class CascadeBob:
    """Bob's side: drives the passes and binary searches and corrects his key.

    Use: send every message of ``bob.outgoing()`` to Alice and feed her answers, in order, to
    ``bob.receive(reply)``; when ``outgoing()`` returns :class:`Finished`, send it and call
    ``bob.result()``. Or, one request at a time: ``msg = bob.next_message()``; while it is not
    :class:`Finished`, send it, call ``bob.receive(reply)`` and ``next_message()`` again.
    """

    def __init__(
        self,
        key: Bits,
        qber_estimate: float,
        source: RandomSource,
        *,
        variant: str = DEFAULT_VARIANT,
        schedule: Schedule | None = None,
    ) -> None:
        self.original = as_bits(key, "key")
        if self.original.size == 0:
            raise InputError("key: cascade needs at least one bit")
        if not 0.0 <= qber_estimate <= 0.5 or math.isnan(qber_estimate):
            raise InputError(f"qber_estimate must lie in [0, 0.5], got {qber_estimate}")
        self.n = self.original.size
        self.schedule = schedule or Schedule.for_variant(variant, qber_estimate, self.n)
        self.key = self.original.copy()
        self._source = source
        self._rng = np.random.default_rng(np.frombuffer(source.bytes(16), dtype=np.uint32))
        self._layouts: list[PassLayout] = []  # every pass asked for, started or still in flight
        self._passes: list[_BobPass] = []
        self._by_size: list[_BobPass] = []  # the passes, smallest blocks first (stable)
        # every bit Bob flipped, in order: ``_flips[:_flip_count]``
        self._flips: Int64s = np.zeros(1024, dtype=np.int64)
        self._flip_count = 0
        self._packed: tuple[int, Bits] | None = None  # ``_packed_key`` and the flip count it holds
        self._waved = -1  # the flip log's length when the searches to run were last chosen (parallel)
        self._unprepared: list[_Pass] = []  # affine passes just asked for, without Bob's parities yet
        self.disclosed_bits = 0
        self.round_trips = 0
        self.corrected_bits = 0
        self._protocol = self._run()
        # the flight under way: its requests, how many of them went out, the answers so far
        self._flight: tuple[BobMessage, ...] = ()
        self._counts: tuple[int, ...] = ()
        self._handed = 0
        self._answers: list[Bits] = []
        self._done = False
        self._closed = False  # close() ran: the search is over, finished or not
        self._failed: RemoteProtocolError | None = None

    # -- sans-IO interface

    def outgoing(self) -> list[BobMessage]:
        """The requests to send now, each returned once: all of a flight at once (their answers come
        back in request order), nothing while answers are awaited, and :class:`Finished` at the end."""
        self._advance()
        messages = list(self._flight[self._handed :])
        self._handed = len(self._flight)
        return messages

    def preparation(self) -> Callable[[], list[tuple[PassParity, int]]] | None:
        """The building of Bob's range parities of the affine passes in the flight just handed out, on his
        key as it is now — a transpose of every key bit per pass, a fraction of a millisecond each on
        large frames — as a function that may run on another thread while Alice builds hers for her
        answers. It reads his key, which no call changes until :meth:`receive`: the driver must hand its
        result to :meth:`prepared` before that. ``None``: the flight starts no affine pass. Without it,
        the answers build them."""
        unprepared, self._unprepared = self._unprepared, []
        if not unprepared:
            return None
        key, flips = self.key, self._flip_count

        def build() -> list[tuple[PassParity, int]]:
            packed = np.packbits(key)
            return [(each.range_parity(key, packed), flips) for each in unprepared]

        return build

    def prepared(self, parities: list[tuple[PassParity, int]]) -> None:
        """Take back the result of :meth:`preparation`'s function."""
        for parity in parities:
            parity[0].layout.prepared = parity

    def prepare(self) -> None:
        """:meth:`preparation`, here and now."""
        work = self.preparation()
        if work is not None:
            self.prepared(work())

    @property
    def preparing(self) -> bool:
        """Whether the flight just handed out started affine passes that :meth:`prepare` would build."""
        return bool(self._unprepared)

    def next_message(self) -> BobMessage:
        """For a driver that sends one request at a time: the oldest request not answered yet (the same
        one until :meth:`receive` answers it; a :class:`Finished` when reconciliation is over)."""
        self._advance()
        self._handed = max(self._handed, len(self._answers) + 1)
        return self._flight[len(self._answers)]

    def _advance(self) -> None:
        self._check_usable()
        if not self._flight:
            if self._done:
                raise LocalProtocolError("cascade: already finished")
            self._start(next(self._protocol))

    def _start(self, request: _Request) -> None:
        if isinstance(request, Finished):
            self._flight, self._counts = (request,), ()
            self.close()
        else:
            self._flight, self._counts = request.messages, request.counts
        self._handed = 0
        self._answers = []

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise LocalProtocolError(f"cascade: unusable after an earlier error ({self._failed})")
        if self._closed and not self._done:
            raise LocalProtocolError("cascade: closed before it finished")

    def receive(self, reply: Parities) -> None:
        """Feed Alice's answer to the oldest request sent and not answered yet.

        Raises:
            RemoteProtocolError: the answer does not fit the question (count, length, padding).
        """
        self._check_usable()
        if len(self._answers) >= min(self._handed, len(self._counts)):
            raise LocalProtocolError("cascade: no request is waiting for an answer")
        try:
            count = self._counts[len(self._answers)]
            if not isinstance(reply, Parities) or reply.count != count:
                raise RemoteProtocolError(f"cascade: expected {count} parities in the answer")
            self._answers.append(unpack_bits(reply.parities, count, "cascade parities"))
            if len(self._answers) == len(self._flight):
                self._start(self._protocol.send(self._answers))
        except RemoteProtocolError as error:
            self._failed = error  # final, like h11's ERROR state
            self.close()
            raise

    def close(self) -> None:
        """Release the search: its generator, whose frames hold this object and its arrays, forms a
        reference cycle with it that only a full garbage collection would free (about 30 MB at 2^26
        pulses). Done at the end and on a failure; a driver that drops the search before either calls it.
        Any later call but :meth:`result` (after the end) raises."""
        self._protocol.close()
        self._closed = True

    def result(self) -> CascadeResult:
        if not self._done:
            raise LocalProtocolError("cascade: not finished")
        return CascadeResult(
            self.key, self.disclosed_bits, self.corrected_bits, len(self._passes), self.round_trips
        )

    # -- the protocol, as a generator

    def _ask(self, message: StartPass | RangeRequest, expected: int) -> Generator[_Request, _Reply, Bits]:
        (answer,) = yield from self._ask_all((message,), (expected,))
        return answer

    def _ask_all(
        self, messages: Sequence[StartPass | RangeRequest], expected: Sequence[int]
    ) -> Generator[_Request, _Reply, list[Bits]]:
        """Send ``messages`` in one flight (one round trip); the answers' parities, checked by
        :meth:`receive` as each arrives."""
        answers = yield _Flight(tuple(messages), tuple(expected))
        self.round_trips += 1
        self.disclosed_bits += sum(expected)
        return answers

    def _run(self) -> Generator[_Request, _Reply, None]:
        schedule = self.schedule
        clean_in_a_row = 0
        while len(self._passes) < MAX_PASSES:
            index = len(self._passes)
            if index < len(schedule.block_sizes):
                # ``parallel`` starts every affine pass before any search: in one flight
                count = len(schedule.block_sizes) - index if schedule.tail_blocks is not None else 1
                for size in schedule.block_sizes[index : index + count]:
                    self._layouts.append(self._affine_layout(min(size, self.n)))  # apart from the earlier
            elif schedule.clean_passes and clean_in_a_row < schedule.clean_passes:
                # the halves passes a clean finish still needs, in one flight: Alice's parities do not
                # depend on what Bob finds, and he compares his own as he takes each answer in turn, so
                # this asks exactly the passes that asking one at a time would
                count = min(schedule.clean_passes - clean_in_a_row, MAX_PASSES - index)
                self._layouts += [PassLayout("halves", seed=self._source.bytes(16)) for _ in range(count)]
            else:
                break
            layouts = self._layouts[index:]
            shared = [_Pass(layout, self.n) for layout in layouts]
            self._unprepared = [each for each in shared if each.layout.kind == "affine"]
            requests = [StartPass(index + i, layout) for i, layout in enumerate(layouts)]
            answers = yield from self._ask_all(requests, [each.block_count for each in shared])
            self._unprepared = []  # (prepare, if it ran, is over: the answers wait for it)
            for cascade_pass, alice_top in zip(shared, answers, strict=True):
                state = _BobPass(
                    len(self._passes),
                    cascade_pass,
                    alice_top,
                    schedule.reuse_parities,
                    schedule.tail_blocks is not None,
                    self._flip_count,
                )
                starts, ends = cascade_pass.block_starts, cascade_pass.block_ends
                if cascade_pass.layout.kind == "affine":
                    # from the range parities of Bob's bits (needed for the searches anyway)
                    state.set_odd(alice_top != self._bob_parity(state, starts, ends))
                else:
                    state.set_odd(alice_top != cascade_pass.halves_parities(self._packed_key()))
                self._passes.append(state)
                self._by_size = sorted(self._passes, key=_block_size)
                if cascade_pass.layout.kind == "halves":
                    clean_in_a_row = 0 if state.odd.any() else clean_in_a_row + 1
                if schedule.tail_blocks is not None and len(self._passes) < len(schedule.block_sizes):
                    continue  # every affine pass first: their searches then run at once (``parallel``)
                yield from self._settle()
        self._done = True
        yield Finished(self.disclosed_bits)

    def _settle(self) -> Generator[_Request, _Reply, None]:
        """Search odd blocks, a pass at a time, until no block of any pass is odd.

        Sequential (``tail_blocks`` None): each wave searches every odd block of the pass with the
        smallest blocks (cheapest searches; the order a sequential Cascade takes). Flips land as soon as a
        search ends: blocks of one pass are disjoint, so no flip can land inside another search of the
        same wave. Searching every odd block of every pass at once would cut round trips but finds the same
        error twice too often (about 14% more disclosure on long frames at 1% QBER).

        Parallel (``tail_blocks`` T): searches run in every pass at once, but a pass's searches start
        only while the passes of smaller blocks hold at most T odd blocks. Most errors are found by the
        small blocks, one search each; what the larger blocks add is the end of the *chains* — an error
        found in pass 1 makes its pass-0 block odd, whose search makes a pass-1 block odd, and so on, a
        full binary search per link — which they cut short, at the price of finding some error twice.
        Here a flip can land inside another pass's search: if its node turns even, the error it was after
        is found and it ends.
        """
        active: list[_BobPass] = []
        while True:
            active = self._next_wave(active)
            if not active:
                return
            progressed = False
            asks: list[tuple[_BobPass, Int64s, Int64s]] = []
            for state in active:
                step = self._prune(state)
                if step is None:
                    continue
                mid, slots, moved = step
                if state.revisiting and state.known is not None and state.known.size:
                    # the searches whose left child's parity Alice already disclosed went down a level
                    # with no round trip; the others wait for the next step
                    if moved:
                        progressed = True
                        continue
                    # Alice discloses a node's two children together, so below an unknown child
                    # everything is unknown: these searches will find no known parity again
                    state.revisiting = False
                asks.append((state, mid, slots))
            if progressed or not asks:
                continue
            # one round trip asks the left child of every search under way
            if len(asks) == 1:
                state = asks[0][0]
                passes = state.pass_ids[: state.blocks.size]
                starts, ends = state.starts.astype(np.uint32), asks[0][1].astype(np.uint32)
            else:
                passes = np.concatenate([st.pass_ids[: st.blocks.size] for st, _, _ in asks])
                starts = np.concatenate([st.starts for st, _, _ in asks]).astype(np.uint32)
                ends = np.concatenate([mid for _, mid, _ in asks]).astype(np.uint32)
            answer = yield from self._ask(RangeRequest(passes, starts, ends), int(starts.size))
            offset = 0
            for state, mid, slots in asks:
                count = state.blocks.size
                ranges, packed, byte_before = self._current(state)
                if state.known is not None and state.known.size == 0:
                    state.known = np.full(state.layout.block_count * state.width // 2, 2, dtype=np.uint8)
                _kernels.descend(
                    answer[offset : offset + count],
                    False,  # the answer itself, not looked up by slot
                    ranges.words,
                    ranges.before,
                    ranges.pending,
                    packed,
                    byte_before,
                    _SELECT8,
                    state.starts,
                    state.ends,
                    state.node,
                    state.node_parity,
                    mid,
                    slots,
                    _NO_BITS if state.known is None else state.known,
                )
                offset += count

    def _prune(self, state: _BobPass) -> tuple[Int64s, Int64s, int] | None:
        """Ready the searches of ``state`` for the next round trip (:func:`_kernels.prune_searches`):
        end those whose node a flip since the last look has made even (``parallel``, whose passes keep
        ``touched`` blocks: another pass's search found their error), flip the errors found at single
        positions, and descend through sub-blocks whose parity Alice already disclosed. ``mid``, slots
        of the left children and the number of searches that descended, or ``None`` when no search of
        ``state`` goes on."""
        ranges, packed, byte_before = self._current(state)
        count, positions, alice, mid, slots, moved, state.candidate_count = _kernels.prune_searches(
            state.starts,
            state.ends,
            state.node,
            state.offset,
            state.node_parity,
            state.blocks,
            state.searching,
            state.touched,
            ranges.words,
            ranges.before,
            ranges.pending,
            packed,
            byte_before,
            _SELECT8,
            _NO_BITS if state.known is None else state.known,
            state.revisiting,
            state.maybe,
            state.candidates,
            state.candidate_count,
        )
        if count < state.blocks.size:
            state.keep_searches(count)
        if positions.size:
            self._flip_found(state, positions, alice, packed, byte_before)
        if count == 0:
            state.revisiting = False
            return None
        return mid, slots, moved

    def _next_wave(self, active: list[_BobPass]) -> list[_BobPass]:
        """The passes whose searches go on (and start) now; empty when every block of every pass is even."""
        tail = self.schedule.tail_blocks
        if tail is None:
            active = [state for state in active if state.blocks.size]
            if active:
                return active
            odd = [state for state in self._passes if self._odd_blocks(state)]
            if not odd:
                return []
            first = min(odd, key=_block_size)
            first.start_searches()
            return [first]
        if active and self._waved == self._flip_count and all(state.blocks.size for state in active):
            return active  # no flip and no search ended since the last look: no block turned odd
        self._waved = self._flip_count
        smaller = 0  # odd blocks in the passes of smaller blocks
        for state in self._by_size:
            odd_blocks = self._odd_blocks(state)
            if odd_blocks and smaller <= tail:
                state.start_searches()
            smaller += odd_blocks
        return [state for state in self._passes if state.blocks.size]

    def _affine_layout(self, block_size: int) -> PassLayout:
        """A random affine pass in which no two bits that share a block of an earlier affine pass share
        a block again, as far as 16 draws allow (two errors in the same blocks of two passes hide from
        both). Bits i and i + d share a block of pass (a, k) only if ``a·d mod n`` lies within k of 0;
        the first pass keeps key-adjacent bits (d below the first block size) apart instead, against
        bursts of errors. On large frames the multiplier is the inverse of a step in ``STEP_RANGE``,
        which both sides lay out by a transpose (:func:`_affine_ranges`)."""
        n = self.n
        if n <= 2:
            return PassLayout("affine", block_size, 1, 0)
        earlier = [
            (layout.multiplier, layout.block_size) for layout in self._layouts if layout.kind == "affine"
        ] or [(1, min(self.schedule.first_block, n - 1) + 1)]
        strided = n >= STRIDED_FRAME_BITS
        best: tuple[int, int] | None = None
        for _ in range(16):
            if strided:
                step = int(self._rng.integers(*STEP_RANGE))
                multiplier = pow(step, -1, n) if math.gcd(step, n) == 1 else 0
            else:
                multiplier = int(self._rng.integers(1, n))
            if math.gcd(multiplier, n) != 1:
                continue
            # the closest that two bits sharing a block of an earlier pass come in this pass's order
            closest = n
            for earlier_multiplier, earlier_block in earlier:
                ratio = multiplier * pow(earlier_multiplier, -1, n) % n
                spread = np.arange(1, earlier_block, dtype=np.int64) * ratio % n
                closest = min(closest, int(np.minimum(spread, n - spread).min(initial=n)))
            if best is None or closest > best[0]:
                best = (closest, multiplier)
            if closest >= block_size:
                break
        multiplier = 1 if best is None else best[1]
        return PassLayout("affine", block_size, multiplier, int(self._rng.integers(0, n)))

    def _flip_found(
        self, state: _BobPass, positions: Int64s, alice: Bits, packed: Bits, byte_before: Int64s
    ) -> None:
        """Correct the errors found at pass-order ``positions`` of ``state``, where Alice's bits are
        ``alice``, and log the flips."""
        end = self._flip_count + positions.size
        if end > self._flips.size:
            self._flips = np.concatenate([self._flips, np.zeros(max(end, self._flips.size), dtype=np.int64)])
        outcome = _kernels.flip_found(
            positions,
            alice,
            state.layout.geometry,
            packed,
            byte_before,
            _SELECT8,
            self.key,
            self.original,
            self._flips,
            self._flip_count,
        )
        # a leaf's node parity is Alice's bit: it must differ from Bob's, or her answers contradict each
        # other; and an honest Alice makes Bob flip each error exactly once: a second flip of a bit, or
        # more flips than bits, proves her answers inconsistent (and bounds the work a lying peer can cause)
        if outcome == 1:
            raise RemoteProtocolError("cascade: Alice's parities are inconsistent")
        if outcome == 2:
            raise RemoteProtocolError("cascade: Alice's parities are inconsistent (a bit would flip twice)")
        self.corrected_bits += int(positions.size)
        self._flip_count = end

    def _packed_key(self) -> Bits:
        """Bob's key as it is now, packed (kept while no bit flips: a flight of halves passes compares
        each with it)."""
        if self._packed is None or self._packed[0] != self._flip_count:
            self._packed = (self._flip_count, np.packbits(self.key))
        return self._packed[1]

    def _sync(self, state: _BobPass) -> None:
        """Apply every flip so far to ``state.odd``, ``state.touched`` and Bob's range parities in the pass's
        order, if built (lazily: a flip touches every pass, and most passes are not looked at again
        before many more flips)."""
        count = self._flip_count
        current = state.current
        if state.synced == count and (current is None or state.flips_seen == count):
            return
        layout = state.layout
        mask = _NO_BITS if layout.packed_mask is None else layout.packed_mask
        # without Bob's range parities built, the kernel has none to bring up to date
        ranges = None if current is None else current.ranges
        pending, odd_change, state.candidate_count = _kernels.sync_pass(
            self._flips[:count],
            layout.geometry,
            mask,
            state.odd,
            state.touched,
            state.synced,
            _NO_WORDS if ranges is None else ranges.words,
            _NO_BITS if ranges is None else ranges.before,
            _NO_INDICES if ranges is None else ranges.pending_room,
            0 if ranges is None else ranges.pending.size,
            count if ranges is None else state.flips_seen,
            RangeParity.PENDING_FLIPS,
            state.maybe,
            state.candidates,
            state.candidate_count,
        )
        if ranges is not None:
            ranges.pending = ranges.pending_room[:pending]
        if state.synced < count:
            state.odd_blocks += odd_change
        state.synced = state.flips_seen = count

    def _odd_blocks(self, state: _BobPass) -> int:
        """The number of odd blocks of ``state``, every flip so far applied."""
        self._sync(state)
        return state.odd_blocks

    def _bob_parity(self, state: _BobPass, starts: Int64s, ends: Int64s) -> Bits:
        """Bob's current parity of pass-order ranges."""
        self._current(state)
        assert state.current is not None
        return state.current.parity(starts, ends)

    def _current(self, state: _BobPass) -> tuple[RangeParity, Bits, Int64s]:
        """Bob's range parities in the order of ``state``'s pass, every flip so far applied, as the
        kernels take them: the parities and the pass's select (empty for an affine pass)."""
        if state.current is None:
            self._sync(state)  # ``odd`` and ``touched``, before the parities join in
            state.current, state.flips_seen = state.layout.prepared or (
                state.layout.range_parity(self.key, self._packed_key()),
                self._flip_count,
            )
            state.layout.prepared = None
        self._sync(state)
        select = state.current.select
        if select is None:
            return state.current.ranges, _NO_BITS, _NO_INDICES
        return state.current.ranges, select.packed, select.before


_warmed_up = False


def warm_up() -> None:
    """Import numba and load every Cascade kernel (compiling it on the first run after an install), so
    that the first reconciliation runs at full speed: without it the first frame pays a few tenths of a
    second (kernels cached) or several seconds (not cached). Reconciles a small frame with
    errors in every kind of pass, then asks the range parities as the daemon's requests and with both
    bound types. Later calls return
    at once; safe on another thread while nothing else runs Cascade there."""
    global _warmed_up  # noqa: PLW0603
    if _warmed_up:
        return
    rng = np.random.default_rng(0)
    n = 1000  # below 1024 bits every affine pass is laid out by a transpose
    alice_key = rng.integers(0, 2, n, dtype=np.uint8)
    bob_key = alice_key.copy()
    bob_key[rng.choice(n, 50, replace=False)] ^= 1
    reconcile_in_memory(alice_key, bob_key, 0.05, rng)
    # the daemon's requests: pass indices read-only, straight from the frame
    alice = CascadeAlice(alice_key)
    alice.handle(StartPass(0, PassLayout("affine", 16, 3, 1)))
    ends = np.arange(1, 3, dtype=np.uint32)
    alice.handle(RangeRequest(np.frombuffer(bytes(2), dtype=np.uint8), ends - 1, ends))
    for layout in (PassLayout("affine", 16, 3, 1), PassLayout("halves", seed=bytes(16))):
        ranges = _Pass(layout, n).range_parity(alice_key)
        for bounds in (np.arange(3, dtype=np.int64), np.arange(3, dtype=np.uint32)):
            ranges.parity(bounds, bounds + 1)
    _warmed_up = True


def reconcile_in_memory(
    alice_key: Bits,
    bob_key: Bits,
    qber_estimate: float,
    source: RandomSource,
    *,
    variant: str = DEFAULT_VARIANT,
) -> tuple[CascadeResult, CascadeAlice]:
    """Run both roles in one process with no network (benchmarks, tests, the local pipeline)."""
    alice = CascadeAlice(alice_key)
    bob = CascadeBob(bob_key, qber_estimate, source, variant=variant)
    if alice.n != bob.n:
        raise InputError(f"keys differ in length: {alice.n} vs {bob.n}")
    message = bob.next_message()
    while not isinstance(message, Finished):
        reply = alice.handle(message)
        assert reply is not None
        bob.receive(reply)
        message = bob.next_message()
    alice.handle(message)
    return bob.result(), alice
