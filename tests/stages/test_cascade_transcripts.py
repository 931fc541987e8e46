"""Cascade's exact transcripts: every request Bob sends and every answer Alice gives, for fixed seeds.

The digests were recorded from the code before its hot paths were compiled (commit 5970b7d, all numpy
and a few kernels); any change to what is disclosed, asked, corrected or how many round trips it takes
shows here. A change that means to alter the protocol's choices updates them on purpose and says why.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from qkdd.stages import cascade
from qkdd.stages.cascade import CascadeAlice, CascadeBob, Finished, Parities, RangeRequest, StartPass


def _update(digest: hashlib._Hash, message: cascade.BobMessage | Parities | None) -> None:
    match message:
        case StartPass(index=index, layout=layout):
            digest.update(repr(("start", index, layout)).encode())
        case RangeRequest(passes=passes, starts=starts, ends=ends):
            digest.update(b"ranges")
            for array in (passes, starts, ends):
                digest.update(array.dtype.str.encode() + array.tobytes())
        case Parities(count=count, parities=parities):
            digest.update(repr(("parities", count)).encode() + parities)
        case Finished(disclosed_bits=bits):
            digest.update(repr(("finished", bits)).encode())
        case _:
            raise AssertionError(f"unexpected {message!r}")


def _transcript(variant: str, n: int, qber: float, seed: int, prepare: bool) -> tuple[str, int, int, int]:
    """Drive both roles as the engine does (flights, Bob's parities built ahead when ``prepare``); the
    transcript's digest with Bob's corrected key, disclosed bits and round trips."""
    rng = np.random.default_rng([seed, n, round(qber * 1e6)])
    alice_key = rng.integers(0, 2, n, dtype=np.uint8)
    bob_key = alice_key.copy()
    bob_key[rng.choice(n, round(n * qber), replace=False)] ^= 1
    alice, bob = CascadeAlice(alice_key), CascadeBob(bob_key, qber, rng, variant=variant)
    digest = hashlib.sha256()
    while True:
        flight = bob.outgoing()
        if prepare:
            bob.prepare()
        for message in flight:
            _update(digest, message)
        if isinstance(flight[-1], Finished):
            assert alice.handle(flight[-1]) is None
            break
        for message in flight:
            reply = alice.handle(message)
            _update(digest, reply)
            assert reply is not None
            bob.receive(reply)
    result = bob.result()
    digest.update(np.packbits(result.key).tobytes())
    return digest.hexdigest()[:16], result.disclosed_bits, result.corrected_bits, result.round_trips


GOLDEN = {
    ("original", 16384, 0.02, 1): ("6608d567ceee4f12", 2672, 328, 68),
    ("biconf", 16384, 0.02, 1): ("30148740186b5c68", 2526, 328, 80),
    ("optimized", 16384, 0.02, 1): ("ae2abeb5b20ee809", 2501, 328, 135),
    ("fast", 16384, 0.02, 1): ("54dec2cad4209d80", 2508, 328, 68),
    ("parallel", 16384, 0.02, 1): ("306705319c658f74", 2514, 328, 68),
    ("optimized", 100003, 0.01, 2): ("4e3f03f91d62770d", 8307, 1000, 433),
    ("parallel", 300007, 0.03, 2): ("01bdf69126bebd46", 61251, 9000, 192),
    ("parallel", 1048576, 0.02, 3): ("a9228500f3d3b046", 156973, 20972, 109),
    ("parallel", 1048576, 0.005, 4): ("27a12137b88aaced", 50417, 5243, 93),
    ("parallel", 262144, 0.08, 5): ("cb34281affb8d152", 115262, 20972, 154),
    ("fast", 1048576, 0.01, 6): ("5fa3b28782b55600", 88544, 10486, 129),
    ("parallel", 65536, 0.01, 7): ("b30afa033a991a5d", 5493, 655, 128),
    ("parallel", 1000, 0.05, 8): ("9a488cd7be0abb0b", 391, 50, 12),
    ("biconf", 70001, 0.05, 9): ("2cdd7313548e6e9b", 21858, 3500, 158),
}


@pytest.mark.parametrize(("variant", "n", "qber", "seed"), sorted(GOLDEN))
def test_transcripts_are_unchanged(variant: str, n: int, qber: float, seed: int) -> None:
    expected = GOLDEN[variant, n, qber, seed]
    for prepare in (False, True):
        assert _transcript(variant, n, qber, seed, prepare) == expected
