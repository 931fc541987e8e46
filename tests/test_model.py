"""The Promela model protocol/qkdp.pml: it matches the spec's toml, and spin verifies it.

The model has the active adversary in it (see its header): spin checks I1 (no reserve slot used for two
messages), I4 (both sides commit the same rounds with the same key blocks), the handshake-key invariants
and I3 (after the adversary stops, the next connection commits a round). Mutants that bring back the
qkdp/1 handshake bugs B1, B2 and B3 (issue 21) must fail, and so must the model with one rule broken.

spin comes from the Debian package `spin` (.ci/run installs it). Without it these tests skip, unless
QKDD_REQUIRE_SPIN=1 (set by .ci/run) makes that a failure. QKDD_STRESS=1 adds larger configurations.
Run times on the 2-core CI machine: about 10 s for the largest default run, 40-50 s for this file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from qkdd import spec

MODEL = Path(spec.SPEC_PATH).resolve().parent / "qkdp.pml"
STRESS = os.environ.get("QKDD_STRESS") == "1"

#: (connections under attack, rounds, attacker/network budget); one calm connection follows. Exhaustive.
SAFETY = [(2, 1, 2), (1, 2, 0)]
SAFETY_STRESS = [(2, 2, 0), (3, 1, 1), (2, 1, 3), (1, 2, 1)]
LIVENESS = [(2, 1, 1)]
LIVENESS_STRESS = [(2, 1, 2), (1, 2, 0)]


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
    tmp: Path,
    connections: int,
    rounds: int,
    budget: int,
    *,
    liveness: bool = False,
    source: str | None = None,
    defines: Sequence[str] = (),
    fails: bool = False,
    every_error: bool = False,
) -> str:
    """Generate, compile and run spin's verifier on the model; return its report.

    A search expected to `fail` is compiled without optimisation: it stops at its first error, so that
    compiling is most of its time. `every_error` makes it go on past the first error, so that the report
    lists every assertion that fails, not only the first one found.
    """
    spin = _spin()
    model = tmp / "qkdp.pml"
    model.write_text(source if source is not None else MODEL.read_text())
    config = [f"-DNCONN={connections}", f"-DNROUND={rounds}", f"-DBUDGET={budget}", *defines]
    subprocess.run([spin, *config, "-a", model.name], cwd=tmp, check=True, capture_output=True, timeout=60)
    flags = ["-O0" if fails else "-O1", *([] if liveness else ["-DSAFETY", "-DNOCLAIM"]), "-DCOLLAPSE"]
    subprocess.run(["gcc", *flags, "-o", "pan", "pan.c"], cwd=tmp, check=True, timeout=120)
    run = ["./pan", "-m200000", *(["-a"] if liveness else []), *(["-c0"] if every_error else [])]
    report = subprocess.run(run, check=False, cwd=tmp, capture_output=True, text=True, timeout=3600).stdout
    if _clean(report):  # a search that stops at its first error is incomplete by design
        assert "Search not completed" not in report and "max search depth too small" not in report, report
    return report


def _clean(report: str) -> bool:
    return re.search(r"errors: 0\b", report) is not None


def _violated(report: str) -> set[str]:
    """The assertions that failed, as spin prints them, without spaces."""
    return {
        a.replace(" ", "") for a in re.findall(r"^pan:\d+: assertion violated (.*) \(at depth", report, re.M)
    }


@pytest.mark.parametrize(("connections", "rounds", "budget"), SAFETY + (SAFETY_STRESS if STRESS else []))
def test_spin_finds_no_assertion_violation_and_no_invalid_end_state(
    tmp_path: Path, connections: int, rounds: int, budget: int
) -> None:
    """I1, I4, the key invariants and I3 hold for every execution (and there is no deadlock)."""
    report = verify(tmp_path, connections, rounds, budget)
    assert _clean(report), report
    assert "invalid end states\t+" in report and "assertion violations\t+" in report


@pytest.mark.skipif(not STRESS, reason="QKDD_STRESS=1")
def test_spin_verifies_the_variant_where_bob_proves_on_the_hello(tmp_path: Path) -> None:
    """Bob sending his proof before Alice's verified keeps I1, I3 and I4 (the key sets still intersect)."""
    report = verify(tmp_path, 2, 1, 2, defines=["-DBOB_PROVES_FIRST"])
    assert _clean(report), report


