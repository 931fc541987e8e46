"""Information-theoretic message authentication: Wegman–Carter with a polynomial hash (qkdp-v2.md §16).

Theory of operation
-------------------
A tag is ``t_j = (h_{k_j}(m) + r_j) mod p`` for j = 1, 2, with p = 2^61 − 1 (a Mersenne prime),
``h_k`` the polynomial hash below, ``(k_1, k_2)`` a hash key drawn once from the key reserve and reused,
and ``(r_1, r_2)`` fresh one-time-pad values from the key reserve, never used twice.

``h_k`` is ε-almost-Δ-universal: for two different messages of at most L blocks, and any δ,
Pr_k[h_k(m) − h_k(m') = δ] ≤ (L + 1)/p, because the difference is a non-zero polynomial in k of degree at
most L + 1 (the length block makes messages of different lengths differ too). Adding a uniform one-time
pad makes each tag reveal nothing about k, so an attacker who has seen any number of tags forges a new
(message, tag) pair with probability at most (L + 1)/p per hash, and ((L + 1)/p)^2 for the two independent
hashes together (Wegman & Carter, J. Comput. Syst. Sci. 22 (1981) 265; Stinson, "Universal hashing and
authentication codes", Des. Codes Cryptogr. 4 (1994) 369 — the reusable-key construction).

With transcripts capped at :data:`MAX_TRANSCRIPT_BYTES` (2^28 bytes, L < 2^25.2 blocks) that is
ε ≤ 2^-71 per tag. Each tag consumes 2 × 61 = 122 one-time-pad bits.

Hash definition (pinned by protocol/vectors/wegman_carter.json): split the message into 7-byte big-endian
blocks b_1 … b_L (the last zero-padded; each < 2^56 < p), append b_{L+1} = the byte length, and evaluate
``h = 0; h = (h + b_i) · k mod p`` for i = 1 … L + 1, i.e. h = Σ b_i · k^(L+2−i). The fast path evaluates
the same sum with numpy: the powers of k by repeated doubling and every product modulo p in 64-bit limbs.
A transcript's whole chunks take a faster path (:meth:`Mac.chunk_values`): one float64 matrix product
per chunk for both hashes, on byte and 31-bit limbs small enough that every sum is an exact integer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

PRIME = (1 << 61) - 1
BLOCK_BYTES = 7
HASHES = 2
PAD_BITS = 61
OTP_BITS = HASHES * PAD_BITS
"""One-time-pad bits one tag consumes."""
KEY_BITS = HASHES * PAD_BITS
"""Hash key bits (reused)."""
TAG_BYTES = HASHES * 8
MAX_TRANSCRIPT_BYTES = 1 << 28

U64 = npt.NDArray[np.uint64]
_P = np.uint64(PRIME)
_MASK31 = np.uint64((1 << 31) - 1)
_MASK30 = np.uint64((1 << 30) - 1)


def _reduce(x: U64) -> U64:
    """x mod p for x < 2^64 (2^61 ≡ 1)."""
    x = (x & _P) + (x >> np.uint64(61))
    return np.where(x >= _P, x - _P, x)


def _mulmod_unreduced(a: U64, b: U64) -> U64:
    """A value below 2^63 + 2^32 congruent to a · b mod p, for a, b < p, elementwise, without 128-bit
    integers (the hash sums these as they are; :func:`_mulmod` reduces them)."""
    a_hi, a_lo = a >> np.uint64(31), a & _MASK31  # a_hi < 2^30
    b_hi, b_lo = b >> np.uint64(31), b & _MASK31
    # a·b = hh·2^62 + (hl + lh)·2^31 + ll, and 2^62 ≡ 2 (mod p)
    hh = a_hi * b_hi  # < 2^60
    mid = a_hi * b_lo
    mid += a_lo * b_hi  # < 2^62
    ll = a_lo * b_lo  # < 2^62
    # mid·2^31 = (mid >> 30)·2^61 + (mid & (2^30 − 1))·2^31 ≡ (mid >> 30) + ((mid & mask30) << 31)
    total = mid >> np.uint64(30)  # < 2^32
    mid &= _MASK30
    mid <<= np.uint64(31)
    total += mid  # < 2^32 + 2^61
    hh <<= np.uint64(1)
    total += hh  # < 2^32 + 2^62
    total += ll  # < 2^32 + 2^63: no overflow
    return total


def _mulmod(a: U64, b: U64) -> U64:
    """a · b mod p for a, b < p, elementwise."""
    return _reduce(_mulmod_unreduced(a, b))


CHUNK = 1 << 14
"""Blocks per vectorised chunk; the powers k^1 … k^CHUNK are computed once per key and cached."""


def _blocks(message: bytes, chunks_of: int, length: int | None = None) -> U64:
    """b_1 … b_(L+1), left-padded with zero blocks to a multiple of ``chunks_of`` (zeros leave Horner's
    value unchanged). ``length``: the length block's value, if not ``len(message)`` (the tail of a longer
    message, :class:`Transcript`)."""
    count = -(-len(message) // BLOCK_BYTES)
    total = -(-(count + 1) // chunks_of) * chunks_of
    wide = np.zeros((total, 8), dtype=np.uint8)  # each 7-byte block in the low bytes of a big-endian word
    start = total - count - 1
    raw = np.frombuffer(message + bytes(-len(message) % BLOCK_BYTES), dtype=np.uint8)
    wide[start : start + count, 1:] = raw.reshape(count, BLOCK_BYTES)
    blocks = wide.view(">u8").reshape(total).astype(np.uint64)
    blocks[-1] = len(message) if length is None else length
    return blocks


def message_blocks(message: bytes) -> U64:
    """The message's blocks as the hash consumes them: rows of :data:`CHUNK` blocks."""
    if len(message) > MAX_TRANSCRIPT_BYTES:
        raise ValueError(f"messages are at most {MAX_TRANSCRIPT_BYTES} bytes")
    return _blocks(message, CHUNK).reshape(-1, CHUNK)


