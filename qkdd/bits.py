"""Bit arrays, packing, varints and injected randomness.

Theory of operation: inside qkdd a bit string is a 1-D ``numpy.uint8`` array holding 0 or 1 per element
(fast to index, gather and sum). On the wire it is packed eight to a byte, most significant bit first
(``numpy.packbits`` default order), with zero padding in the last byte; ``protocol/qkdp-v2.md`` §2 fixes
this. Varints are unsigned LEB128, encoded and decoded without a Python loop over values.

Randomness is always injected: every function that draws takes a :class:`RandomSource`, anything with a
``bytes(n)`` method. ``numpy.random.Generator`` qualifies (tests, simulator); :class:`SystemRandom` reads
the operating system's CSPRNG and is what the daemons use for anything an attacker must not predict.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import numpy.typing as npt

from qkdd.errors import InputError, RemoteProtocolError

Bits = npt.NDArray[np.uint8]
"""A 1-D array of 0/1 values, one bit per element."""


class RandomSource(Protocol):
    """Anything that returns uniformly random bytes (``numpy.random.Generator`` does)."""

    def bytes(self, length: int) -> bytes: ...


class SystemRandom:
    """The operating system's CSPRNG behind the :class:`RandomSource` interface."""

    def bytes(self, length: int) -> bytes:
        return os.urandom(length)


