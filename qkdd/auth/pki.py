"""PKI bootstrap: a CA, node certificates, and the signed hybrid key exchange (qkdp-v2.md §18).

Theory of operation
-------------------
* ``qkdd pki init-ca`` makes a self-signed CA; ``qkdd pki issue`` a node certificate (common name =
  the node's name) signed by it. Keys are ML-DSA-65 (FIPS 204, post-quantum) by default, or Ed25519.
* The key delivery API (ETSI GS QKD 014, :mod:`qkdd.delivery`) runs over ordinary TLS, whose libraries
  do not verify ML-DSA yet: its CA is ECDSA P-256 (or Ed25519), made by ``init-ca --algorithm
  ecdsa-p256``; ``issue-sae`` and ``issue-kme`` issue its client and server certificates.
* Handshake, after both hellos (T = the hello transcript hash of §12):
  Alice sends ``auth{certificate, kex = X25519 public ‖ ML-KEM-768 encapsulation key,
  proof = Sign_A("qkdp/1 pki alice" ‖ T ‖ kex_A)}``. Bob checks her certificate (issued by the configured
  CA, inside its validity period, common name = the configured peer name) and her signature, encapsulates
  to her ML-KEM key, and answers ``auth{certificate, kex = X25519 public ‖ ML-KEM ciphertext,
  proof = Sign_B("qkdp/1 pki bob" ‖ T ‖ kex_A ‖ kex_B)}``; Alice checks the same of Bob.
* The session MAC keys of §12 come from HKDF over X25519 shared secret ‖ ML-KEM shared secret (a hybrid:
  secure if either exchange is), with the nonces as salt and T ‖ kex_A ‖ kex_B in the info, so they are
  bound to the signatures. The first MAC'd frame (``sync``) confirms that both derived the same keys.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, mlkem, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from qkdd.errors import InputError, RemoteProtocolError

ALGORITHMS = ("ml-dsa-65", "ed25519")
TLS_ALGORITHMS = ("ecdsa-p256", "ed25519")
CAPABILITY = "pki"
X25519_BYTES = 32
MLKEM_EK_BYTES = 1184
MLKEM_CT_BYTES = 1088

SigningKey = mldsa.MLDSA65PrivateKey | ed25519.Ed25519PrivateKey
AnyKey = SigningKey | ec.EllipticCurvePrivateKey


def _generate(algorithm: str) -> AnyKey:
    if algorithm == "ml-dsa-65":
        return mldsa.MLDSA65PrivateKey.generate()
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    known = dict.fromkeys((*ALGORITHMS, *TLS_ALGORITHMS))
    raise InputError(f"--algorithm: expected one of {', '.join(known)}, got {algorithm!r}")


def _digest(key: AnyKey) -> hashes.SHA256 | None:
    """The hash a certificate signature by ``key`` needs (none: the algorithm hashes by itself)."""
    return hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _save(out: Path, stem: str, key: AnyKey, certificate: x509.Certificate) -> None:
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in (out / f"{stem}.key", out / f"{stem}.crt"):
        if path.exists():
            raise InputError(f"{path} exists; not overwriting it")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(out / f"{stem}.key", pem)
    (out / f"{stem}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def init_ca(out: Path, *, algorithm: str = "ml-dsa-65", name: str = "qkdd CA", days: int = 3650) -> Path:
    """A self-signed CA: ``out/ca.key`` (0600) and ``out/ca.crt``; returns the certificate path."""
    key = _generate(algorithm)
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, _digest(key))
    )
    _save(out, "ca", key, certificate)
    return out / "ca.crt"


def issue(
    name: str,
    ca: Path,
    out: Path,
    *,
    algorithm: str = "ml-dsa-65",
    days: int = 825,
    not_before: datetime.datetime | None = None,
    usage: str | None = None,
    hosts: tuple[str, ...] = (),
) -> Path:
    """A node certificate ``out/NAME.crt`` (and ``NAME.key``, 0600) signed by the CA in ``ca``.

    ``usage`` ``"client"`` (an SAE) or ``"server"`` (a KME, valid for ``hosts``) makes a TLS certificate
    of the key delivery API; ``None`` a node certificate of the PKI bootstrap.
    """
    ca_key = load_private_key(ca / "ca.key")
    ca_certificate = load_certificate(ca / "ca.crt")
    if usage is not None:
        if algorithm not in TLS_ALGORITHMS:
            raise InputError(f"--algorithm: TLS certificates use one of {', '.join(TLS_ALGORITHMS)}")
        if isinstance(ca_key, mldsa.MLDSA65PrivateKey):
            raise InputError(
                f"{ca}: an ML-DSA CA cannot sign TLS certificates that TLS libraries verify today; "
                "make one with: qkdd pki init-ca --algorithm ecdsa-p256"
            )
    key = _generate(algorithm)
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    builder = x509.CertificateBuilder()
    if usage == "client":
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    elif usage == "server":
        if not hosts:
            raise InputError("--host: a KME certificate names at least one host (DNS name or IP address)")
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        ).add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
    elif usage is not None:
        raise ValueError(f"usage {usage!r}")
    certificate = (
        builder.subject_name(_name(name))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .sign(ca_key, _digest(ca_key))
    )
    _save(out, name, key, certificate)
    return out / f"{name}.crt"


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def load_private_key(path: Path) -> AnyKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable PEM private key ({type(error).__name__})") from None
    if not isinstance(key, AnyKey):
        raise InputError(f"{path}: expected an ML-DSA-65, Ed25519 or ECDSA key")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable PEM certificate ({type(error).__name__})") from None


@dataclass(frozen=True)
class Identity:
    """This node's certificate and key, the CA it trusts, and the name its peer must have."""

    certificate: x509.Certificate
    key: SigningKey
    ca: x509.Certificate
    peer_name: str

    @classmethod
    def load(cls, certificate: Path, key: Path, ca: Path, peer_name: str) -> Identity:
        private = load_private_key(key)
        if not isinstance(private, SigningKey):
            raise InputError(f"{key}: the PKI bootstrap signs with an ML-DSA-65 or Ed25519 key")
        return cls(load_certificate(certificate), private, load_certificate(ca), peer_name)

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    def check_peer(self, der: bytes, now: datetime.datetime | None = None) -> x509.Certificate:
        """The peer's certificate, if the CA issued it, it is valid now and names the expected peer.

        Raises:
            RemoteProtocolError (``auth-failed``) saying which check failed.
        """
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError:
            raise RemoteProtocolError("the peer's certificate does not parse", code="auth-failed") from None
        try:
            certificate.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            raise RemoteProtocolError(
                "the peer's certificate was not issued by the configured CA", code="auth-failed"
            ) from None
        moment = now or datetime.datetime.now(datetime.UTC)
        if not certificate.not_valid_before_utc <= moment <= certificate.not_valid_after_utc:
            raise RemoteProtocolError(
                f"the peer's certificate is not valid now (valid {certificate.not_valid_before_utc:%Y-%m-%d} "
                f"to {certificate.not_valid_after_utc:%Y-%m-%d})",
                code="auth-failed",
            )
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [n.value for n in names] != [self.peer_name]:
            shown = ", ".join(str(n.value) for n in names)[:64]
            raise RemoteProtocolError(
                f"the peer's certificate names {shown!r}, expected {self.peer_name!r}", code="auth-failed"
            )
        return certificate


