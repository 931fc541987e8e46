"""The unit file and example configs in systemd/."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qkdd import config
from qkdd.auth.psk import generate_psk, write_psk
from qkdd.cli import main

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "qkdd@.service"


def settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, separator, value = line.partition("=")
        assert separator, f"not KEY=VALUE: {line!r}"
        found.setdefault(key, []).append(value)
    return found


def test_unit_has_the_required_settings() -> None:
    found = settings()
    expected = {
        "Type": "notify",
        "Restart": "on-failure",
        "User": "qkdd",
        "StateDirectory": "qkdd/%i",
        "RuntimeDirectory": "qkdd/%i",  # etsi014.unix_socket
        "RuntimeDirectoryMode": "0750",
        "CacheDirectory": "qkdd/%i",  # numba's kernel cache: a start loads them, it does not compile
        "Environment": "NUMBA_CACHE_DIR=%C/qkdd/%i",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert found.get(key) == [value], key
    assert found["ExecStart"][0].endswith("qkdd run --config /etc/qkdd/%i.toml")
    assert "WatchdogSec" in found and "RestrictAddressFamilies" in found
    assert "@system-service" in found["SystemCallFilter"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.timeout(60)
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    executable = Path(sys.executable).with_name("qkdd")
    text = UNIT.read_text().replace(
        "/usr/local/bin/qkdd", str(executable if executable.exists() else "/bin/true")
    )
    instance = tmp_path / "qkdd@alice.service"
    instance.write_text(text)
    (tmp_path / "qkdd@.service").write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, timeout=50, check=False
    )
    complaints = [line for line in done.stderr.splitlines() if "qkdd@" in line]
    assert done.returncode == 0 and not complaints, done.stderr


@pytest.mark.parametrize("name", ["alice.toml", "bob.toml"])
def test_example_configs_load(name: str) -> None:
    loaded = config.load(SYSTEMD / name)
    assert loaded.role == name.removesuffix(".toml")
    assert str(loaded.state_dir).startswith("/var/lib/qkdd/")


def init_command(text: str) -> list[str]:
    """The ``qkdd init`` arguments an example config says it was written with."""
    for line in text.splitlines():
        if line.startswith("# written by: qkdd init "):
            return shlex.split(line.removeprefix("# written by: qkdd "))
    raise AssertionError("no '# written by: qkdd init ...' line")


def settings_lines(text: str) -> list[str]:
    """The TOML without its comments, blank lines and the padding before trailing comments."""
    found = []
    for line in text.splitlines():
        quoted = escaped = False
        end = len(line)
        for i, char in enumerate(line):
            if escaped:
                escaped = False
            elif quoted and char == "\\":
                escaped = True
            elif char == '"':
                quoted = not quoted
            elif char == "#" and not quoted:
                end = i
                break
        if line[:end].strip():
            found.append(line[:end].strip())
    return found


@pytest.mark.parametrize("role", ["alice", "bob"])
def test_example_configs_are_what_init_writes(role: str, tmp_path: Path) -> None:
    """The examples are ``qkdd init``'s output plus comments, so the two cannot drift apart."""
    example = (SYSTEMD / f"{role}.toml").read_text()
    argv = init_command(example)
    assert argv[argv.index("--role") + 1] == role
    root = str(tmp_path.resolve())
    rerooted = [root + argument if argument.startswith("/") else argument for argument in argv]
    if "--psk-file" in rerooted:  # Bob's copy of Alice's PSK
        psk = Path(rerooted[rerooted.index("--psk-file") + 1])
        psk.parent.mkdir(parents=True)
        write_psk(psk, generate_psk())
    assert main(rerooted) == 0
    written = Path(rerooted[rerooted.index("--config") + 1]).read_text().replace(root, "")
    assert settings_lines(written) == settings_lines(example)
    assert settings_lines(example)[0] == f'role = "{role}"'  # the comment stripping kept the settings


def test_settings_lines_ignore_only_comments() -> None:
    text = '# a comment\n\nkey = "a # b"   # why\nother = "q\\"#"  # why not\n[table]\n'
    assert settings_lines(text) == ['key = "a # b"', 'other = "q\\"#"', "[table]"]
