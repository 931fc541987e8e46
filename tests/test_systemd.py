"""The unit file and example configs in systemd/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qkdd import config

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
