"""The engine and protocol/qkdp-v2.toml agree; the docs' diagram is generated from the file."""

from __future__ import annotations

import tomllib
from collections import Counter

import pytest

from qkdd import engine, rounds, spec
from qkdd.delivery import channel
from qkdd.delivery.kme import KeyManager
from tests.helpers import ConnectionPair


def test_engine_states_are_the_spec_states() -> None:
    loaded = spec.load()
    every = set(loaded.states["alice"]) | set(loaded.states["bob"])
    assert {s.value for s in engine.State} == every
    assert loaded.round_states <= every


def test_every_received_message_has_a_handler_and_every_handler_a_message() -> None:
    loaded = spec.load()
    received = {t.on[5:] for t in loaded.transitions if t.on.startswith("recv:")}
    handlers = {name[4:] for name in dir(engine.Engine) if name.startswith("_on_")} | {
        name[3:] for name in dir(rounds.Round) if name.startswith("on_")
    }
    assert received == handlers


def test_every_message_type_appears_in_some_transition() -> None:
    loaded = spec.load()
    used = {t.on[5:] for t in loaded.transitions if t.on.startswith("recv:")}
    used |= {m for t in loaded.transitions for m in t.sends}
    # hello and error are the handshake and teardown rules every state shares
    rounds = {name for name, m in loaded.messages.items() if m.channel == "round"}
    assert rounds - used <= {"error"}


def test_the_key_manager_handles_exactly_the_key_channel_messages() -> None:
    """Every key-channel message of the spec has a handler in the KME and no handler lacks a message."""
    loaded = spec.load()
    keys = {name for name, m in loaded.messages.items() if m.channel == "keys"}
    handlers = {name[4:] for name in dir(KeyManager) if name.startswith("_on_")}
    assert keys == handlers
    assert keys == channel.MESSAGES
    answers = loaded.key_channel["answers"]
    assert set(answers) | {m for a in answers.values() for m in a} <= keys
    # the engine refuses them: they never belong to a round
    assert not any(t.on[5:] in keys for t in loaded.transitions)


def test_spec_rejects_inconsistent_tables() -> None:
    with open(spec.SPEC_PATH, "rb") as f:
        raw = tomllib.load(f)
    raw["transitions"].append({"role": "alice", "from": "IDLE", "on": "recv:sift_answer", "to": ["NOWHERE"]})
    with pytest.raises(ValueError, match="names a state"):
        spec.parse_spec(raw)
    raw["transitions"][-1] = {"role": "alice", "from": "IDLE", "on": "recv:sift_answer", "to": ["IDLE"]}
    with pytest.raises(ValueError, match="cannot receive"):
        spec.parse_spec(raw)


def test_the_state_diagram_in_the_docs_is_generated_from_the_spec() -> None:
    doc = spec.SPEC_PATH.with_suffix(".md").read_text()
    begin = doc.index(spec.DIAGRAM_BEGIN) + len(spec.DIAGRAM_BEGIN)
    end = doc.index(spec.DIAGRAM_END)
    assert doc[begin:end].strip() == spec.diagrams(spec.load()).strip(), (
        "run: python -m qkdd.spec update-docs"
    )


def test_the_message_classes_are_generated_from_the_spec() -> None:
    assert spec.MESSAGES_PATH.read_text() == spec.message_classes(spec.load()), (
        "run: python -m qkdd.spec messages"
    )


def test_transitions_taken_in_honest_and_aborted_rounds_are_all_in_the_spec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken: Counter[tuple[str, str, str, str]] = Counter()
    original = engine.Engine._transition

    def recording(self: engine.Engine, on: str, handler, r=None):  # type: ignore[no-untyped-def]
        before = (self._state if r is None else r.state).value
        original(self, on, handler, r)
        taken[(self.role, before, on, (self._state if r is None else r.state).value)] += 1

    monkeypatch.setattr(engine.Engine, "_transition", recording)
    pair = ConnectionPair()
    pair.connect()
    pair.handle("alice", pair.alice.keepalive())
    pair.handle("bob", pair.bob.keepalive())
    pair.run()
    pair.round()
    pair.handle("alice", pair.alice.start_round())
    pair.handle("alice", pair.alice.abort_round("operator request"))
    pair.run()
    eve = ConnectionPair(sim={"eve_fraction": 1.0})
    eve.connect()
    eve.round()
    loaded = spec.load()
    listed = {(t.role, t.source, t.on, target) for t in loaded.transitions for target in t.targets}
    assert set(taken) <= listed
    # the main path of both roles, handshake to commit, was walked
    main_path = {(t.role, t.source, t.on) for t in loaded.transitions if t.on not in {"abort", "recv:abort"}}
    walked = {(role, source, on) for role, source, on, _ in taken}
    assert main_path <= walked
