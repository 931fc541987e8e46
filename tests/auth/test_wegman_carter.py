"""The Wegman–Carter MAC (qkdp-v2.md §16): fast hash = reference hash = vectors; tags detect changes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
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


CHUNK_BYTES = wc.CHUNK * wc.BLOCK_BYTES


@given(
    st.lists(st.integers(0, 3 * CHUNK_BYTES), max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.integers(1, wc.PRIME - 1),
)
def test_transcript_hashed_as_it_grows_tags_like_the_whole(
    sizes: list[int], absorb_after: list[bool], key: int
) -> None:
    """Frames of any sizes (chunk boundaries anywhere), absorbed after any of them: the same tag as the
    whole transcript's."""
    rng = np.random.default_rng(len(sizes))
    frames = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]
    mac = wc.Mac([key, wc.PRIME - key])
    transcript = wc.Transcript(mac)
    for frame, absorb in zip(frames, absorb_after, strict=False):
        transcript.append(frame)
        if absorb:
            transcript.absorb()
    pads = [5, wc.PRIME - 1]
    assert transcript.length == sum(sizes)
    assert transcript.tag(pads) == mac.tag(b"".join(frames), pads)


def test_transcript_chunks_with_the_largest_bytes_and_keys_hash_exactly() -> None:
    """The float64 chunk products' sums come closest to 2^53 with every byte 0xFF and powers near p."""
    message = b"\xff" * (5 * CHUNK_BYTES + 3)
    for keys in ([wc.PRIME - 1, wc.PRIME - 2], [1, 0], [(1 << 31) - 1, (1 << 60) + (1 << 31)]):
        transcript = wc.Transcript(wc.Mac(keys))
        transcript.append(message)
        expected = [(wc.polynomial_hash_reference(message, k) + 9) % wc.PRIME for k in keys]
        assert transcript.tag([9, 9]) == b"".join(v.to_bytes(8, "big") for v in expected)


def test_transcript_chunks_hashed_on_other_threads_while_frames_come() -> None:
    """Each piece of work take_chunks hands out runs on a thread while more frames are appended; its
    result comes back later; the tag is the whole transcript's."""
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, int(size), dtype=np.uint8).tobytes() for size in rng.integers(1, 4e5, 40)]
    mac = wc.Mac([12345, 67890])
    transcript = wc.Transcript(mac)
    results: list[list[int]] = []
    worker: threading.Thread | None = None
    for i, frame in enumerate(frames):
        transcript.append(frame)
        if worker is not None and i % 3 == 0:  # its result comes back a few frames later
            worker.join(timeout=30)
            transcript.absorbed(results.pop())
            worker = None
        if worker is None and (work := transcript.take_chunks()) is not None:
            worker = threading.Thread(target=lambda work=work: results.append(work()))
            worker.start()
    if worker is None:  # one more whole chunk, out on a thread at the end
        frames.append(bytes(wc.Transcript.CHUNK_BYTES))
        transcript.append(frames[-1])
        last = transcript.take_chunks()
        assert last is not None
        worker = threading.Thread(target=lambda: results.append(last()))
        worker.start()
    assert transcript.hashing
    with pytest.raises(ValueError, match="not back yet"):
        transcript.tag([1, 2])
    worker.join(timeout=30)
    transcript.absorbed(results.pop())
    assert transcript.tag([1, 2]) == mac.tag(b"".join(frames), [1, 2])
    assert transcript.unabsorbed < wc.Transcript.CHUNK_BYTES
    with pytest.raises(ValueError, match="no chunks"):
        transcript.absorbed([0, 0])


def test_transcript_without_a_mac_only_counts() -> None:
    transcript = wc.Transcript(None)
    transcript.append(b"abc")
    transcript.absorb()
    assert transcript.length == 3 and transcript.unabsorbed == 0
    with pytest.raises(ValueError, match="no tag"):
        transcript.tag([1, 2])
