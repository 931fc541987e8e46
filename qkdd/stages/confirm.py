"""Key confirmation by a universal polynomial hash (protocol/qkdp-v2.md §6).

Theory of operation: after reconciliation Alice draws a fresh hash key ``k`` uniformly from the field
GF(p), p = 2^89 - 1 (a Mersenne prime), and sends ``k`` with her tag of the reconciled key. Bob computes
his tag under the same ``k``; if the tags differ the frame is discarded. For two different keys of equal
length the tags collide with probability at most ``(L + 1) / p`` over the choice of ``k`` (a non-zero
polynomial of degree <= L + 1 has at most that many roots; Wegman & Carter 1981, Stinson's polynomial
construction), L being the number of 88-bit blocks: below 2^-66 for any key up to 2^24 bits. That is
the ``ε_cor`` this stage contributes. The tag (89 bits) counts as disclosed.

Hash definition (pinned by protocol/vectors/confirm.json): pack the key MSB-first into bytes, pad with
zero bits to a multiple of 88 bits, read it as big-endian 88-bit blocks ``b_1 .. b_L`` (each < p), append
the bit length ``b_{L+1} = n``, and evaluate ``h = 0; h = (h + b_i) * k mod p`` for i = 1 .. L + 1.
:func:`polynomial_hash` takes whole rows of :data:`ROW_BLOCKS` blocks by one float64 matrix product each
(:func:`_row_sums`), the rest :data:`GROUP` blocks per step (one integer conversion and one reduction per
group); :func:`polynomial_hash_reference` is the definition, block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qkdd.bits import Bits, RandomSource, as_bits, pack_bits, random_below
from qkdd.errors import RemoteProtocolError

PRIME_BITS = 89
PRIME = (1 << PRIME_BITS) - 1
BLOCK_BYTES = 11  # 88-bit blocks are < p
TAG_BITS = PRIME_BITS
"""Bits the tag discloses, counted against the key."""
GROUP = 8
"""Blocks per Horner step of :func:`polynomial_hash`: h ← h·k^8 + b_1·k^8 + … + b_8·k."""
ROW_BLOCKS = 2048
"""Blocks per matrix-product row of :func:`polynomial_hash` (a fresh hash key's 2048 powers take about
0.5 ms to compute; a byte times a 30-bit limb, summed over a row, stays below 2^(8 + 30 + 11) = 2^49)."""
LIMB_BITS = 30
LIMBS = 3  # 90 bits hold any field element


def _blocks(key: Bits, hash_key: int) -> tuple[Bits, bytes]:
    bits = as_bits(key, "key")
    if not 0 <= hash_key < PRIME:
        raise ValueError("hash key must be a field element")
    data = pack_bits(bits)
    return bits, data + bytes(-len(data) % BLOCK_BYTES)


def polynomial_hash(key: Bits, hash_key: int) -> int:
    """The confirmation hash of ``key`` under ``hash_key`` (an element of GF(2^89 - 1))."""
    bits, data = _blocks(key, hash_key)
    rows = len(data) // (ROW_BLOCKS * BLOCK_BYTES)
    h = 0
    if rows:
        row_power, sums = _row_sums(memoryview(data)[: rows * ROW_BLOCKS * BLOCK_BYTES], hash_key)
        for total in sums:
            h = (h * row_power + total) % PRIME
    powers = [pow(hash_key, e, PRIME) for e in range(1, GROUP + 1)]  # k^1 … k^GROUP
    mask = (1 << (8 * BLOCK_BYTES)) - 1
    step = GROUP * BLOCK_BYTES
    start = rows * ROW_BLOCKS * BLOCK_BYTES
    grouped = start + (len(data) - start) // step * step
    for offset in range(start, grouped, step):
        blocks = int.from_bytes(data[offset : offset + step], "big")
        total = 0
        for power in powers:  # the group's last block takes k^1, its first k^GROUP
            total += (blocks & mask) * power
            blocks >>= 8 * BLOCK_BYTES
        h = (h * powers[-1] + total) % PRIME
    for offset in range(grouped, len(data), BLOCK_BYTES):
        h = (h + int.from_bytes(data[offset : offset + BLOCK_BYTES], "big")) * hash_key % PRIME
    return (h + bits.size) * hash_key % PRIME


def _row_sums(data: memoryview, hash_key: int) -> tuple[int, list[int]]:
    """k^ROW_BLOCKS, and for each row of :data:`ROW_BLOCKS` blocks in ``data`` the sum Σ_j b_j·k^(R − j)
    (j = 0 … R − 1, R = ROW_BLOCKS), unreduced: one Horner step per row.

    With ``B[r, j, a]`` byte ``a`` of block ``j`` of row ``r`` and ``k^(R − j) = Σ_c limb_c[j]·2^(30c)``,
    the sum is Σ_a 2^(8(10 − a)) Σ_c 2^(30c) · S[r, c, a] with ``S[r, c, a] = Σ_j limb_c[j] · B[r, j, a]``:
    a matrix product of integers below 2^49 in float64, hence exact.
    """
    powers = [hash_key]
    for _ in range(ROW_BLOCKS - 1):
        powers.append(powers[-1] * hash_key % PRIME)
    descending = powers[::-1]  # k^R … k^1
    limb_mask = (1 << LIMB_BITS) - 1
    limbs: npt.NDArray[np.float64] = np.array(
        [[(power >> (LIMB_BITS * c)) & limb_mask for power in descending] for c in range(LIMBS)],
        dtype=np.float64,
    )
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, ROW_BLOCKS, BLOCK_BYTES)
    products = np.matmul(limbs, raw.astype(np.float64)).astype(np.int64).tolist()  # [row][limb][byte]
    sums = []
    for row in products:
        total = 0
        for a in range(BLOCK_BYTES):
            total = (total << 8) + sum(row[c][a] << (LIMB_BITS * c) for c in range(LIMBS))
        sums.append(total)
    return powers[-1], sums


def polynomial_hash_reference(key: Bits, hash_key: int) -> int:
    """The same hash, block by block as defined (tests)."""
    bits, data = _blocks(key, hash_key)
    h = 0
    for offset in range(0, len(data), BLOCK_BYTES):
        h = (h + int.from_bytes(data[offset : offset + BLOCK_BYTES], "big")) * hash_key % PRIME
    return (h + bits.size) * hash_key % PRIME


def collision_bound(key_bits: int) -> float:
    """Probability that two different keys of ``key_bits`` bits get the same tag."""
    blocks = -(-key_bits // (BLOCK_BYTES * 8))
    return (blocks + 1) / PRIME


@dataclass(frozen=True, slots=True)
class ConfirmRequest:
    """Alice → Bob: the fresh hash key and Alice's tag."""

    hash_key: int
    tag: int


@dataclass(frozen=True, slots=True)
class ConfirmReply:
    """Bob → Alice: whether Bob's tag matched."""

    matched: bool


def alice_confirm(key: Bits, source: RandomSource) -> ConfirmRequest:
    """Alice draws the hash key and tags her reconciled key."""
    hash_key = random_below(source, PRIME)
    return ConfirmRequest(hash_key, polynomial_hash(key, hash_key))


def bob_confirm(key: Bits, request: ConfirmRequest) -> ConfirmReply:
    """Bob checks Alice's tag against his reconciled key.

    Raises:
        RemoteProtocolError: the hash key or tag is not a field element.
    """
    if not (0 <= request.hash_key < PRIME and 0 <= request.tag < PRIME):
        raise RemoteProtocolError("confirmation: hash key and tag must be elements of GF(2^89 - 1)")
    return ConfirmReply(polynomial_hash(key, request.hash_key) == request.tag)
