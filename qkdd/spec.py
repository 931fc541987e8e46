"""The qkdp/2 spec as data: ``protocol/qkdp-v2.toml`` loaded into typed, immutable tables.

Theory of operation
-------------------
Everything that defines the wire protocol — the envelope, each message's fields and bounds, the states
of each role, the transitions and the error codes — lives once, in ``protocol/qkdp-v2.toml``. This module
reads it and offers two things: :func:`check_fields`, which the wire layer uses to validate every message
in both directions, and :class:`Spec.allowed`, which the engine consults before and after every
transition. Nothing here knows which role we play or what a message means.

``python -m qkdd.spec diagram`` prints the state diagram (Mermaid) that ``protocol/qkdp-v2.md`` embeds;
a test checks that the embedded copy is current.
"""

from __future__ import annotations

import functools
import math
import sys
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdd.errors import RemoteProtocolError

SPEC_PATH = Path(__file__).parent / "_protocol" / "qkdp-v2.toml"
"""The spec file (``qkdd/_protocol`` is a link to the repository's ``protocol/`` folder)."""

MESSAGES_PATH = Path(__file__).parent / "messages.py"
"""The typed message classes generated from the spec (``python -m qkdd.spec messages``)."""

ROLES = ("alice", "bob")
PERSIST_KINDS = (
    "next_round",
    "aborted_round",
    "pending_round",
    "round",
    "commit_round",
    "resolve_pending",
    "reserve_consumed",
    "handshake_keys",
    "retire_psk",
)
"""The durable writes a transition may list under ``persist`` (the engine's durable actions)."""
FIELD_TYPES = ("uint", "float", "bool", "str", "bin", "uints", "strs")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    type: str
    min: float = 0
    max: float = math.inf
    min_len: int = 0
    max_len: int = 1 << 62
    max_items: int = 1 << 62
    one_of: tuple[str, ...] = ()

    def check(self, value: object, where: str) -> None:
        """Raise :class:`RemoteProtocolError` unless ``value`` fits this field (``where``: the message)."""
        # the field's full name is only spelled out for an error: this runs for every field of every frame
        match self.type:
            case "uint":
                self._check_uint(value, where)
            case "float":
                # msgpack may carry a float as an int when it has no fraction; both are numbers here
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise _bad(f"{where}.{self.name} must be a number")
                if not math.isfinite(value) or not self.min <= value <= self.max:
                    raise _bad(f"{where}.{self.name} = {value} outside [{self.min}, {self.max}]")
            case "bool":
                if not isinstance(value, bool):
                    raise _bad(f"{where}.{self.name} must be a boolean")
            case "str":
                self._check_str(value, where)
            case "bin":
                if not isinstance(value, bytes):
                    raise _bad(f"{where}.{self.name} must be binary (msgpack bin)")
                if not self.min_len <= len(value) <= self.max_len:
                    bounds = f"[{self.min_len}, {self.max_len}]"
                    raise _bad(f"{where}.{self.name} holds {len(value)} bytes, outside {bounds}")
            case "uints" | "strs":
                if not isinstance(value, list):
                    raise _bad(f"{where}.{self.name} must be an array")
                if len(value) > self.max_items:
                    raise _bad(f"{where}.{self.name} holds {len(value)} items, more than {self.max_items}")
                for item in value:
                    if self.type == "uints":
                        self._check_uint(item, where)
                    else:
                        self._check_str(item, where)
            case _:  # pragma: no cover - rejected when the spec is loaded
                raise AssertionError(self.type)

    def _check_uint(self, value: object, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(f"{where}.{self.name} must be an unsigned integer")
        if not self.min <= value <= self.max:
            raise _bad(f"{where}.{self.name} = {value} outside [{int(self.min)}, {int(self.max)}]")

    def _check_str(self, value: object, where: str) -> None:
        if not isinstance(value, str):
            raise _bad(f"{where}.{self.name} must be a string")
        if len(value.encode()) > self.max_len:
            raise _bad(f"{where}.{self.name} is longer than {self.max_len} bytes")
        if self.one_of and value not in self.one_of:
            raise _bad(f"{where}.{self.name} = {value[:32]!r} is not one of {', '.join(self.one_of)}")


@dataclass(frozen=True, slots=True)
class MessageSpec:
    name: str
    senders: tuple[str, ...]
    doc: str
    fields: tuple[FieldSpec, ...]
    channel: str = "round"  # "keys": the key channel of §19


@dataclass(frozen=True, slots=True)
class Transition:
    role: str
    source: str
    on: str  # "recv:<message>" or a local event name
    targets: tuple[str, ...]
    sends: tuple[str, ...]
    persist: tuple[str, ...]  # the kinds of durable write allowed before the sends (PERSIST_KINDS)


@dataclass(frozen=True)
class Spec:
    name: str
    version: int
    max_frame_bytes: int
    envelope: tuple[FieldSpec, ...]
    messages: Mapping[str, MessageSpec]
    states: Mapping[str, tuple[str, ...]]
    round_states: frozenset[str]
    timeouts: Mapping[str, float]
    errors: Mapping[str, str]
    transitions: tuple[Transition, ...]
    key_channel: Mapping[str, Any]

    @functools.cached_property
    def _table(self) -> dict[tuple[str, str, str], Transition]:
        return {(t.role, t.source, t.on): t for t in self.transitions}

    def allowed(self, role: str, state: str, on: str) -> Transition | None:
        """The transition of ``role`` from ``state`` on ``on``, or ``None`` if the spec has none."""
        return self._table.get((role, state, on))


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, code="bad-message")


