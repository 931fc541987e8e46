from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

from qkdd import engine, policy
from qkdd.auth import wegman_carter as wc
from qkdd.handshake import Handshake

VECTORS = Path(__file__).resolve().parent.parent / "protocol" / "vectors"

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("stress", max_examples=2000, deadline=None)
settings.load_profile("stress" if os.environ.get("QKDD_STRESS") else "ci")

STRESS = bool(os.environ.get("QKDD_STRESS"))


def load_vectors(name: str) -> Any:
    return json.loads((VECTORS / f"{name}.json").read_text())


def hex_bits(text: str, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8), count=count)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def pads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, str]]]:
    """Every reserve range a side takes for one use: a sender's one-time pad for a tag, Alice's new
    handshake key; (first bit, past bit, what), across all connections. They must never overlap (I1)."""
    used: list[tuple[int, int, str]] = []
    round_tag, announce_key = engine.Engine._round_tag, Handshake.announce_key

    def tag(self: engine.Engine, r: Any, message: str) -> bytes:
        tagged = round_tag(self, r, message)
        position = self._pad_position(r, message)
        used.append((position, position + wc.OTP_BITS, f"{self.role} tag"))
        return tagged

    def announce(self: Handshake) -> list[int]:
        before = self.keys.next
        announced = announce_key(self)
        if self.keys.next != before and self.keys.next is not None:
            used.append((self.keys.next, self.keys.next + policy.HANDSHAKE_KEY_BITS, "handshake key"))
        return announced

    monkeypatch.setattr(engine.Engine, "_round_tag", tag)
    monkeypatch.setattr(Handshake, "announce_key", announce)
    yield used
    spans = sorted(used)
    overlaps = [(a, b) for a, b in itertools.pairwise(spans) if a[1] > b[0]]
    assert not overlaps, f"reserve bits used twice (I1): {overlaps}"