def _powers(key: int, count: int) -> U64:
    """key^1 … key^count (mod p), by doubling."""
    powers = np.empty(count, dtype=np.uint64)
    powers[0] = key
    known = 1
    while known < count:
        step = min(known, count - known)
        powers[known : known + step] = _mulmod(
            powers[:step], np.full(step, powers[known - 1], dtype=np.uint64)
        )
        known += step
    return powers


class PolynomialHash:
    """h_k with its table of powers (the key is reused for many tags, so the table is built once)."""

    def __init__(self, key: int) -> None:
        if not 0 <= key < PRIME:
            raise ValueError("hash key must be an element of GF(2^61 - 1)")
        self.key = key
        self._descending = _powers(key, CHUNK)[::-1].copy()  # k^CHUNK … k^1
        self._chunk_power = int(self._descending[0])

    def __call__(self, message: bytes) -> int:
        return self.of_blocks(message_blocks(message))

    def of_blocks(self, blocks: U64, h: int = 0) -> int:
        """The hash of a message already split by :func:`message_blocks` — or, from Horner's value
        ``h`` after earlier blocks, the value after these rows of blocks too (:class:`Transcript`)."""
        terms = _mulmod_unreduced(blocks, np.broadcast_to(self._descending, blocks.shape))
        # row sums modulo p without overflow: add the 32-bit halves separately (each term < 2^64)
        high: U64 = np.sum(terms >> np.uint64(32), axis=1, dtype=np.uint64)
        low: U64 = np.sum(terms & np.uint64(0xFFFFFFFF), axis=1, dtype=np.uint64)
        for hi, lo in zip(high.tolist(), low.tolist(), strict=True):
            h = (h * self._chunk_power + (int(hi) << 32) + int(lo)) % PRIME
        return h


def polynomial_hash(message: bytes, key: int) -> int:
    """h_key(message) as defined in the module docstring (vectorised)."""
    return PolynomialHash(key)(message)


def polynomial_hash_reference(message: bytes, key: int) -> int:
    """The same hash by plain Horner evaluation (for tests and vectors)."""
    padded = message + bytes(-len(message) % BLOCK_BYTES)
    h = 0
    for offset in range(0, len(padded), BLOCK_BYTES):
        h = (h + int.from_bytes(padded[offset : offset + BLOCK_BYTES], "big")) * key % PRIME
    return (h + len(message)) * key % PRIME


