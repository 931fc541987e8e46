from __future__ import annotations

import numpy as np
import pytest

from qkdd.errors import RemoteProtocolError
from qkdd.stages import confirm
from tests.conftest import hex_bits, load_vectors


def test_vectors() -> None:
    for vector in load_vectors("confirm"):
        key = hex_bits(vector["key"], vector["key_bits"])
        assert confirm.polynomial_hash(key, int(vector["hash_key"], 16)) == int(vector["tag"], 16)


ROW = confirm.ROW_BLOCKS * 88


@pytest.mark.parametrize(
    "n",
    [
        0,
        1,
        87,
        88,
        89,
        8 * 88 - 1,
        8 * 88,
        8 * 88 + 1,
        16 * 88 + 5,
        100_000,
        ROW,
        ROW + 1,
        3 * ROW + 8 * 88 + 5,
    ],
)
def test_grouped_hash_equals_the_definition(n: int, rng: np.random.Generator) -> None:
    key = rng.integers(0, 2, n, dtype=np.uint8)
    for hash_key in (0, 1, confirm.PRIME - 1, int(rng.integers(0, 2**62)) * 3):
        assert confirm.polynomial_hash(key, hash_key) == confirm.polynomial_hash_reference(key, hash_key)


def test_rows_of_the_largest_blocks_and_powers_hash_exactly() -> None:
    """The float64 row products' sums come closest to 2^53 with every bit set and hash keys near p."""
    key = np.ones(2 * ROW + 100, dtype=np.uint8)
    for hash_key in (confirm.PRIME - 1, confirm.PRIME - 2, (1 << 88) + (1 << 60) - 1):
        assert confirm.polynomial_hash(key, hash_key) == confirm.polynomial_hash_reference(key, hash_key)


def test_equal_keys_match_and_any_flip_is_caught(rng: np.random.Generator) -> None:
    key = rng.integers(0, 2, 5000, dtype=np.uint8)
    request = confirm.alice_confirm(key, rng)
    assert confirm.bob_confirm(key.copy(), request).matched
    for position in rng.choice(key.size, 20, replace=False):
        other = key.copy()
        other[position] ^= 1
        assert not confirm.bob_confirm(other, request).matched


def test_length_is_bound_into_the_tag() -> None:
    # trailing zero bits pad to the same blocks; the appended length keeps the tags apart
    short = np.array([1, 0, 1], dtype=np.uint8)
    longer = np.array([1, 0, 1, 0], dtype=np.uint8)
    assert confirm.polynomial_hash(short, 12345) != confirm.polynomial_hash(longer, 12345)


def test_out_of_field_values_are_rejected() -> None:
    key = np.zeros(8, dtype=np.uint8)
    with pytest.raises(RemoteProtocolError, match="GF"):
        confirm.bob_confirm(key, confirm.ConfirmRequest(confirm.PRIME, 0))
    with pytest.raises(RemoteProtocolError, match="GF"):
        confirm.bob_confirm(key, confirm.ConfirmRequest(1, -1))


def test_collision_bound_is_small() -> None:
    assert confirm.collision_bound(1 << 24) < 2**-66
    assert confirm.TAG_BITS >= 64
