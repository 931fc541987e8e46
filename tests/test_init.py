"""``qkdd init``: missing folders are created, and a failed init writes nothing and says why in one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from qkdd import admin, config
from qkdd.auth.psk import generate_psk, write_psk
from qkdd.cli import main


def tree(root: Path) -> list[tuple[str, bool]]:
    """Every path under ``root`` (relative) and whether it is a folder."""
    return sorted((str(path.relative_to(root)), path.is_dir()) for path in root.rglob("*"))


def fails_cleanly(argv: list[str], root: Path, capsys: pytest.CaptureFixture[str], expected: str) -> None:
    """``init`` exits 2 with one line naming the problem, and leaves ``root`` as it found it."""
    before = tree(root)
    capsys.readouterr()
    assert main(["init", *argv]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err, captured.err
    assert captured.err.startswith("qkdd init: ") and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""
    assert tree(root) == before


def test_init_creates_the_missing_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    etc, state = tmp_path / "etc" / "qkdd", tmp_path / "var" / "lib" / "qkdd" / "alice"
    psk = etc / "lab-link-1.psk"
    arguments = ["init", "--role", "alice", "--peer", "bob.lan:7700", "--link-id", "lab-link-1"]
    out = ["--state-dir", str(state), "--config", str(etc / "alice.toml"), "--psk-out", str(psk)]
    assert main([*arguments, *out]) == 0
    assert f"wrote {psk} (mode 0600)" in capsys.readouterr().out
    assert psk.stat().st_mode & 0o777 == 0o600 and state.stat().st_mode & 0o777 == 0o700
    loaded = config.load(etc / "alice.toml")
    assert loaded.psk_file == psk and loaded.state_dir == state and not (state / "psk").exists()
    assert loaded.peer == config.Address("bob.lan", 7700)
    # Bob, on the other host, with the copied PSK and without --peer
    bob_etc = tmp_path / "b" / "etc"
    bob = ["init", "--role", "bob", "--state-dir", str(tmp_path / "b" / "state"), "--psk-file", str(psk)]
    assert main([*bob, "--config", str(bob_etc / "bob.toml")]) == 0
    loaded = config.load(bob_etc / "bob.toml")
    assert loaded.listen == config.Address("0.0.0.0", config.DEFAULT_PORT) and loaded.peer is None
    assert loaded.psk_file == psk
    assert "wrote" not in capsys.readouterr().out.split("\n", 1)[1]  # no PSK written


def test_bob_listens_on_the_given_port(tmp_path: Path) -> None:
    bob = ["init", "--role", "bob", "--psk-out", str(tmp_path / "psk")]
    assert main([*bob, "--peer", "alice.lan:7800", "--state-dir", str(tmp_path / "b1")]) == 0
    assert config.load(tmp_path / "b1" / "bob.toml").listen == config.Address("0.0.0.0", 7800)
    bob[-1] = str(tmp_path / "psk2")
    assert main([*bob, "--listen", "10.0.0.2:7900", "--state-dir", str(tmp_path / "b2")]) == 0
    assert config.load(tmp_path / "b2" / "bob.toml").listen == config.Address("10.0.0.2", 7900)


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    """A root holding a file, an existing config and PSK, and a PSK that others can read."""
    (tmp_path / "file").write_text("not a folder\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "alice.toml").write_text("# an operator's config\n")
    write_psk(tmp_path / "etc" / "link.psk", generate_psk())
    write_psk(tmp_path / "etc" / "open.psk", generate_psk())
    (tmp_path / "etc" / "open.psk").chmod(0o644)
    return tmp_path


CASES: list[tuple[list[str], str]] = [
    (["--role", "alice", "--state-dir", "{r}/s"], "--peer: Alice connects to Bob"),
    (["--role", "alice", "--peer", "nonsense", "--state-dir", "{r}/s"], '--peer: expected "HOST:PORT"'),
    (["--role", "bob", "--peer", "a:99999", "--state-dir", "{r}/s"], "--peer: expected"),
    (["--role", "bob", "--listen", "7700", "--state-dir", "{r}/s"], '--listen: expected "HOST:PORT"'),
    (["--role", "alice", "--peer", "b:1", "--state-dir", "{r}/file/s"], "--state-dir: {r}/file is not a"),
    (["--role", "alice", "--peer", "b:1", "--state-dir", "{r}/file"], "--state-dir: {r}/file is not a"),
    (
        ["--role", "alice", "--peer", "b:1", "--state-dir", "{r}/s", "--psk-out", "{r}/file/psk"],
        "--psk-out: {r}/file is not a folder",
    ),
    (
        ["--role", "alice", "--peer", "b:1", "--state-dir", "{r}/s", "--psk-out", "{r}/etc/link.psk"],
        "{r}/etc/link.psk exists; pass --psk-file",
    ),
    (
        ["--role", "alice", "--peer", "b:1", "--state-dir", "{r}/s", "--config", "{r}/file/alice.toml"],
        "--config: {r}/file is not a folder",
    ),
    (
        ["--role", "alice", "--peer", "b:1", "--state-dir", "{r}/s", "--config", "{r}/etc/alice.toml"],
        "{r}/etc/alice.toml exists; not overwriting it",
    ),
    (
        [
            "--role",
            "alice",
            "--peer",
            "b:1",
            "--state-dir",
            "{r}/s",
            "--config",
            "{r}/c",
            "--psk-out",
            "{r}/c",
        ],
        "--config and the PSK file are the same path",
    ),
    (
        ["--role", "bob", "--state-dir", "{r}/s", "--psk-file", "{r}/etc/missing.psk"],
        "--psk-file: cannot read {r}/etc/missing.psk",
    ),
    (["--role", "bob", "--state-dir", "{r}/s", "--psk-file", "{r}/etc/open.psk"], "chmod 600"),
    (["--role", "bob", "--state-dir", "{r}/s", "--link-id", "l" * 129], "--link-id: expected 1 to 128 bytes"),
    (["--role", "bob", "--state-dir", "{r}/s", "--link-id", ""], "--link-id: expected 1 to 128 bytes"),
    (["--role", "bob", "--state-dir", "{r}/s", "--distance-km", "-1"], "--distance-km: expected a finite"),
    (["--role", "bob", "--state-dir", "{r}/s", "--distance-km", "inf"], "--distance-km: expected a finite"),
]


@pytest.mark.parametrize(("argv", "expected"), CASES)
def test_a_bad_init_writes_nothing(
    argv: list[str], expected: str, scene: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(scene)
    fails_cleanly([a.replace("{r}", root) for a in argv], scene, capsys, expected.replace("{r}", root))


def test_a_folder_we_cannot_write_in(
    scene: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = scene / "etc"
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: have os.access answer as for anyone else
        real_access = os.access
        monkeypatch.setattr(
            admin.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode)
        )
    try:
        alice = ["--role", "alice", "--peer", "b:1", "--state-dir", str(scene / "s")]
        fails_cleanly(
            [*alice, "--config", str(locked / "qkdd" / "a.toml")],
            scene,
            capsys,
            f"--config: cannot create {locked}/qkdd: no write permission in {locked}",
        )
        fails_cleanly(
            [*alice, "--psk-out", str(locked / "new.psk")],
            scene,
            capsys,
            f"--psk-out: cannot write in {locked}: no write permission",
        )
    finally:
        locked.chmod(0o700)


def test_both_psk_options_are_refused(scene: Path) -> None:
    before = tree(scene)
    with pytest.raises(SystemExit) as exit_:
        main(["init", "--role", "bob", "--state-dir", str(scene / "s"), "--psk-file", "a", "--psk-out", "b"])
    assert exit_.value.code == 2 and tree(scene) == before


def test_a_failed_write_is_undone(
    scene: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills after the folders and the PSK are written: they go again."""
    config_path = scene / "new" / "etc" / "alice.toml"
    real_open = os.open

    def full_disk(path: Any, flags: int, mode: int = 0o777) -> int:
        if Path(path) == config_path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(admin.os, "open", full_disk)
    argv = ["--role", "alice", "--peer", "b:1", "--state-dir", str(scene / "new" / "state")]
    argv += ["--config", str(config_path), "--psk-out", str(scene / "new" / "etc" / "psk")]
    fails_cleanly(
        argv, scene, capsys, f"cannot write {config_path}: No space left on device; nothing written"
    )


def test_a_psk_written_part_way_is_removed(
    scene: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_written(path: Path, psk: bytes) -> None:
        path.write_text(psk.hex()[:5])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(admin, "write_psk", half_written)
    argv = ["--role", "alice", "--peer", "b:1", "--state-dir", str(scene / "state")]
    fails_cleanly(argv, scene, capsys, f"cannot write {scene}/state/psk: No space left on device")