def split_bits(bits: bytes, count: int) -> list[int]:
    """``count`` consecutive 61-bit integers from packed bits (MSB first), each reduced mod p."""
    value = int.from_bytes(bits, "big") >> (len(bits) * 8 - count * PAD_BITS)
    out = []
    for j in range(count):
        shift = (count - 1 - j) * PAD_BITS
        out.append(((value >> shift) & ((1 << PAD_BITS) - 1)) % PRIME)
    return out


LIMB_BITS = 31
"""The powers' limb size in :meth:`Mac.chunk_values`: a byte times a limb, summed over a chunk, stays
below 2^(8 + 31 + 14) = 2^53, where every float64 integer is exact."""

ROWS_PER_PRODUCT = 4
"""Chunks converted to float64 at a time in :meth:`Mac.chunk_values` (3.7 MB of scratch)."""


class Mac:
    """Tags under one reusable hash key pair; each call takes fresh pads."""

    def __init__(self, keys: list[int]) -> None:
        if len(keys) != HASHES:
            raise ValueError(f"a tag needs {HASHES} hash keys")
        self.hashes = [PolynomialHash(k) for k in keys]
        # each hash's descending powers k^CHUNK … k^1 split into a low and a high limb, as float64 rows
        mask = np.uint64((1 << LIMB_BITS) - 1)
        self._limbs = np.array(
            [
                limb
                for h in self.hashes
                for limb in (h._descending & mask, h._descending >> np.uint64(LIMB_BITS))
            ],
            dtype=np.float64,
        )

    def chunk_values(self, data: bytes | memoryview, values: list[int]) -> list[int]:
        """Each hash's Horner value after the whole chunks ``data`` (a multiple of CHUNK blocks), from
        ``values``: the same as :meth:`PolynomialHash.of_blocks` on their blocks, three to five times
        faster.

        With ``B[r, j, a]`` byte ``a`` of block ``j`` of chunk ``r`` and ``k^(CHUNK − j) = lo_j +
        hi_j·2^31``, the chunk's sum is Σ_a 2^(8(6 − a)) · (S_lo[r, a] + 2^31 · S_hi[r, a]) with
        ``S[r, a] = Σ_j limb_j · B[r, j, a]``: a matrix product whose terms are below 2^39 and whose sums
        are below 2^53, so the float64 product is exact (any summation order gives the same integers).
        """
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, CHUNK, BLOCK_BYTES)
        scratch = np.empty((min(ROWS_PER_PRODUCT, raw.shape[0]), CHUNK, BLOCK_BYTES), dtype=np.float64)
        values = list(values)
        for start in range(0, raw.shape[0], ROWS_PER_PRODUCT):
            rows = raw[start : start + ROWS_PER_PRODUCT]
            chunk = scratch[: rows.shape[0]]
            np.copyto(chunk, rows, casting="unsafe")
            sums = np.matmul(self._limbs, chunk).astype(np.int64).tolist()  # [row][2·hash + limb][byte]
            for row in sums:
                for i, h in enumerate(self.hashes):
                    low, high = row[2 * i], row[2 * i + 1]
                    total = 0
                    for a in range(BLOCK_BYTES):
                        total = (total << 8) + low[a] + (high[a] << LIMB_BITS)
                    values[i] = (values[i] * h._chunk_power + total) % PRIME
        return values

    def tag(self, message: bytes, pads: list[int]) -> bytes:
        """The Wegman–Carter tag of ``message``: two 8-byte big-endian field elements."""
        if len(pads) != HASHES:
            raise ValueError(f"a tag needs {HASHES} pads")
        blocks = message_blocks(message)
        return b"".join(
            ((h.of_blocks(blocks) + r) % PRIME).to_bytes(8, "big")
            for h, r in zip(self.hashes, pads, strict=True)
        )


