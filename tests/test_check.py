"""``qkdd check``: one line per check, exit 0 only if all pass, and each failure says what is wrong."""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qkdd import check
from qkdd.auth.psk import fingerprint, read_psk
from qkdd.cli import main
from qkdd.statelock import lock_state_dir


def _init(tmp_path: Path, role: str, *extra: str) -> Path:
    """``qkdd init`` on 127.0.0.1 only (tests never listen elsewhere); the config's path."""
    state = tmp_path / role
    assert main(["init", "--role", role, "--state-dir", str(state), *extra]) == 0
    path = state / f"{role}.toml"
    path.write_text(path.read_text().replace('listen = "0.0.0.0:7700"', 'listen = "127.0.0.1:0"'))
    return path


def _run(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, tuple[bool, str]]]:
    capsys.readouterr()
    code = main(["check", "--config", str(path)])
    lines = capsys.readouterr().out.splitlines()
    found = {}
    for line in lines:
        verdict, rest = line.split(maxsplit=1)
        name, detail = rest.split(": ", 1)
        found[name] = (verdict == "ok", detail)
    return code, found


def test_a_fresh_bob_passes_every_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _init(tmp_path, "bob")
    code, found = _run(path, capsys)
    assert code == 0 and all(ok for ok, _ in found.values()), found
    assert list(found) == [
        "config",
        "link",
        "auth.psk_file",
        "state_dir",
        "key store",
        "network.listen",
        "peer",
    ]
    assert fingerprint(read_psk(tmp_path / "bob" / "psk")) in found["auth.psk_file"][1]


def test_the_json_form_has_each_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _init(tmp_path, "bob")
    capsys.readouterr()
    assert main(["check", "--config", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and {c["name"] for c in report["checks"]} >= {"config", "state_dir", "peer"}


def test_a_psk_others_may_read_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _init(tmp_path, "bob")
    (tmp_path / "bob" / "psk").chmod(0o644)
    code, found = _run(path, capsys)
    assert code == 1 and found["auth.psk_file"] == (False, found["auth.psk_file"][1])
    assert "chmod 600" in found["auth.psk_file"][1]


def test_a_state_directory_a_daemon_holds_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _init(tmp_path, "bob")
    with lock_state_dir(tmp_path / "bob"):
        code, found = _run(path, capsys)
    assert code == 1 and not found["state_dir"][0]
    assert found["state_dir"][1].startswith("another qkdd (pid ")
    assert "network.listen" not in found  # the running daemon holds its ports: nothing to probe
    code, found = _run(path, capsys)  # the lock is gone with its holder; check itself wrote no pid
    assert code == 0 and found["state_dir"][0]


def test_a_config_error_is_one_failed_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _init(tmp_path, "bob")
    path.write_text(path.read_text().replace("[post]", "[post]\ncascade_varient = 1"))
    code, found = _run(path, capsys)
    assert code == 1 and list(found) == ["config"] and "cascade_varient" in found["config"][1]


def test_a_bad_link_option_fails_the_link_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _init(tmp_path, "bob")
    path.write_text(path.read_text().replace("\nseed = 1", "\nsede = 1"))
    code, found = _run(path, capsys)
    assert code == 1 and not found["link"][0] and "sede" in found["link"][1]


@pytest.mark.parametrize(
    ("check_name", "configure"),
    [
        ("network.listen", lambda text, port: text.replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"')),
        ("metrics.listen", lambda text, port: text + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n'),
    ],
)
def test_a_port_in_use_fails(
    check_name: str, configure: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _init(tmp_path, "bob")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        path.write_text(configure(path.read_text(), holder.getsockname()[1]))
        code, found = _run(path, capsys)
    assert code == 1 and "another program holds that port" in found[check_name][1]


def test_alices_check_reaches_the_peer_or_says_why_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as bob:
        bob.bind(("127.0.0.1", 0))
        bob.listen()
        port = bob.getsockname()[1]
        path = _init(tmp_path, "alice", "--peer", f"127.0.0.1:{port}")
        code, found = _run(path, capsys)
        assert code == 0 and found["peer"] == (True, f"127.0.0.1:{port} accepts connections")
    code, found = _run(path, capsys)  # nothing listens there any more
    assert code == 1 and "ECONNREFUSED" in found["peer"][1] and "is Bob running" in found["peer"][1]


def _certificate(folder: Path, *, days: int, start_days: int = -1) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now + datetime.timedelta(days=start_days))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    paths = folder / f"cert-{days}.pem", folder / f"key-{days}.pem"
    paths[0].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    paths[1].chmod(0o600)
    return paths


@pytest.mark.parametrize(
    ("days", "start_days", "ok", "says"),
    [
        (365, -1, True, "valid until"),
        (10, -1, True, "WARNING: 9 days left"),
        (-1, -10, False, "expired on"),
        (30, 2, False, "valid only from"),
    ],
)
def test_certificates_in_and_out_of_their_validity(
    tmp_path: Path, days: int, start_days: int, ok: bool, says: str
) -> None:
    certificate, key = _certificate(tmp_path, days=days, start_days=start_days)
    found = check._certificate("etsi014", certificate, key, certificate)
    assert found.ok is ok and says in found.detail, found


def test_a_key_others_may_read_fails(tmp_path: Path) -> None:
    certificate, key = _certificate(tmp_path, days=365)
    key.chmod(0o640)
    found = check._certificate("etsi014", certificate, key, certificate)
    assert not found.ok and "chmod 600" in found.detail


def test_the_unix_socket_path_must_be_creatable_and_not_a_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert check._socket_folder(state / "api.sock", state).ok  # the state directory comes with run
    assert not check._socket_folder(tmp_path / "missing" / "api.sock", state).ok
    (tmp_path / "api.sock").write_text("a file")
    found = check._socket_folder(tmp_path / "api.sock", state)
    assert not found.ok and "is not a socket" in found.detail
