"""PSK bootstrap (qkdp-v2.md §12): vectors, proof checks, PSK files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qkdd.auth import psk
from qkdd.errors import InputError, RemoteProtocolError
from tests.conftest import load_vectors


def test_vectors() -> None:
    for v in load_vectors("psk"):
        key = bytes.fromhex(v["psk"])
        t = psk.transcript_hash(bytes.fromhex(v["hello_alice"]), bytes.fromhex(v["hello_bob"]))
        assert t.hex() == v["transcript"]
        assert psk.proof(key, "alice", t).hex() == v["proof_alice"]
        assert psk.proof(key, "bob", t).hex() == v["proof_bob"]
        macs = psk.session_macs(key, bytes.fromhex(v["nonce_alice"]), bytes.fromhex(v["nonce_bob"]), t)
        assert macs["alice"].key.hex() == v["mac_key_alice"] and macs["bob"].key.hex() == v["mac_key_bob"]
        assert macs["alice"].tag(v["seq"], bytes.fromhex(v["body"])).hex() == v["mac_alice"]
        assert macs["alice"].derive(b"qkdp/1 channel keys").key.hex() == v["channel_key_alice"]


def test_proofs_are_bound_to_role_and_transcript() -> None:
    key = os.urandom(32)
    t = psk.transcript_hash(b"a", b"b")
    psk.verify_proof(key, "alice", t, psk.proof(key, "alice", t))
    for role, transcript in (("bob", t), ("alice", psk.transcript_hash(b"a", b"c"))):
        with pytest.raises(RemoteProtocolError) as caught:
            psk.verify_proof(key, role, transcript, psk.proof(key, "alice", t))
        assert caught.value.code == "auth-failed"


def test_psk_files(tmp_path: Path) -> None:
    path = tmp_path / "psk"
    secret = psk.generate_psk()
    psk.write_psk(path, secret)
    assert path.stat().st_mode & 0o777 == 0o600
    assert psk.read_psk(path) == secret
    with pytest.raises(FileExistsError):
        psk.write_psk(path, secret)
    path.chmod(0o644)
    with pytest.raises(InputError, match="readable by others"):
        psk.read_psk(path)
    for content, match in (("zz", "hex"), ("00" * 8, "at least 16")):
        bad = tmp_path / f"bad{len(content)}"
        bad.write_text(content)
        bad.chmod(0o600)
        with pytest.raises(InputError, match=match) as caught:
            psk.read_psk(bad)
        assert content not in str(caught.value)
    with pytest.raises(InputError, match="cannot read"):
        psk.read_psk(tmp_path / "missing")
