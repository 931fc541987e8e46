"""Regenerate the test vectors in this folder: ``python protocol/vectors/make_vectors.py``.

Toeplitz outputs come from the direct GF(2) matrix-vector product (not the FFT path), confirmation tags
from the plain Horner definition, so the vectors pin the convention independently of the fast code.
Inputs are drawn from fixed seeds; bit strings are hex of the MSB-first packing, with a bit count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qkdd.bits import encode_varints, pack_bits
from qkdd.stages import amplify, confirm

HERE = Path(__file__).parent


def bits_hex(bits: np.ndarray) -> str:
    return pack_bits(bits.astype(np.uint8)).hex()


def toeplitz_vectors() -> list[dict[str, object]]:
    vectors = []
    for index, (n, m) in enumerate([(1, 1), (4, 2), (16, 8), (100, 37), (1000, 500), (4099, 1)]):
        rng = np.random.default_rng([7, index])
        key = rng.integers(0, 2, n, dtype=np.uint8)
        seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
        out = amplify.toeplitz_hash_rows(key, seed, m, np.arange(m))
        vectors.append(
            {
                "input_bits": n,
                "output_bits": m,
                "key": bits_hex(key),
                "seed": bits_hex(seed),
                "output": bits_hex(out),
            }
        )
    return vectors


def confirm_vectors() -> list[dict[str, object]]:
    vectors = []
    for index, n in enumerate([0, 1, 87, 88, 89, 1000, 65536]):
        rng = np.random.default_rng([8, index])
        key = rng.integers(0, 2, n, dtype=np.uint8)
        hash_key = int.from_bytes(rng.bytes(12), "big") % confirm.PRIME
        vectors.append(
            {
                "key_bits": n,
                "key": bits_hex(key),
                "hash_key": f"{hash_key:x}",
                "tag": f"{confirm.polynomial_hash(key, hash_key):x}",
            }
        )
    return vectors


def varint_vectors() -> list[dict[str, object]]:
    values = [0, 1, 127, 128, 255, 300, 16383, 16384, 2**32 - 1, 2**63, 2**64 - 1]
    return [{"value": v, "encoded": encode_varints(np.array([v], dtype=np.uint64)).hex()} for v in values]


def main() -> None:
    for name, vectors in (
        ("toeplitz", toeplitz_vectors()),
        ("confirm", confirm_vectors()),
        ("varint", varint_vectors()),
    ):
        (HERE / f"{name}.json").write_text(json.dumps(vectors, indent=1) + "\n")


if __name__ == "__main__":
    main()