def verify_signature(certificate: x509.Certificate, signature: bytes, data: bytes) -> None:
    public = certificate.public_key()
    try:
        if isinstance(public, (mldsa.MLDSA65PublicKey, ed25519.Ed25519PublicKey)):
            public.verify(signature, data)
            return
    except InvalidSignature:
        pass
    raise RemoteProtocolError("the peer's handshake signature does not verify", code="auth-failed")


def signed_data(role: str, transcript: bytes, *kex: bytes) -> bytes:
    return b"qkdp/1 pki " + role.encode() + b" " + transcript + b"".join(kex)


class Exchange:
    """One side of the hybrid X25519 + ML-KEM-768 exchange."""

    def __init__(self) -> None:
        self._x25519 = x25519.X25519PrivateKey.generate()
        self._mlkem: mlkem.MLKEM768PrivateKey | None = None

    def offer(self) -> bytes:
        """Alice: X25519 public key ‖ ML-KEM-768 encapsulation key."""
        self._mlkem = mlkem.MLKEM768PrivateKey.generate()
        return self._x25519.public_key().public_bytes_raw() + self._mlkem.public_key().public_bytes_raw()

    def accept(self, offer: bytes) -> tuple[bytes, bytes]:
        """Bob: (answer = X25519 public ‖ ML-KEM ciphertext, shared secret)."""
        if len(offer) != X25519_BYTES + MLKEM_EK_BYTES:
            raise RemoteProtocolError("malformed key-exchange offer", code="bad-message")
        try:
            peer_x = x25519.X25519PublicKey.from_public_bytes(offer[:X25519_BYTES])
            peer_kem = mlkem.MLKEM768PublicKey.from_public_bytes(offer[X25519_BYTES:])
            kem_secret, ciphertext = peer_kem.encapsulate()
            dh = self._x25519.exchange(peer_x)
        except ValueError:
            raise RemoteProtocolError("invalid key-exchange offer", code="auth-failed") from None
        return self._x25519.public_key().public_bytes_raw() + ciphertext, dh + kem_secret

    def finish(self, answer: bytes) -> bytes:
        """Alice: the shared secret from Bob's answer."""
        if self._mlkem is None or len(answer) != X25519_BYTES + MLKEM_CT_BYTES:
            raise RemoteProtocolError("malformed key-exchange answer", code="bad-message")
        try:
            dh = self._x25519.exchange(x25519.X25519PublicKey.from_public_bytes(answer[:X25519_BYTES]))
            kem_secret = self._mlkem.decapsulate(answer[X25519_BYTES:])
        except ValueError:
            raise RemoteProtocolError("invalid key-exchange answer", code="auth-failed") from None
        return dh + kem_secret


def session_secret(shared: bytes, transcript: bytes, kex_alice: bytes, kex_bob: bytes) -> bytes:
    """The input keying material of the §12 session MACs in PKI mode."""
    bound = hashlib.sha256(transcript + kex_alice + kex_bob).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=bound, info=b"qkdp/1 pki session").derive(shared)
