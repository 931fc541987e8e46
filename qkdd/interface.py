"""What the protocol core shares with whoever drives it: states, actions, settings, and the views of the
store it reads (protocol/qkdp-v2.md §9–§17).

Theory of operation
-------------------
The core (:mod:`qkdd.handshake`, :mod:`qkdd.engine`, :mod:`qkdd.rounds`) is sans-IO: bytes and
outcomes in, actions out. An :data:`Action` is one thing for the driver to carry out, in order: a frame to
write, a durable write (each is checked against its transition's ``persist`` list of
``protocol/qkdp-v2.toml``, see :func:`persist_kind`), work to run where it likes (:class:`Compute`) or a
link frame to fetch (:class:`FetchFrame`), whose outcome it hands back. The core reads the store only through
:class:`StoreView` and writes it only through actions. Nothing here knows a role or a message.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from qkdd import policy, spec
from qkdd.auth import pki
from qkdd.auth import psk as psk_auth
from qkdd.records import RoundSummary
from qkdd.stages import cascade, estimation, keylength

SUPPORTED_VERSIONS = (2,)
NONCE_BYTES = 32
KEY_CHANNEL_CAPABILITY: str = spec.load().key_channel["capability"]
KEEPALIVE_CAPABILITY = "keepalive"
LIVENESS_CAPABILITY = "liveness"  # keepalives both ways and a bounded silence in IDLE (§13)


class State(enum.Enum):
    """The states of ``protocol/qkdp-v2.toml`` (each role uses a subset)."""

    #: waiting for the peer's hello
    HELLO = "HELLO"
    #: waiting for the peer's bootstrap proof
    AUTH = "AUTH"
    #: authenticated; waiting for the peer's round numbering and parameters
    SYNC = "SYNC"
    #: Bob: waiting for Alice's word on his pending rounds
    RESOLVING = "RESOLVING"
    #: between rounds
    IDLE = "IDLE"
    #: a round is open; sifting under way
    SIFTING = "SIFTING"
    #: parameter estimation under way
    ESTIMATING = "ESTIMATING"
    #: Cascade under way
    RECONCILING = "RECONCILING"
    #: confirmation under way
    CONFIRMING = "CONFIRMING"
    #: Bob: waiting for the amplification seed
    AMPLIFYING = "AMPLIFYING"
    #: the key is computed; waiting for the peer's commit (Alice) or committed (Bob)
    COMMITTING = "COMMITTING"
    #: final: the connection is over
    CLOSED = "CLOSED"


# ------------------------------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class Send:
    """Write this frame to the peer."""

    frame: bytes
    message: str


@dataclass(frozen=True, slots=True)
class ReserveRound:
    """Persist that ``round`` is in use before anything of it is sent."""

    round: int


@dataclass(frozen=True, slots=True)
class RoundEnded:
    """A round is over: store it as ``committed``, ``pending`` (Bob, §13) or ``aborted`` (no key)."""

    summary: RoundSummary
    disposition: str
    blocks: tuple[tuple[str, bytes], ...] = ()
    reserve: tuple[bytes, int] = (b"", 0)  # packed bits for the key reserve, and their count

    def __repr__(self) -> str:  # never print key material
        return f"RoundEnded({self.summary!r}, {self.disposition!r}, {len(self.blocks)} blocks)"


@dataclass(frozen=True, slots=True)
class CommitRound:
    """Bob: Alice committed ``round``; commit the pending copy."""

    round: int


@dataclass(frozen=True, slots=True)
class ResolvePending:
    """Bob: commit the pending rounds listed; drop every other pending round."""

    committed: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SetHandshakeKeys:
    """Record this side's handshake keys (§17), durably, before the next frame goes out."""

    keys: policy.HandshakeKeys


@dataclass(frozen=True, slots=True)
class RetirePsk:
    """The first handshake authenticated by a reserve key verified: never accept the PSK again (§17)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The handshake is over; rounds may run. ``auth`` says how the connection was authenticated."""

    version: int
    auth: str
    #: the session's frame MACs by sender, from which the key channel (§19) derives its own; ``None``
    #: unless both hellos offered the key channel's capability
    channel_macs: dict[str, psk_auth.FrameMac] | None = None


