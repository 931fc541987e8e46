from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdd.bits import (
    SystemRandom,
    as_bits,
    as_index_array,
    decode_varints,
    encode_varints,
    pack_bits,
    random_below,
    random_bits,
    unpack_bits,
)
from qkdd.errors import InputError, RemoteProtocolError
from tests.conftest import load_vectors


@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=200))
def test_varints_round_trip(values: list[int]) -> None:
    array = np.array(values, dtype=np.uint64)
    assert decode_varints(encode_varints(array), len(values), "t").tolist() == values


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        group, value = value & 0x7F, value >> 7
        out.append(group | (0x80 if value else 0))
        if not value:
            return bytes(out)


@given(
    st.lists(st.one_of(st.integers(0, 127), st.integers(128, 2**21), st.integers(0, 2**64 - 1)), max_size=200)
)
def test_varints_match_a_per_value_encoder(values: list[int]) -> None:
    """Mostly one-byte values with a few long ones between them, as detection gaps are."""
    encoded = encode_varints(np.array(values, dtype=np.uint64))
    assert encoded == b"".join(_leb128(v) for v in values)


def test_varint_vectors() -> None:
    for vector in load_vectors("varint"):
        encoded = encode_varints(np.array([vector["value"]], dtype=np.uint64))
        assert encoded.hex() == vector["encoded"]
        assert int(decode_varints(bytes.fromhex(vector["encoded"]), 1, "t")[0]) == vector["value"]


@pytest.mark.parametrize(
    ("data", "count", "message"),
    [
        (b"\x80", 1, "truncated"),
        (b"\x01\x02", 1, "expected 1 varints"),
        (b"\x01", 2, "expected 2 varints"),
        (b"\x80\x00", 1, "overlong"),
        (b"\xff" * 10 + b"\x01", 1, "longer than"),
        (b"\xff" * 9 + b"\x02", 1, "exceeds 64 bits"),
        (b"\x00", 0, "no varint was expected"),
    ],
)
def test_varint_decode_rejects(data: bytes, count: int, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_varints(data, count, "t")


def test_unpack_checks_length_and_padding() -> None:
    assert unpack_bits(pack_bits(np.array([1, 0, 1], dtype=np.uint8)), 3, "t").tolist() == [1, 0, 1]
    with pytest.raises(RemoteProtocolError, match="expected 1 bytes"):
        unpack_bits(b"\x00\x00", 3, "t")
    with pytest.raises(RemoteProtocolError, match="padding"):
        unpack_bits(b"\xff", 3, "t")
    with pytest.raises(RemoteProtocolError, match="padding"):
        unpack_bits(b"\x00\xa1", 11, "t")  # only the last padding bit is set
    assert unpack_bits(b"\x00\xa0", 11, "t").tolist() == [0] * 8 + [1, 0, 1]
    assert unpack_bits(b"\xff", 8, "t").tolist() == [1] * 8
    assert unpack_bits(b"", 0, "t").size == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros((2, 2), dtype=np.uint8), "1-D"),
        (np.array([0.0, 1.0]), "dtype"),
        (np.array([0, 2]), "0 or 1"),
        (np.array([-1, 0]), "0 or 1"),
    ],
)
def test_as_bits_rejects(value: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        as_bits(value, "x")


def test_as_bits_accepts_bool_and_ints() -> None:
    assert as_bits(np.array([True, False]), "x").dtype == np.uint8
    assert as_bits(np.array([1, 0], dtype=np.int64), "x").tolist() == [1, 0]


def test_index_array_bounds() -> None:
    with pytest.raises(InputError, match="lie in"):
        as_index_array(np.array([0, 5]), "i", bound=5)
    with pytest.raises(InputError, match="integer dtype"):
        as_index_array(np.array([0.5]), "i")


def test_random_helpers() -> None:
    source = SystemRandom()
    assert random_bits(source, 13).size == 13
    draws = {random_below(source, 3) for _ in range(200)}
    assert draws == {0, 1, 2}
    with pytest.raises(InputError):
        random_below(source, 0)
