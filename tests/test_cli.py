from __future__ import annotations

import json
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from qkdd import config
from qkdd.admin import write_status_file
from qkdd.cli import main
from qkdd.records import RoundSummary, key_id
from qkdd.store import KeyStore


def test_bench_json_has_the_documented_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--json", "--variant", "original", "--frames", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["cascade"][0]
    assert set(row) >= {
        "variant",
        "qber",
        "frame_bits",
        "efficiency_mean",
        "efficiency_p95",
        "frame_error_rate",
        "round_trips",
        "throughput_bps",
    }
    assert {r["frame_bits"] for r in report["cascade"]} == {1 << 14, 1 << 16}
    amp = report["amplification"][0]
    assert set(amp) >= {"input_bits", "output_bits", "throughput_bps"}
    assert amp["input_bits"] == 1 << 20


def test_bench_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--variant", "original", "--frames", "1"]) == 0
    out = capsys.readouterr().out
    assert "f_mean" in out and "privacy amplification" in out


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--frames", "0"]) == 2
    assert "--frames" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--variant", "turbo"])


def test_init_writes_a_config_and_a_private_psk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:

    alice_dir, bob_dir = tmp_path / "a", tmp_path / "b"
    assert main(["init", "--role", "alice", "--peer", "bob.lan:7700", "--state-dir", str(alice_dir)]) == 0
    psk = alice_dir / "psk"
    assert psk.stat().st_mode & 0o777 == 0o600
    assert "copy it to the other host" in capsys.readouterr().out
    assert (
        main(
            [
                "init",
                "--role",
                "bob",
                "--peer",
                "alice.lan:7700",
                "--state-dir",
                str(bob_dir),
                "--psk-file",
                str(psk),
            ]
        )
        == 0
    )
    alice, bob = config.load(alice_dir / "alice.toml"), config.load(bob_dir / "bob.toml")
    assert alice.peer == config.Address("bob.lan", 7700) and alice.listen is None
    assert bob.listen == config.Address("0.0.0.0", 7700) and bob.psk_file == psk
    assert main(["init", "--role", "alice", "--peer", "bob.lan:7700", "--state-dir", str(alice_dir)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["init", "--role", "alice", "--peer", "nonsense", "--state-dir", str(tmp_path / "c")]) == 2
    assert '--peer: expected "HOST:PORT"' in capsys.readouterr().err


def test_status_and_export_read_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:

    store = KeyStore(tmp_path, "lab")
    store.store_round(
        RoundSummary(0, 0, 100, 10, 8, 0.0125, 0.02, 5, 256, False, None, "psk"),
        [(key_id("lab", 0, 0), bytes(32))],
        pending=False,
        seconds=0.5,
    )
    store.close()
    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # no daemon ran here: not running, since the store's last change, and the store's figures
    assert report["running"] is False and report["stopped_cleanly"] is False and report["since"]
    assert report["link_id"] == "lab" and report["stored_key_bits"] == 256
    assert report["delivery_available_bits"] == 256 and report["delivery_waiting_keys"] == 0
    assert report["delivery_leased_bits"] == 0 and report["delivery_assignments"] == 0
    assert report["last_qber"] == 0.0125 and report["rounds_committed"] == 1 and report["auth"] == "psk"
    assert report["last_round_at"].endswith("+00:00")
    assert main(["status", "--state-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("not running since ") and "stored_key_bits: 256" in text
    assert "last_qber: 1.25%" in text and "last_round_at: " + report["last_round_at"] in text
    assert main(["keys", "export", "--state-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"key_id": key_id("lab", 0, 0), "key_hex": "00" * 32}
    assert "secret keys" in captured.err
    assert main(["status", "--state-dir", str(tmp_path / "nothing")]) == 2
    assert "no key store" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--state-dir", "{tmp}/nothing"], {"running": False, "error": "no key store in {tmp}/nothing"}),
        (["--config", "{tmp}/missing.toml"], {"error": "{tmp}/missing.toml: cannot read"}),
        (
            ["--state-dir", "{tmp}", "--watch", "--interval", "soon"],
            {"error": "--interval: expected seconds"},
        ),
        (["--state-dir", "{tmp}", "--watch", "--interval", "0"], {"error": "--interval: expected seconds"}),
    ],
)
def test_status_errors_under_json_are_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: dict[str, object]
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["status", *argv, "--json"]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert captured.err == "" and set(report) == set(expected)
    for name, value in expected.items():
        if isinstance(value, str):
            assert str(report[name]).startswith(value.replace("{tmp}", str(tmp_path))), report
        else:
            assert report[name] == value


def test_status_after_a_clean_stop_says_when_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qkdd.statelock import lock_state_dir  # noqa: PLC0415

    KeyStore(tmp_path, "lab").close()
    lock = lock_state_dir(tmp_path)  # as the daemon does: its lock, then its stop file as it stops
    write_status_file(tmp_path, role="bob", reason="SIGTERM")
    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 1  # locked, nothing answers
    report = json.loads(capsys.readouterr().out)
    assert report["running"] is True and report["pid"] == os.getpid() and "nothing answers" in report["error"]
    lock.close()
    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["running"] is False and report["stopped_cleanly"] is True and report["pid"] == os.getpid()
    assert report["stop_reason"] == "SIGTERM" and report["role"] == "bob" and report["since"]


def test_pki_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", "init-ca", "--out", str(tmp_path / "ca"), "--algorithm", "ed25519"]) == 0
    assert (
        main(["pki", "issue", "--name", "alice", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "n")])
        == 0
    )
    assert (tmp_path / "n" / "alice.key").stat().st_mode & 0o777 == 0o600
    assert "wrote" in capsys.readouterr().out
    assert main(["pki", "init-ca", "--out", str(tmp_path / "ca")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (
        main(["pki", "issue", "--name", "bob", "--ca", str(tmp_path / "nothing"), "--out", str(tmp_path)])
        == 2
    )
    assert "not a readable PEM" in capsys.readouterr().err


def test_bench_keyrate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "keyrate", "--quick", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["keyrate"]
    assert report["bound_seconds"] < 0.01
    for row in report["rows"]:
        assert 0.8 < row["ratio"] < 1.2


def test_pki_issues_etsi014_client_and_server_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca, out = str(tmp_path / "ca"), str(tmp_path / "tls")
    assert main(["pki", "init-ca", "--out", ca, "--algorithm", "ecdsa-p256"]) == 0
    assert main(["pki", "issue-sae", "--name", "sae-1", "--ca", ca, "--out", out]) == 0
    assert (
        main(
            [
                "pki",
                "issue-kme",
                "--name",
                "kme",
                "--host",
                "127.0.0.1",
                "--host",
                "kme.example",
                "--ca",
                ca,
                "--out",
                out,
            ]
        )
        == 0
    )
    sae = x509.load_pem_x509_certificate((tmp_path / "tls" / "sae-1.crt").read_bytes())
    usage = sae.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    kme = x509.load_pem_x509_certificate((tmp_path / "tls" / "kme.crt").read_bytes())
    names = kme.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["kme.example"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # a TLS stack loads them as a server and a client of the same CA
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca" / "ca.crt"))
    server.load_cert_chain(str(tmp_path / "tls" / "kme.crt"), str(tmp_path / "tls" / "kme.key"))
    capsys.readouterr()
    # an ML-DSA CA cannot sign what TLS libraries verify today: a clear error, not a useless certificate
    assert main(["pki", "init-ca", "--out", str(tmp_path / "pq")]) == 0
    assert main(["pki", "issue-sae", "--name", "s", "--ca", str(tmp_path / "pq"), "--out", out]) == 2
    assert "ecdsa-p256" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pki", "issue-kme", "--name", "k", "--ca", ca, "--out", out])  # --host is required


def test_init_with_a_distance_tunes_the_sim_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qkdd import keyrate  # noqa: PLC0415

    arguments = ["init", "--peer", "peer.lan:7700", "--distance-km", "100"]
    assert main([*arguments, "--role", "alice", "--state-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "link.sim for 100.0 km" in out and "expected secret key: " in out
    psk = str(tmp_path / "a" / "psk")
    assert main([*arguments, "--role", "bob", "--state-dir", str(tmp_path / "b"), "--psk-file", psk]) == 0
    alice, bob = config.load(tmp_path / "a" / "alice.toml"), config.load(tmp_path / "b" / "bob.toml")
    assert alice.link_options == bob.link_options
    expected = keyrate.sim_options(100.0)
    assert {k: alice.link_options[k] for k in expected} == expected
    with pytest.raises(SystemExit):
        main([*arguments[:-1], "far", "--role", "alice", "--state-dir", str(tmp_path / "c")])
    far = ["init", "--peer", "peer.lan:7700", "--distance-km", "400", "--role", "alice"]
    assert main([*far, "--state-dir", str(tmp_path / "d")]) == 0
    assert "no secret key expected at 400.0 km" in capsys.readouterr().out
    assert (
        config.load(tmp_path / "d" / "alice.toml").link_options["pulses_per_frame"] == keyrate.SIM_MAX_PULSES
    )


@pytest.mark.parametrize(
    ("argv", "level"),
    [([], "INFO"), (["--log-level", "debug"], "DEBUG"), (["--log-level", "ERROR"], "ERROR")],
)
def test_run_sets_the_log_level(
    argv: list[str], level: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qkdd import daemon  # noqa: PLC0415

    levels: list[str] = []

    async def serve_nothing(_: config.Config) -> int:
        return 0

    monkeypatch.setattr(daemon, "setup_logging", lambda _role, chosen: levels.append(chosen))
    monkeypatch.setattr(daemon, "run_forever", serve_nothing)
    assert main(["init", "--role", "bob", "--state-dir", str(tmp_path)]) == 0
    assert main(["run", "--config", str(tmp_path / "bob.toml"), *argv]) == 0
    assert levels == [level]


def test_run_refuses_an_unknown_log_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--config", str(tmp_path / "bob.toml"), "--log-level", "LOUD"])
    assert exit_.value.code == 2
    assert "--log-level: invalid choice: 'LOUD'" in capsys.readouterr().err


def test_status_without_permission_on_the_socket_says_whom_to_ask_as(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from qkdd import control  # noqa: PLC0415

    def refused(state_dir: Path) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(control, "ask", refused)  # as for a user other than the daemon's (tests run as root)
    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 2
    assert "ask as the daemon's user or root" in json.loads(capsys.readouterr().out)["error"]


def test_status_of_a_config_whose_link_is_not_the_stores_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    KeyStore(tmp_path / "state", "lab").close()
    (tmp_path / "psk").write_text("00" * 32)
    path = tmp_path / "alice.toml"
    path.write_text(
        config.render(
            "alice", link_id="other", state_dir="state", psk_file="psk", listen=None, peer="127.0.0.1:7700"
        )
    )
    assert main(["status", "--config", str(path), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["running"] is False and "belongs to link 'lab', not 'other'" in report["error"]
