"""Bootstrap authentication with a pre-shared key (protocol/qkdp-v2.md §12).

Theory of operation
-------------------
Each side opens with a ``hello`` carrying a fresh 32-byte nonce. Once both hellos are in, each side sends
``auth`` with ``proof = HMAC-SHA256(PSK, "qkdp/1 auth " ‖ role ‖ SHA-256(hello_alice) ‖
SHA-256(hello_bob))``, computed over the exact body bytes of the two hellos. The PSK never crosses the
wire. Naming the prover's role defeats reflection (Alice's proof is useless as Bob's); hashing both
hellos, with both nonces, defeats replay from another connection and binds the negotiated version and
capabilities, so a downgrade of either hello makes the proofs fail.

After the proofs, every frame carries a MAC under a session key of its direction, derived by HKDF-SHA256
(RFC 5869) from the PSK with salt ``nonce_alice ‖ nonce_bob`` and info ``"qkdp/1 mac " ‖ direction ‖
transcript hash``. The MAC is HMAC-SHA256 over the 8-byte big-endian sequence number and the message
body; the engine accepts only the next sequence number of each direction, which rejects replay,
reordering and loss. Distinct keys per direction reject reflection of authenticated frames.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from qkdd.errors import InputError, RemoteProtocolError

PSK_BYTES = 32
MIN_PSK_BYTES = 16
MAC_BYTES = 32
CAPABILITY = "psk"


def transcript_hash(hello_alice: bytes, hello_bob: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(hello_alice).digest() + hashlib.sha256(hello_bob).digest()).digest()


def proof(psk: bytes, role: str, transcript: bytes) -> bytes:
    """The bootstrap proof of ``role`` for the hello transcript."""
    return hmac.new(psk, b"qkdp/1 auth " + role.encode() + b" " + transcript, hashlib.sha256).digest()


def verify_proof(psk: bytes, role: str, transcript: bytes, claimed: bytes) -> None:
    if not hmac.compare_digest(proof(psk, role, transcript), claimed):
        raise RemoteProtocolError(f"the {role} proof does not verify", code="auth-failed")


@dataclass(frozen=True, slots=True)
class FrameMac:
    """HMAC-SHA256 over (seq, body) under one direction's session key."""

    key: bytes

    def tag(self, seq: int, body: bytes) -> bytes:
        return hmac.digest(self.key, seq.to_bytes(8, "big") + body, "sha256")

    def verify(self, seq: int, body: bytes, mac: bytes) -> None:
        if not hmac.compare_digest(self.tag(seq, body), mac):
            raise RemoteProtocolError(f"frame {seq}: MAC does not verify", code="bad-mac")

    def derive(self, label: bytes) -> FrameMac:
        """The MAC of another channel of the same direction: HKDF-Expand (RFC 5869) of this key."""
        return FrameMac(HKDFExpand(algorithm=hashes.SHA256(), length=32, info=label).derive(self.key))


def session_macs(psk: bytes, nonce_alice: bytes, nonce_bob: bytes, transcript: bytes) -> dict[str, FrameMac]:
    """The MAC of each direction, keyed ``"alice"`` (frames Alice sends) and ``"bob"``."""
    macs = {}
    for sender, direction in (("alice", b"alice->bob"), ("bob", b"bob->alice")):
        key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=nonce_alice + nonce_bob,
            info=b"qkdp/1 mac " + direction + b" " + transcript,
        ).derive(psk)
        macs[sender] = FrameMac(key)
    return macs


FINGERPRINT_LABEL = b"qkdd psk fingerprint v1\x00"
"""Domain separation: no proof, MAC or key of the protocol is a hash of the PSK under this label."""


def fingerprint(psk: bytes) -> str:
    """A short public name of a PSK (64 bits of a labelled SHA-256), for comparing two hosts' PSK files
    without showing either; it reveals nothing usable about a key of 128 bits or more."""
    digest = hashlib.sha256(FINGERPRINT_LABEL + psk).hexdigest()[:16]
    return "-".join(digest[i : i + 4] for i in range(0, 16, 4))


def generate_psk() -> bytes:
    return os.urandom(PSK_BYTES)


def write_psk(path: Path, psk: bytes) -> None:
    """Write a PSK file (hex, one line) readable by its owner only; refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(psk.hex() + "\n")


def read_psk(path: Path) -> bytes:
    """Read a PSK file written by :func:`write_psk` (hex). Errors name the file, never its content."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as error:
        raise InputError(f"auth.psk_file: cannot read {path}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(f"auth.psk_file: {path} is readable by others; chmod 600 it")
    try:
        psk = bytes.fromhex(text)
    except ValueError:
        raise InputError(f"auth.psk_file: {path} must hold the key as one line of hex") from None
    if len(psk) < MIN_PSK_BYTES:
        raise InputError(f"auth.psk_file: {path} holds {len(psk)} bytes; at least {MIN_PSK_BYTES} needed")
    return psk