class Transcript:
    """One direction's round transcript (qkdp-v2.md §16), hashed as it grows.

    :meth:`append` only queues the bytes. :meth:`take_chunks` hands out the hashing of every whole chunk
    of :data:`CHUNK` blocks queued so far as a pure function, which may run on any thread while frames
    keep coming; :meth:`absorbed` takes its result back (one such piece of work is out at a time, so no
    lock is needed: the function owns its bytes and starting values). :meth:`tag` hashes the rest and tags
    all bytes appended. The tag equals ``mac.tag(b"".join(appended), pads)``: Horner's value after the
    whole chunks, times k^c, plus the hash of the c remaining blocks (the tail and the length block) from
    zero. Without a MAC (a PSK round) it only counts bytes."""

    CHUNK_BYTES = CHUNK * BLOCK_BYTES
    """What one absorbing step hashes (114,688 bytes)."""

    def __init__(self, mac: Mac | None) -> None:
        self.mac = mac
        self.length = 0
        self._queued: list[bytes] = []  # appended, not taken yet
        self._tail = b""  # taken but less than a chunk: hashed at the end
        self._values = [0] * HASHES  # Horner's value after the absorbed chunks, per hash
        self._absorbed = 0  # bytes in those chunks
        self._taken = 0  # bytes of whole chunks handed out by take_chunks and not absorbed yet

    def append(self, data: bytes) -> None:
        self.length += len(data)
        if self.mac is not None:
            self._queued.append(data)

    @property
    def unabsorbed(self) -> int:
        """Bytes appended but not absorbed yet: what :meth:`tag` would hash if called now."""
        return self.length - self._absorbed if self.mac is not None else 0

    @property
    def hashing(self) -> bool:
        """Whether chunks handed out by :meth:`take_chunks` are not back yet (:meth:`tag` must wait)."""
        return self._taken > 0

    def take_chunks(self) -> Callable[[], list[int]] | None:
        """The hashing of the whole chunks queued so far, as a function of nothing this object changes;
        hand its result to :meth:`absorbed`. ``None``: less than a chunk waits, or earlier chunks are out."""
        if self.mac is None or self._taken:
            return None
        data = b"".join([self._tail, *self._queued])
        self._queued = []
        whole = len(data) // self.CHUNK_BYTES * self.CHUNK_BYTES
        self._tail = data[whole:]
        if not whole:
            return None
        self._taken = whole
        mac, values, chunks = self.mac, list(self._values), memoryview(data)[:whole]  # no copy
        return lambda: mac.chunk_values(chunks, values)

    def absorbed(self, values: list[int]) -> None:
        """Take back the result of the function :meth:`take_chunks` handed out."""
        if not self._taken:
            raise ValueError("no chunks are being hashed")
        self._values, self._absorbed, self._taken = values, self._absorbed + self._taken, 0

    def absorb(self) -> None:
        """Hash the whole chunks queued so far, here and now."""
        work = self.take_chunks()
        if work is not None:
            self.absorbed(work())

    def tag(self, pads: list[int]) -> bytes:
        if self.mac is None:
            raise ValueError("a transcript without a MAC has no tag")
        if len(pads) != HASHES:
            raise ValueError(f"a tag needs {HASHES} pads")
        if self.length > MAX_TRANSCRIPT_BYTES:
            raise ValueError(f"messages are at most {MAX_TRANSCRIPT_BYTES} bytes")
        if self._taken:
            raise ValueError("chunks handed out by take_chunks are not back yet")
        self.absorb()
        rest = _blocks(self._tail, CHUNK, self.length).reshape(-1, CHUNK)
        count = -(-len(self._tail) // BLOCK_BYTES) + 1
        return b"".join(
            ((value * pow(h.key, count, PRIME) + h.of_blocks(rest) + r) % PRIME).to_bytes(8, "big")
            for h, value, r in zip(self.mac.hashes, self._values, pads, strict=True)
        )


def tag(message: bytes, keys: list[int], pads: list[int]) -> bytes:
    """One-off :meth:`Mac.tag`."""
    return Mac(keys).tag(message, pads)


def forgery_bound(message_bytes: int) -> float:
    """Probability that a forged tag for a message of this size verifies."""
    blocks = -(-message_bytes // BLOCK_BYTES) + 1
    return float(((blocks + 1) / PRIME) ** HASHES)