def random_bits(source: RandomSource, count: int) -> Bits:
    """``count`` uniformly random bits drawn from ``source``."""
    if count < 0:
        raise InputError(f"bit count must be >= 0, got {count}")
    raw = np.frombuffer(source.bytes((count + 7) // 8), dtype=np.uint8)
    return np.unpackbits(raw, count=count)


def random_below(source: RandomSource, bound: int) -> int:
    """A uniform integer in ``[0, bound)`` by rejection sampling (no modulo bias)."""
    if bound <= 0:
        raise InputError(f"bound must be positive, got {bound}")
    nbytes = (bound.bit_length() + 7) // 8 + 1
    limit = (256**nbytes // bound) * bound
    while True:
        value = int.from_bytes(source.bytes(nbytes), "big")
        if value < limit:
            return value % bound


def as_bits(values: object, name: str) -> Bits:
    """Validate local input as a bit array and return it as contiguous ``uint8``.

    Raises:
        InputError: not 1-D, not a bool or integer dtype, or a value other than 0 and 1.
    """
    array = np.asarray(values)
    if array.ndim != 1:
        raise InputError(f"{name}: expected a 1-D bit array, got shape {array.shape}")
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name}: expected a bool or integer dtype, got {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise InputError(f"{name}: bit values must be 0 or 1")
    return np.ascontiguousarray(array, dtype=np.uint8)


def as_index_array(values: object, name: str, *, bound: int | None = None) -> npt.NDArray[np.int64]:
    """Validate local input as a 1-D integer index array, optionally each in ``[0, bound)``."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise InputError(f"{name}: expected a 1-D array, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name}: expected an integer dtype, got {array.dtype}")
    if array.min() < 0 or (bound is not None and array.max() >= bound):
        raise InputError(f"{name}: values must lie in [0, {bound})")
    return array.astype(np.int64, copy=False)


def pack_bits(bits: Bits) -> bytes:
    """Pack a bit array MSB-first, zero padded to whole bytes."""
    return np.packbits(bits).tobytes()


def check_packed(data: bytes, count: int, what: str) -> npt.NDArray[np.uint8]:
    """The bytes of ``count`` packed bits the peer sent, still packed (a read-only view); the length must
    be exact and the padding zero.

    Raises:
        RemoteProtocolError: wrong byte length or non-zero padding bits.
    """
    if len(data) != (count + 7) // 8:
        raise RemoteProtocolError(
            f"{what}: expected {(count + 7) // 8} bytes for {count} bits, got {len(data)}"
        )
    if count % 8 and data[-1] & (0xFF >> count % 8):
        raise RemoteProtocolError(f"{what}: padding bits must be zero")
    return np.frombuffer(data, dtype=np.uint8)


def unpack_bits(data: bytes, count: int, what: str) -> Bits:
    """Unpack ``count`` bits the peer sent; the length must be exact and the padding zero.

    Raises:
        RemoteProtocolError: wrong byte length or non-zero padding bits.
    """
    return np.unpackbits(check_packed(data, count, what), count=count)


_VARINT_MAX_BYTES = 10  # 64-bit values


def encode_varints(values: npt.NDArray[np.int64] | npt.NDArray[np.uint64]) -> bytes:
    """Unsigned LEB128: seven bits per byte, least significant group first, high bit = more follows.

    Every value's first byte comes from one pass over the array; the further bytes of the (usually
    few) values of 128 and more are computed for those alone and inserted after their first byte.
    """
    v = np.asarray(values)
    if v.size == 0:
        return b""
    if v.dtype != np.uint64:
        v = v.astype(np.uint64)
    out = v.astype(np.uint8)
    out &= 0x7F
    longer = np.flatnonzero(v >= np.uint64(0x80))
    if longer.size == 0:
        return out.tobytes()
    out[longer] |= 0x80
    # the further bytes, a level at a time: level j holds byte j + 1 of the long values that have one
    rest = v[longer] >> np.uint64(7)
    rows = np.arange(longer.size)  # which long value each entry of ``rest`` belongs to
    counts = np.zeros(longer.size, dtype=np.int64)
    levels, owners = [], []
    while rows.size:
        group = (rest & np.uint64(0x7F)).astype(np.uint8)
        rest >>= np.uint64(7)
        more = rest > 0
        group[more] |= 0x80
        levels.append(group)
        owners.append(rows)
        counts[rows] += 1
        rest, rows = rest[more], rows[more]
    # each long value's further bytes in order, inserted right after its first byte
    order = np.argsort(np.concatenate(owners), kind="stable")
    further = np.concatenate(levels)[order]
    return np.insert(out, np.repeat(longer + 1, counts), further).tobytes()


def decode_varints(data: bytes, count: int, what: str) -> npt.NDArray[np.uint64]:
    """Decode exactly ``count`` canonical LEB128 varints that fill ``data`` exactly.

    Raises:
        RemoteProtocolError: truncated data, trailing bytes, wrong count, overlong or over-64-bit values.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if raw.size:
            raise RemoteProtocolError(f"{what}: {raw.size} bytes where no varint was expected")
        return np.zeros(0, dtype=np.uint64)
    final = raw < 0x80  # each varint's last byte
    found = int(np.count_nonzero(final))
    if found != count or raw.size == 0 or raw[-1] >= 0x80:
        raise RemoteProtocolError(f"{what}: expected {count} varints, found {found} (or a truncated one)")
    values = raw[final].astype(np.uint64)  # the most significant group of each value
    if found == raw.size:  # every varint is one byte (the usual case for detection gaps)
        return values
    # the (usually few) multi-byte values: each is a run of continuation bytes and the byte after it
    more = np.flatnonzero(~final)
    ends = np.flatnonzero(np.diff(more) != 1)  # where a run of continuation bytes stops
    run_last = np.append(ends, more.size - 1)
    run_first = np.insert(ends + 1, 0, 0)
    starts = more[run_first]
    row_lengths = run_last - run_first + 2
    rows = more[run_last] + 1 - (run_last + 1)  # the value's index: its last byte's, less the bytes before
    top = values[rows]
    if row_lengths.max() > _VARINT_MAX_BYTES:
        raise RemoteProtocolError(f"{what}: varint longer than {_VARINT_MAX_BYTES} bytes")
    if np.any(top == 0):
        raise RemoteProtocolError(f"{what}: overlong (non-canonical) varint")
    if np.any((row_lengths == _VARINT_MAX_BYTES) & (top > 1)):
        raise RemoteProtocolError(f"{what}: varint exceeds 64 bits")
    values[rows] <<= np.uint64(7) * (row_lengths - 1).astype(np.uint64)
    j = 0
    while rows.size:
        values[rows] |= (raw[starts + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
        j += 1
        longer = row_lengths > j + 1
        rows, row_lengths, starts = rows[longer], row_lengths[longer], starts[longer]
    return values
