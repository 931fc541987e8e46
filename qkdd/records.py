"""What a round leaves behind, shared by the engine (which produces it) and the store (which keeps it)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qkdd.bits import Bits, pack_bits

KEY_ID_NAMESPACE = uuid.UUID("5b0e3f1c-6a8e-4a43-9c71-3d0f6f2a9b11")
"""UUIDv5 namespace of key IDs (protocol/qkdp-v2.md §14)."""


@dataclass(frozen=True, slots=True)
class RoundSummary:
    """One round's public figures (never key material)."""

    round: int
    frame: int
    pulses: int
    detections: int
    sifted_bits: int
    qber: float | None
    phase_error: float | None
    disclosed_bits: int
    secret_bits: int
    aborted: bool
    reason: str | None
    auth: str
    reconciled_bits: int = 0  # the key Cascade corrected (0 before reconciliation): for its efficiency

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def key_id(link_id: str, round_number: int, index: int) -> str:
    """The ID both sides give block ``index`` of round ``round_number`` (UUIDv5, RFC 9562 §5.5; §14)."""
    return key_ids(link_id, round_number, 1, index)[0]


_NAMESPACE = KEY_ID_NAMESPACE.bytes
_VARIANT = {f"{n:x}": "89ab"[n & 3] for n in range(16)}
"""A hex digit of byte 8's high nibble, with the RFC 9562 variant (binary 10) in its top two bits."""


def key_ids(link_id: str, round_number: int, count: int, first: int = 0) -> list[str]:
    """The IDs of blocks ``first`` … ``first + count − 1`` of a round (:func:`key_id`). The SHA-1 of the
    shared prefix is taken once (a round has thousands of blocks), and version and variant are written
    into the hex digits: the version nibble is the 13th digit, the variant the top bits of the 17th."""
    prefix = hashlib.sha1(_NAMESPACE + f"qkdp/1 key {link_id} {round_number} ".encode())
    ids = []
    for index in range(first, first + count):
        name = prefix.copy()
        name.update(b"%d" % index)
        h = name.hexdigest()
        ids.append(f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}")
    return ids


def key_blocks(
    link_id: str, round_number: int, key: Bits, block_bits: int, ids: Sequence[str] = ()
) -> list[tuple[str, bytes]]:
    """Split a round's final key into whole blocks of ``block_bits`` bits (the tail is discarded). ``ids``
    may hold the first blocks' IDs, computed ahead (:func:`key_ids`); the rest are computed here."""
    if block_bits <= 0 or block_bits % 8:
        raise ValueError("key block size must be a positive multiple of 8 bits")
    count = key.size // block_bits
    packed = np.frombuffer(pack_bits(key[: count * block_bits]), dtype=np.uint8)
    size = block_bits // 8
    names = list(ids[:count])
    names += key_ids(link_id, round_number, count - len(names), len(names))
    return [(names[i], packed[i * size : (i + 1) * size].tobytes()) for i in range(count)]