def check_fields(fields: tuple[FieldSpec, ...], values: Mapping[Any, object], where: str) -> None:
    """Check that ``values`` holds exactly ``fields``, each within its bounds."""
    for field in fields:
        if field.name not in values:
            raise _bad(f"{where}: missing field {field.name!r}")
        field.check(values[field.name], where)
    if len(values) != len(fields):  # every field is there, so something else is too
        names = {f.name for f in fields}
        extra = [k for k in values if k not in names]
        raise _bad(f"{where}: unexpected field {str(extra[0])[:32]!r}")


def _field(name: str, raw: Mapping[str, Any]) -> FieldSpec:
    if raw.get("type") not in FIELD_TYPES:
        raise ValueError(f"spec: field {name!r} has unknown type {raw.get('type')!r}")
    return FieldSpec(
        name=name,
        type=raw["type"],
        min=raw.get("min", 0),
        max=raw.get("max", math.inf),
        min_len=raw.get("min_len", 0),
        max_len=raw.get("max_len", 1 << 62),
        max_items=raw.get("max_items", 1 << 62),
        one_of=tuple(raw.get("one_of", ())),
    )


def parse_spec(raw: Mapping[str, Any]) -> Spec:
    """Build a :class:`Spec` from the parsed TOML, checking its internal consistency."""
    messages = {
        name: MessageSpec(
            name,
            tuple(body["from"]),
            body.get("doc", ""),
            tuple(_field(f, v) for f, v in body.get("fields", {}).items()),
            body.get("channel", "round"),
        )
        for name, body in raw["messages"].items()
    }
    if any(m.channel not in ("round", "keys") for m in messages.values()):
        raise ValueError("spec: a message's channel is neither round nor keys")
    key_channel = raw["key_channel"]
    for asked, answers in key_channel["answers"].items():
        if any(messages[m].channel != "keys" for m in (asked, *answers)):
            raise ValueError(f"spec: key_channel.answers.{asked} names a message outside the key channel")
    states = {role: tuple(raw["states"][role]) for role in ROLES}
    transitions: list[Transition] = []
    for entry in raw["transitions"]:
        sources = entry["from"] if isinstance(entry["from"], list) else [entry["from"]]
        for source in sources:
            transitions.append(
                Transition(
                    entry["role"],
                    source,
                    entry["on"],
                    tuple(entry["to"]),
                    tuple(entry.get("sends", ())),
                    tuple(entry.get("persist", ())),
                )
            )
    for t in transitions:
        role_states = states[t.role]
        if t.source not in role_states or any(s not in role_states for s in t.targets):
            raise ValueError(f"spec: transition {t} names a state {t.role} does not have")
        for sent in t.sends:
            if sent not in messages or t.role not in messages[sent].senders:
                raise ValueError(f"spec: {t.role} cannot send {sent!r}")
        if any(kind not in PERSIST_KINDS for kind in t.persist):
            raise ValueError(f"spec: transition {t} persists an unknown kind of write")
        if t.on.startswith("recv:"):
            received = t.on[5:]
            if (
                received not in messages
                or messages[received].channel != "round"
                or (t.role in messages[received].senders and len(messages[received].senders) == 1)
            ):
                raise ValueError(f"spec: {t.role} cannot receive {received!r}")
    keys = [(t.role, t.source, t.on) for t in transitions]
    if len(set(keys)) != len(keys):
        raise ValueError("spec: a (role, state, event) pair has two transitions")
    return Spec(
        name=raw["protocol"]["name"],
        version=raw["protocol"]["version"],
        max_frame_bytes=raw["protocol"]["max_frame_bytes"],
        envelope=tuple(_field(f, v) for f, v in raw["envelope"].items()),
        messages=messages,
        states=states,
        round_states=frozenset(raw["states"]["round_states"]),
        timeouts=dict(raw["timeouts"]),
        errors=dict(raw["errors"]),
        transitions=tuple(transitions),
        key_channel=key_channel,
    )


