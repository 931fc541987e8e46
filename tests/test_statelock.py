"""One daemon per state directory (qkdd/statelock.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qkdd.cli import main
from qkdd.statelock import LOCK_FILE, StateDirLocked, lock_state_dir


def test_the_lock_is_exclusive_names_its_holder_and_goes_with_it(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    held = lock_state_dir(state)  # creates the directory
    assert (state / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert state.stat().st_mode & 0o777 == 0o700
    with pytest.raises(StateDirLocked, match=rf"^another qkdd \(pid {os.getpid()}\) runs on {state}$"):
        lock_state_dir(state)
    assert (state / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # the refused one wrote nothing
    held.close()
    lock_state_dir(state).close()  # free again once its holder let go


def test_a_lock_left_by_a_killed_process_keeps_nobody_out(tmp_path: Path) -> None:
    code = "import sys, time; from pathlib import Path; from qkdd.statelock import lock_state_dir; "
    code += f"held = lock_state_dir(Path({str(tmp_path)!r})); print('locked', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(StateDirLocked, match=rf"pid {holder.pid}\)"):
            lock_state_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=30)
        if holder.stdout is not None:
            holder.stdout.close()
    lock_state_dir(tmp_path).close()  # the kernel dropped the lock with the process


def test_a_second_qkdd_run_on_a_locked_state_dir_exits_2_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "alice"
    assert main(["init", "--role", "alice", "--peer", "127.0.0.1:9", "--state-dir", str(state)]) == 0
    capsys.readouterr()
    with lock_state_dir(state):
        before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in state.iterdir()}
        assert main(["run", "--config", str(state / "alice.toml")]) == 2
        after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in state.iterdir()}
    assert capsys.readouterr().err == f"qkdd run: another qkdd (pid {os.getpid()}) runs on {state}\n"
    assert after == before
