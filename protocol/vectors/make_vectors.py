"""Regenerate the test vectors in this folder: ``python protocol/vectors/make_vectors.py``.

Toeplitz outputs come from the direct GF(2) matrix-vector product (not the FFT path), confirmation tags
from the plain Horner definition, so the vectors pin the convention independently of the fast code.
Inputs are drawn from fixed seeds; bit strings are hex of the MSB-first packing, with a bit count.
"""

from __future__ import annotations

import hmac
import json
import uuid
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


KEY_ID_NAMESPACE = uuid.UUID("5b0e3f1c-6a8e-4a43-9c71-3d0f6f2a9b11")  # qkdp-v2.md §14


def key_id_vectors() -> list[dict[str, object]]:
    cases = [("qkdd-link", 0, 0), ("qkdd-link", 0, 1), ("qkdd-link", 17, 4095), ("lab/ü", 2**40, 7)]
    return [
        {
            "link_id": link,
            "round": r,
            "index": i,
            "name": f"qkdp/1 key {link} {r} {i}",
            "key_id": str(uuid.uuid5(KEY_ID_NAMESPACE, f"qkdp/1 key {link} {r} {i}")),
        }
        for link, r, i in cases
    ]


def psk_vectors() -> list[dict[str, object]]:
    """§12 from its definition with hashlib/hmac and the RFC 5869 HKDF steps written out."""
    import hashlib  # noqa: PLC0415

    def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
        prk = hmac.new(salt, ikm, hashlib.sha256).digest()
        return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()

    psk = bytes(range(32))
    hello_alice, hello_bob = b"\x81\xa4type\xa5hello", b"\x81\xa4type\xa5hellp"
    nonce_alice, nonce_bob = bytes([1]) * 32, bytes([2]) * 32
    t = hashlib.sha256(hashlib.sha256(hello_alice).digest() + hashlib.sha256(hello_bob).digest()).digest()
    k_alice = hkdf(psk, nonce_alice + nonce_bob, b"qkdp/1 mac alice->bob " + t)
    k_bob = hkdf(psk, nonce_alice + nonce_bob, b"qkdp/1 mac bob->alice " + t)
    body = b"\x81\xa4type\xa5abort"
    return [
        {
            "psk": psk.hex(),
            "hello_alice": hello_alice.hex(),
            "hello_bob": hello_bob.hex(),
            "nonce_alice": nonce_alice.hex(),
            "nonce_bob": nonce_bob.hex(),
            "transcript": t.hex(),
            "proof_alice": hmac.new(psk, b"qkdp/1 auth alice " + t, hashlib.sha256).hexdigest(),
            "proof_bob": hmac.new(psk, b"qkdp/1 auth bob " + t, hashlib.sha256).hexdigest(),
            "mac_key_alice": k_alice.hex(),
            "mac_key_bob": k_bob.hex(),
            "seq": 5,
            "body": body.hex(),
            "mac_alice": hmac.new(k_alice, (5).to_bytes(8, "big") + body, hashlib.sha256).hexdigest(),
            # §19: the key channel's MAC key of Alice's direction, HKDF-Expand of her frame MAC key
            "channel_key_alice": hmac.new(k_alice, b"qkdp/1 channel keys\x01", hashlib.sha256).hexdigest(),
        }
    ]


def framing_vectors() -> list[dict[str, object]]:
    """§9: 4-byte big-endian length, then the envelope map {seq, body, mac, tag} in that order."""
    import msgpack  # noqa: PLC0415

    cases = [
        (0, {"type": "abort", "round": 0, "reason": ""}, b"", b""),
        (2, {"type": "committed", "round": 7}, bytes(range(32)), b""),
        (1 << 40, {"type": "commit", "round": 1 << 62, "blocks": 3}, b"\xff" * 32, bytes(16)),
    ]
    out: list[dict[str, object]] = []
    for seq, message, mac, tag in cases:
        body = msgpack.packb(message, use_bin_type=True)
        envelope = msgpack.packb({"seq": seq, "body": body, "mac": mac, "tag": tag}, use_bin_type=True)
        frame = len(envelope).to_bytes(4, "big") + envelope
        out.append(
            {
                "seq": seq,
                "message": message,
                "body": body.hex(),
                "mac": mac.hex(),
                "tag": tag.hex(),
                "frame": frame.hex(),
            }
        )
    return out


def wegman_carter_vectors() -> list[dict[str, object]]:
    """§16 from its Horner definition."""
    from qkdd.auth import wegman_carter as wc  # noqa: PLC0415

    rng = np.random.default_rng(2016)
    out: list[dict[str, object]] = []
    for size in (0, 1, 6, 7, 8, 100, 1001):
        message = rng.bytes(size)
        keys = [int(k) for k in rng.integers(1, wc.PRIME, 2)]
        pads = [int(r) for r in rng.integers(0, wc.PRIME, 2)]
        key = keys[0]
        tag = b"".join(
            ((wc.polynomial_hash_reference(message, k) + r) % wc.PRIME).to_bytes(8, "big")
            for k, r in zip(keys, pads, strict=True)
        )
        out.append(
            {
                "message": message.hex(),
                "key": key,
                "hash": wc.polynomial_hash_reference(message, key),
                "keys": keys,
                "pads": pads,
                "tag": tag.hex(),
            }
        )
    return out


def main() -> None:
    for name, vectors in (
        ("toeplitz", toeplitz_vectors()),
        ("confirm", confirm_vectors()),
        ("varint", varint_vectors()),
        ("key_ids", key_id_vectors()),
        ("psk", psk_vectors()),
        ("framing", framing_vectors()),
        ("wegman_carter", wegman_carter_vectors()),
    ):
        (HERE / f"{name}.json").write_text(json.dumps(vectors, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
