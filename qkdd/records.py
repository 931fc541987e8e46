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
    name = f"qkdp/1 key {link_id} {round_number} {index}".encode()
    digest = bytearray(hashlib.sha1(_NAMESPACE + name).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 9562 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_NAMESPACE = KEY_ID_NAMESPACE.bytes


def key_ids(link_id: str, round_number: int, count: int) -> list[str]:
    """The IDs of blocks 0 … count − 1 of a round (:func:`key_id`)."""
    return [key_id(link_id, round_number, i) for i in range(count)]


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
    names += [key_id(link_id, round_number, i) for i in range(len(names), count)]
    return [(names[i], packed[i * size : (i + 1) * size].tobytes()) for i in range(count)]
