"""The Promela model protocol/qkdp.pml: it matches qkdp-v1.toml, and spin verifies it.

spin comes from the Debian package `spin` (.ci/run installs it). Without it these tests skip, unless
QKDD_REQUIRE_SPIN=1 (set by .ci/run) makes that a failure. QKDD_STRESS=1 adds larger configurations.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qkdd import spec

MODEL = Path(spec.SPEC_PATH).resolve().parent / "qkdp.pml"
STRESS = os.environ.get("QKDD_STRESS") == "1"

#: (connections, rounds, network/attacker budget): exhaustive safety runs, a few seconds each
SAFETY = [(2, 1, 2), (2, 2, 0)]
SAFETY_STRESS = [(3, 1, 1), (3, 2, 0), (2, 2, 1), (3, 1, 2)]
LIVENESS = [(2, 1, 1)]
LIVENESS_STRESS = [(3, 1, 1), (2, 2, 0)]


def _process(source: str, name: str) -> str:
    start = source.index(f"active proctype {name}()")
    end = source.find("active proctype", start + 1)
    return source[start : end if end != -1 else len(source)]


def _mtypes(source: str, comment: str) -> list[str]:
    match = re.search(r"mtype = \{\s*/\* " + re.escape(comment) + r" \*/(.*?)\}", source, re.S)
    assert match, comment
    return [name.strip() for name in match.group(1).split(",")]


def _received(body: str, prefix: str) -> set[tuple[str, str]]:
    """(state, message) of every guard `st == X_STATE ... t == message` of one process."""
    pairs = set()
    for guard in re.findall(r"::((?:(?!->).)*?)->", body, re.S):
        messages = re.findall(r"\bt == (\w+)", guard)
        states = re.findall(rf"\bst == {prefix}_(\w+)", guard)
        pairs |= {(s, m) for s in states for m in messages}
    return pairs


def test_the_model_has_the_states_messages_and_transitions_of_the_spec() -> None:
    loaded = spec.load()
    source = MODEL.read_text()
    rounds = {name for name, m in loaded.messages.items() if m.channel == "round"}
    assert set(_mtypes(source, "messages")) == rounds
    for role, prefix, comment in (("alice", "A", "Alice's states"), ("bob", "B", "Bob's states")):
        states = _mtypes(source, comment)
        assert [s.removeprefix(f"{prefix}_") for s in states] == list(loaded.states[role])
        expected = {
            (t.source, t.on[5:]) for t in loaded.transitions if t.role == role and t.on.startswith("recv:")
        }
        assert _received(_process(source, role.capitalize()), prefix) == expected, role


def _spin() -> str:
    found = shutil.which("spin")
    if found is None or shutil.which("gcc") is None:
        if os.environ.get("QKDD_REQUIRE_SPIN") == "1":
            pytest.fail("spin (Debian package `spin`) and gcc are required")
        pytest.skip("spin or gcc is not installed (Debian: apt-get install spin)")
    return found


def verify(
    tmp: Path, connections: int, rounds: int, budget: int, *, liveness: bool, source: str | None = None
) -> str:
    """Generate, compile and run spin's verifier on the model; return its report."""
    spin = _spin()
    model = tmp / "qkdp.pml"
    model.write_text(source if source is not None else MODEL.read_text())
    defines = [f"-DNCONN={connections}", f"-DNROUND={rounds}", f"-DBUDGET={budget}"]
    subprocess.run([spin, *defines, "-a", model.name], cwd=tmp, check=True, capture_output=True, timeout=60)
    flags = ["-DCOLLAPSE"] if liveness else ["-DSAFETY", "-DNOCLAIM", "-DCOLLAPSE"]
    subprocess.run(["gcc", "-O2", *flags, "-o", "pan", "pan.c"], cwd=tmp, check=True, timeout=120)
    run = ["./pan", "-m200000", *(["-a"] if liveness else [])]
    report = subprocess.run(run, check=False, cwd=tmp, capture_output=True, text=True, timeout=3600).stdout
    if _clean(report):  # a search that stops at its first error is incomplete by design
        assert "Search not completed" not in report and "max search depth too small" not in report, report
    return report


def _clean(report: str) -> bool:
    return re.search(r"errors: 0\b", report) is not None


@pytest.mark.parametrize(("connections", "rounds", "budget"), SAFETY + (SAFETY_STRESS if STRESS else []))
def test_spin_finds_no_assertion_violation_and_no_invalid_end_state(
    tmp_path: Path, connections: int, rounds: int, budget: int
) -> None:
    report = verify(tmp_path, connections, rounds, budget, liveness=False)
    assert _clean(report), report
    assert "invalid end states\t+" in report and "assertion violations\t+" in report


@pytest.mark.parametrize(("connections", "rounds", "budget"), LIVENESS + (LIVENESS_STRESS if STRESS else []))
def test_spin_proves_that_every_execution_ends(
    tmp_path: Path, connections: int, rounds: int, budget: int
) -> None:
    report = verify(tmp_path, connections, rounds, budget, liveness=True)
    assert _clean(report), report
    assert "never claim         \t+ (terminates)" in report and "acceptance   cycles \t+" in report


@pytest.mark.parametrize(
    ("broken", "replacement"),
    [
        # Bob commits every pending round at resolve, even those Alice did not commit
        (":: b_pend[i] && (fv >> i) & 1 -> b_comm[i] = true", ":: b_pend[i] -> b_comm[i] = true"),
        # Bob answers commit without first storing the round as pending
        ("b_pend[r] = true; b_blocks[r] = fv; CHECK()", "skip"),
    ],
)
def test_spin_catches_a_broken_protocol(tmp_path: Path, broken: str, replacement: str) -> None:
    """The checks can fail: the model with one rule of the protocol broken does not verify."""
    source = MODEL.read_text()
    assert source.count(broken) == 1
    report = verify(tmp_path, 2, 1, 0, liveness=False, source=source.replace(broken, replacement))
    assert not _clean(report) and "assertion violated" in report, report
