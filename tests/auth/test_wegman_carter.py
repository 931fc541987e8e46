"""The Wegman–Carter MAC (qkdp-v1.md §16): fast hash = reference hash = vectors; tags detect changes."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from qkdd.auth import wegman_carter as wc
from tests.conftest import load_vectors


@given(st.binary(max_size=300), st.integers(0, wc.PRIME - 1))
def test_fast_hash_equals_reference(message: bytes, key: int) -> None:
    assert wc.polynomial_hash(message, key) == wc.polynomial_hash_reference(message, key)


def test_large_message_and_extreme_keys() -> None:
    message = np.random.default_rng(3).bytes(100_003)
    for key in (0, 1, 2, wc.PRIME - 1, 0x1234_5678_9ABC_DEF):
        assert wc.polynomial_hash(message, key) == wc.polynomial_hash_reference(message, key)
    # the largest blocks (2^56 - 1) times the largest powers: the unreduced products and their row sums
    # come closest to 2^64 here
    largest = b"\xff" * (7 * wc.CHUNK + 5)
    for key in (wc.PRIME - 1, wc.PRIME - 2):
        assert wc.polynomial_hash(largest, key) == wc.polynomial_hash_reference(largest, key)


def test_vectors() -> None:
    for v in load_vectors("wegman_carter"):
        message = bytes.fromhex(v["message"])
        assert wc.polynomial_hash(message, v["key"]) == v["hash"]
        assert wc.tag(message, v["keys"], v["pads"]).hex() == v["tag"]


def test_any_flipped_bit_changes_the_tag() -> None:
    rng = np.random.default_rng(9)
    message = bytearray(rng.bytes(1000))
    keys, pads = [int(k) for k in rng.integers(1, wc.PRIME, 2)], [5, 7]
    reference = wc.tag(bytes(message), keys, pads)
    for position in rng.integers(0, 8 * len(message), 50):
        flipped = bytearray(message)
        flipped[position // 8] ^= 0x80 >> (position % 8)
        assert wc.tag(bytes(flipped), keys, pads) != reference
    assert wc.tag(bytes(message) + b"\x00", keys, pads) != reference  # length counts


def test_split_bits_and_bound() -> None:
    bits = (1 << 127).to_bytes(16, "big")  # the first bit set
    assert wc.split_bits(bits, 2) == [1 << 60, 0]
    assert wc.forgery_bound(wc.MAX_TRANSCRIPT_BYTES) < 2.0**-71
