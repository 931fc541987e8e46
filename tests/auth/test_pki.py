"""PKI bootstrap (qkdp-v2.md §18): CA and node certificates, signed hybrid key exchange, every refusal."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from qkdd import engine
from qkdd.auth import pki
from qkdd.errors import InputError, RemoteProtocolError
from tests.helpers import ConnectionPair


def make_pki(tmp_path: Path, algorithm: str = "ml-dsa-65") -> Path:
    ca = tmp_path / "ca"
    pki.init_ca(ca, algorithm=algorithm)
    for name in ("alice", "bob"):
        pki.issue(name, ca, tmp_path / name, algorithm=algorithm)
    return ca


def identity(tmp_path: Path, name: str, peer: str, ca: Path | None = None) -> pki.Identity:
    ca = ca or tmp_path / "ca"
    return pki.Identity.load(
        tmp_path / name / f"{name}.crt", tmp_path / name / f"{name}.key", ca / "ca.crt", peer
    )


@pytest.mark.parametrize("algorithm", pki.ALGORITHMS)
def test_a_pki_bootstrapped_link_produces_keys(tmp_path: Path, algorithm: str) -> None:
    make_pki(tmp_path, algorithm)
    pair = ConnectionPair(
        alice_pki=identity(tmp_path, "alice", "bob"), bob_pki=identity(tmp_path, "bob", "alice"), psk=b""
    )
    pair.connect()
    assert pair.alice.auth == pair.bob.auth == "pki"
    pair.round()
    assert pair.summaries["alice"][-1].auth == "pki" and not pair.summaries["alice"][-1].aborted
    assert pair.alice_store.key_map() == pair.bob_store.key_map() != {}
    assert (tmp_path / "alice" / "alice.key").stat().st_mode & 0o777 == 0o600


def refused(alice: pki.Identity, bob: pki.Identity) -> RemoteProtocolError:
    pair = ConnectionPair(alice_pki=alice, bob_pki=bob, psk=b"")
    with pytest.raises(RemoteProtocolError) as caught:
        pair.connect()
    assert caught.value.code == "auth-failed"
    assert pair.alice.state is engine.State.CLOSED or pair.bob.state is engine.State.CLOSED
    assert not pair.alice_store.key_map() and not pair.bob_store.key_map()
    return caught.value


def test_wrong_ca_is_refused(tmp_path: Path) -> None:
    make_pki(tmp_path)
    other = tmp_path / "other"
    pki.init_ca(other)
    error = refused(identity(tmp_path, "alice", "bob"), identity(tmp_path, "bob", "alice", ca=other))
    assert "not issued by the configured CA" in str(error)


def test_wrong_name_is_refused(tmp_path: Path) -> None:
    make_pki(tmp_path)
    error = refused(identity(tmp_path, "alice", "bob"), identity(tmp_path, "bob", "carol"))
    assert "expected 'carol'" in str(error)


def test_expired_certificate_is_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    long_ago = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    pki.issue("alice", ca, tmp_path / "alice", not_before=long_ago, days=30)
    pki.issue("bob", ca, tmp_path / "bob")
    error = refused(identity(tmp_path, "alice", "bob"), identity(tmp_path, "bob", "alice"))
    assert "not valid now" in str(error)


def test_bad_signature_is_refused(tmp_path: Path) -> None:
    make_pki(tmp_path)
    alice = identity(tmp_path, "alice", "bob")
    pki.issue("mallory", tmp_path / "ca", tmp_path / "mallory")
    mallory_key = pki.load_private_key(tmp_path / "mallory" / "mallory.key")
    # Alice's certificate, someone else's key: the signature cannot verify
    forged = pki.Identity(alice.certificate, mallory_key, alice.ca, "bob")
    error = refused(forged, identity(tmp_path, "bob", "alice"))
    assert "signature does not verify" in str(error)


def test_files_and_algorithms_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--algorithm"):
        pki.init_ca(tmp_path / "x", algorithm="rsa")
    pki.init_ca(tmp_path / "ca")
    with pytest.raises(InputError, match="exists"):
        pki.init_ca(tmp_path / "ca")
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(InputError, match="not a readable PEM"):
        pki.load_certificate(tmp_path / "junk.pem")