@dataclass(frozen=True, slots=True)
class ConsumeReserve:
    """Mark every reserve bit below ``upto`` used, durably, before the next frame goes out (§16)."""

    upto: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a piece of work the core handed out came to: its value, or the exception it raised (which
    the core raises where it uses the value)."""

    value: Any = None
    error: Exception | None = None

    @classmethod
    def of(cls, function: Callable[..., Any], *args: Any) -> Outcome:
        try:
            return cls(function(*args))
        except Exception as error:  # handed to the core, which raises it where it uses the value
            return cls(error=error)

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


@dataclass(frozen=True, slots=True)
class Compute:
    """Work of a round that the core hands out instead of doing it: either side sifting as the peer's
    sifting frame arrives (the frame waits for it), Alice hashing her key (§7) while Bob reconciles, Bob
    building range parities while Alice answers and transforming his key during the confirmation, either
    side computing key IDs and hashing the round's transcripts (§16) as they grow.
    Call :meth:`run` anywhere — any thread, any time after the frames before this action are sent — and
    hand its outcome to ``Engine.completed(job, outcome)``. The core goes on taking frames meanwhile and
    holds back only a frame whose handling needs this result, until it is back. ``function`` reads only
    values the core leaves alone until then: it shares nothing with the core that either side changes.

    ``urgent`` work is due within about a round trip (sifting, Bob's range parities and key transform),
    so a driver should not run it at a lowered priority."""

    job: int
    kind: str  # what the work is, for logs and metrics: "hash", "key_ids", "transcripts", ...
    function: Callable[[], Any] = field(repr=False)
    urgent: bool = False

    def run(self, link: Any = None) -> Outcome:
        """Run the work (``link`` is not used: every work action takes the driver's link)."""
        return Outcome.of(self.function)


@dataclass(frozen=True, slots=True)
class FetchFrame:
    """A round needs the link's record of frame ``frame``: Alice's preparation, or Bob's detections.
    Ask the link (``link.preparation(frame)`` or ``link.detections(frame)``: :meth:`run` does) wherever
    the driver likes and hand the outcome to ``Engine.completed(job, outcome)``. The core never calls the
    link: where and when the link works (its thread, its prefetch) is the driver's business."""

    job: int
    role: str
    frame: int

    def run(self, link: Any) -> Outcome:
        return Outcome.of(link.preparation if self.role == "alice" else link.detections, self.frame)


DURABLE_ACTIONS = (
    ReserveRound,
    RoundEnded,
    CommitRound,
    ResolvePending,
    ConsumeReserve,
    SetHandshakeKeys,
    RetirePsk,
)
"""The actions that write durable state: each is checked against its transition's ``persist``."""


def persist_kind(action: object) -> str | None:
    """The ``persist`` kind of the spec (:data:`spec.PERSIST_KINDS`) an action writes, if it is durable."""
    match action:
        case ReserveRound():
            return "next_round"
        case RoundEnded(disposition=disposition):
            return {"aborted": "aborted_round", "pending": "pending_round"}.get(disposition, "round")
        case CommitRound():
            return "commit_round"
        case ResolvePending():
            return "resolve_pending"
        case ConsumeReserve():
            return "reserve_consumed"
        case SetHandshakeKeys():
            return "handshake_keys"
        case RetirePsk():
            return "retire_psk"
    return None


Action = (
    Send
    | ReserveRound
    | RoundEnded
    | CommitRound
    | ResolvePending
    | Ready
    | ConsumeReserve
    | SetHandshakeKeys
    | RetirePsk
    | Compute
    | FetchFrame
)


class ReserveView(Protocol):
    @property
    def total_bits(self) -> int: ...

    @property
    def consumed(self) -> int: ...

    def read(self, start: int, count: int) -> bytes: ...

    def hash_keys(self) -> list[int]: ...

    def pads(self, start: int) -> list[int]: ...

    def handshake_keys(self) -> policy.HandshakeKeys: ...

    def handshake_key(self, position: int) -> bytes: ...


class StoreView(Protocol):
    """What the engine reads of the key store (queries only; writes are actions)."""

    @property
    def next_round(self) -> int: ...

    @property
    def psk_retired(self) -> bool: ...

    @property
    def reserve(self) -> ReserveView: ...

    def pending_rounds(self) -> list[int]: ...

    def committed_among(self, rounds: Sequence[int]) -> list[int]: ...


@dataclass(frozen=True)
class EngineSettings:
    link_id: str
    psk: bytes = field(repr=False)
    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    cascade_variant: str = cascade.DEFAULT_VARIANT
    qber_threshold: float = estimation.DEFAULT_THRESHOLD
    z_sample_fraction: float = 0.0
    qber_prior: float = 0.02
    eps_sec: float = keylength.DEFAULT_EPS_SEC
    eps_cor: float = keylength.DEFAULT_EPS_COR
    key_block_bits: int = 256
    reserve_switch_bits: int = 4096  # rounds authenticate from the reserve once it holds this many bits
    reserve_bits_per_round: int = 2048  # refill per round, while the reserve is below its target
    reserve_target_bits: int = 65536
    fallback_to_psk: bool = False  # never retire the PSK; a dry reserve runs frame-MAC rounds (§17)
    pki: pki.Identity | None = field(default=None, repr=False)  # PKI bootstrap (§18) instead of the PSK
    handshake_timeout: float = spec.load().timeouts["handshake"]
    round_timeout: float = spec.load().timeouts["round"]
    idle_timeout: float = spec.load().timeouts["idle"]
    keepalive_interval: float = spec.load().timeouts["keepalive"]  # with a peer that lists "liveness"
    silence_timeout: float = spec.load().timeouts["silence"]
    key_channel: bool = False  # offer the key channel (§19): this daemon serves key delivery
    window: int = 1  # rounds this side lets be open at once (§13); the session takes the smaller