@pytest.mark.parametrize(("connections", "rounds", "budget"), LIVENESS + (LIVENESS_STRESS if STRESS else []))
def test_spin_proves_that_every_execution_ends(
    tmp_path: Path, connections: int, rounds: int, budget: int
) -> None:
    report = verify(tmp_path, connections, rounds, budget, liveness=True)
    assert _clean(report), report
    assert "never claim         \t+ (terminates)" in report and "acceptance   cycles \t+" in report


# The configurations below are within SAFETY's (2, 1, 2), which the model without the mutant passes.
MUTANTS = {
    # qkdp/1's position agreement: hello carries reserve_consumed, each side adopts the max on the
    # unauthenticated hello, and the proofs are one-time-pad tags there. Bob's commit takes a pad, the
    # connection ends before Alice has it, the attacker lowers reserve_consumed in Bob's next hello:
    # Alice's proof takes the same pad (I1).
    "MUTANT_B1": ((2, 1, 1), "((used[a_cons]==0)||(used[a_cons]==((128+(2*c))+0)))"),
    # the same adoption with key proofs: the attacker raises reserve_consumed in a hello; the reserve
    # cannot pay for a round any more, and the calm connection commits nothing (I3)
    "MUTANT_B2": ((2, 1, 1), "recovered"),
    # qkdp/1's epochs: two connections that end before Bob takes resolve (crashes alone will do) leave
    # the epochs two apart; Bob exits and the calm connection commits nothing (I3)
    "MUTANT_B3": ((2, 1, 0), "recovered"),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_spin_finds_the_qkdp1_handshake_bugs(tmp_path: Path, mutant: str) -> None:
    """B1, B2 and B3 of issue 21, brought back into the model, each fail the check they break."""
    (connections, rounds, budget), failure = MUTANTS[mutant]
    report = verify(
        tmp_path,
        connections,
        rounds,
        budget,
        defines=[f"-D{mutant}"],
        fails=True,
        every_error=mutant == "MUTANT_B1",
    )
    assert failure in _violated(report), report


def test_alices_current_key_can_leave_bobs_set(tmp_path: Path) -> None:
    """Why the model asserts "every key of Bob's is one of Alice's" and not "Alice's current key is in Bob's
    set" (handshake-v2 design note): Bob drops Alice's current key once she proved with her announced
    one, before she has seen his proof."""
    report = verify(tmp_path, 2, 1, 0, defines=["-DALICE_CURRENT_IN_BOB"], fails=True)
    assert "((b_keys&(a_keys&-(a_keys)))!=0)" in _violated(report), report


@pytest.mark.parametrize(
    ("broken", "replacement", "failure"),
    [
        # Bob commits every pending round at resolve, even those Alice did not commit (I4)
        (":: b_pend[i] && (fv >> i) & 1 ->", ":: b_pend[i] ->", "(a_comm[i]&&(a_blocks[i]==b_blocks[i]))"),
        # Bob answers commit without first storing the round as pending (I4)
        ("b_pend[r] = true; b_blocks[r] = fv;", "skip;", "(a_comm[i]&&(a_blocks[i]==b_blocks[i]))"),
        # Alice ignores the reserve_consumed of Bob's sync: her next tag slot holds his last commit's pad (I1)
        ("a_cons = MAX(a_cons, fp);   /* max(own, Bob's reserve_consumed) */", "skip;", "(used[a_rb]=="),
        # Bob adds Alice's announced key without marking its slot consumed: his tags are a slot behind
        # hers from then on and never verify again (I3)
        (
            "b_keys = b_keys | (1 << fp); b_cons = MAX(b_cons, fp + 1)",
            "b_keys = b_keys | (1 << fp)",
            "recovered",
        ),
    ],
)
def test_spin_catches_a_broken_protocol(tmp_path: Path, broken: str, replacement: str, failure: str) -> None:
    """The checks can fail: the model with one rule of the protocol broken does not verify."""
    source = MODEL.read_text()
    assert source.count(broken) == 1
    report = verify(tmp_path, 2, 1, 0, source=source.replace(broken, replacement), fails=True)
    assert any(failure in violated for violated in _violated(report)), report