@functools.cache
def load() -> Spec:
    """The spec shipped with this package."""
    with SPEC_PATH.open("rb") as f:
        return parse_spec(tomllib.load(f))


def mermaid(spec: Spec, role: str) -> str:
    """The state diagram of ``role`` in Mermaid syntax (generated; embedded in qkdp-v2.md)."""
    lines = ["stateDiagram-v2", f"    [*] --> {spec.states[role][0]}"]
    for t in spec.transitions:
        if t.role != role:
            continue
        label = t.on.removeprefix("recv:")
        label = f"{label} / {', '.join(t.sends)}" if t.sends else label
        for target in t.targets:
            lines.append(f"    {t.source} --> {target}: {label}")
    lines.append("    note right of CLOSED: recv error, or any error detected -> CLOSED")
    lines.append("    CLOSED --> [*]")
    return "\n".join(lines)


def diagrams(spec: Spec) -> str:
    """Both roles' diagrams as the Markdown block qkdp-v2.md embeds."""
    parts = []
    for role in ROLES:
        parts.append(f"**{role.capitalize()}**\n\n```mermaid\n{mermaid(spec, role)}\n```")
    return "\n\n".join(parts)


_PYTHON_TYPES = {
    "uint": "int",
    "float": "float",
    "bool": "bool",
    "str": "str",
    "bin": "bytes",
    "uints": "list[int]",
    "strs": "list[str]",
}


def class_name(message: str) -> str:
    """The Python class of a message: ``sift_announce`` -> ``SiftAnnounce``."""
    return "".join(part.capitalize() for part in message.split("_"))


def message_classes(spec: Spec) -> str:
    """The source of ``qkdd/messages.py``: one frozen dataclass per message of the spec, fields in the
    spec's order with their Python types; binary fields are left out of reprs (they may be long, and
    nothing secret should ever be printed by accident)."""
    lines = [
        '"""Typed messages, one class per message of ``protocol/qkdp-v2.toml``.',
        "",
        "Generated by ``python -m qkdd.spec messages``; do not edit (tests/test_spec.py checks that it is",
        "current). :func:`qkdd.wire.decode_message` has checked every value against the spec's bounds before",
        ':func:`parse` builds one of these."""',
        "",
        "from __future__ import annotations",
        "",
        "from dataclasses import dataclass, field",
        "from typing import Any, Literal",
    ]
    for name, message in spec.messages.items():
        lines += ["", "", "@dataclass(frozen=True, slots=True)", f"class {class_name(name)}:"]
        lines += textwrap.wrap(
            message.doc + '"""', width=110, initial_indent='    """', subsequent_indent="    "
        )
        if message.fields:
            lines.append("")
        for f in message.fields:
            python = _PYTHON_TYPES[f.type]
            if f.type == "str" and f.one_of:
                python = "Literal[" + ", ".join(f'"{choice}"' for choice in f.one_of) + "]"
            lines.append(f"    {f.name}: {python}" + (" = field(repr=False)" if f.type == "bin" else ""))
        if not message.fields:
            lines.append("")
            lines.append(f'    type: str = "{name}"')
        else:
            lines.append(f'    type: str = field(default="{name}", repr=False)')
    lines += [
        "",
        "",
        "Message = (",
        "    " + class_name(next(iter(spec.messages))),
        *(f"    | {class_name(name)}" for name in list(spec.messages)[1:]),
        ")",
        "",
        "CLASSES: dict[str, type[Message]] = {",
        *(f'    "{name}": {class_name(name)},' for name in spec.messages),
        "}",
        "",
        "",
        "def parse(name: str, fields: dict[str, Any]) -> Message:",
        '    """The typed message of a checked one."""',
        "    return CLASSES[name](**fields)",
        "",
    ]
    return "\n".join(lines)


DIAGRAM_BEGIN = "<!-- state diagram: generated by `python -m qkdd.spec diagram`; do not edit -->"
DIAGRAM_END = "<!-- end of generated state diagram -->"


def main(argv: list[str]) -> int:
    if argv == ["diagram"]:
        print(diagrams(load()))
        return 0
    if argv == ["messages"]:
        MESSAGES_PATH.write_text(message_classes(load()))
        return 0
    if argv == ["update-docs"]:
        doc = SPEC_PATH.with_suffix(".md")
        text = doc.read_text()
        head, _, rest = text.partition(DIAGRAM_BEGIN)
        _, _, tail = rest.partition(DIAGRAM_END)
        doc.write_text(f"{head}{DIAGRAM_BEGIN}\n{diagrams(load())}\n{DIAGRAM_END}{tail}")
        return 0
    print("usage: python -m qkdd.spec diagram|update-docs|messages", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
