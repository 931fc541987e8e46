"""Both roles' engines joined in memory: the one implementation of a round, without sockets or disks.

Theory of operation
-------------------
:class:`MemoryStore` is a key store in memory that carries out the engines' durable actions as the
daemon's SQLite store does; :func:`run_rounds` connects an Alice and a Bob engine through in-order
queues and runs rounds to their end. ``qkdd bench`` measures key rates this way, and the tests build on
the same store, so benchmarks, tests and the daemons all run the one protocol engine
(:mod:`qkdd.engine`), never a second copy of a round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from qkdd import engine, policy, wire
from qkdd.auth import wegman_carter as wc
from qkdd.bits import RandomSource
from qkdd.interface import Action, Compute, FetchFrame, Outcome
from qkdd.links import AliceLink, BobLink
from qkdd.records import RoundSummary


@dataclass
class MemoryReserve:
    """The reserve of a MemoryStore: committed rounds' chunks in round order."""

    chunks: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    consumed_value: int = 128
    used: list[tuple[int, int]] = field(default_factory=list)  # audit: (from, to) of every consumption
    keys: policy.HandshakeKeys = field(default_factory=policy.HandshakeKeys)

    @property
    def total_bits(self) -> int:
        return sum(count for _, count in self.chunks.values())

    @property
    def consumed(self) -> int:
        return self.consumed_value

    def _bits(self) -> np.ndarray:
        parts = [
            np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count)
            for data, count in self.chunks.values()  # in commit order, as the SQLite store appends them
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)

    def read(self, start: int, count: int) -> bytes:
        bits = self._bits()
        assert start + count <= bits.size, "read past the reserve"
        return np.packbits(bits[start : start + count]).tobytes()

    def hash_keys(self) -> list[int]:
        return wc.split_bits(self.read(0, wc.KEY_BITS), wc.HASHES)

    def pads(self, start: int) -> list[int]:
        assert start >= 128
        return wc.split_bits(self.read(start, wc.OTP_BITS), wc.HASHES)

    def handshake_keys(self) -> policy.HandshakeKeys:
        return self.keys

    def handshake_key(self, position: int) -> bytes:
        if position == policy.UPGRADE_KEY:
            return self.read(0, 128)
        return self.read(position, policy.HANDSHAKE_KEY_BITS)

    def consume(self, upto: int) -> None:
        if upto > self.consumed_value:
            self.used.append((self.consumed_value, upto))
            self.consumed_value = upto


@dataclass
class MemoryStore:
    """StoreView plus the effect of the engine's actions, in memory."""

    next_round_value: int = 0
    pending: dict[int, tuple[RoundSummary, tuple[tuple[str, bytes], ...]]] = field(default_factory=dict)
    committed: dict[int, tuple[RoundSummary, tuple[tuple[str, bytes], ...]]] = field(default_factory=dict)
    aborted: dict[int, RoundSummary] = field(default_factory=dict)
    ready: bool = False
    reserve: MemoryReserve = field(default_factory=MemoryReserve)
    pending_reserve: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    psk_retired: bool = False

    @property
    def next_round(self) -> int:
        return self.next_round_value

    def pending_rounds(self) -> list[int]:
        return sorted(self.pending)

    def committed_among(self, rounds: Sequence[int]) -> list[int]:
        return sorted(r for r in set(rounds) if r in self.committed)

    def apply(self, action: engine.Action) -> None:
        match action:
            case engine.ReserveRound(round=r):
                assert r >= self.next_round_value
                self.next_round_value = r + 1
            case engine.RoundEnded(summary=s, disposition="pending", blocks=b, reserve=reserve):
                self.pending[s.round] = (s, b)
                self.pending_reserve[s.round] = reserve
            case engine.RoundEnded(summary=s, disposition="committed", blocks=b, reserve=reserve):
                self.committed[s.round] = (s, b)
                self._add_reserve(s.round, reserve)
            case engine.RoundEnded(summary=s, disposition="aborted"):
                self.pending.pop(s.round, None)
                self.pending_reserve.pop(s.round, None)
                self.aborted[s.round] = s
            case engine.CommitRound(round=r):
                self.committed[r] = self.pending.pop(r)
                self._add_reserve(r, self.pending_reserve.pop(r))
            case engine.ResolvePending(committed=rounds):
                for r in list(self.pending):
                    if r in rounds:
                        self.committed[r] = self.pending.pop(r)
                        self._add_reserve(r, self.pending_reserve.pop(r))
                    else:
                        del self.pending[r]
                        self.pending_reserve.pop(r, None)
            case engine.ConsumeReserve(upto=upto):
                self.reserve.consume(upto)
            case engine.SetHandshakeKeys(keys=keys):
                self.reserve.keys = keys
            case engine.RetirePsk():
                self.psk_retired = True
            case engine.Ready():
                self.ready = True

    def _add_reserve(self, round_number: int, reserve: tuple[bytes, int]) -> None:
        if reserve[1]:
            self.reserve.chunks[round_number] = reserve

    def key_map(self) -> dict[str, bytes]:
        return {k: v for _, blocks in self.committed.values() for k, v in blocks}


class EnginePair:
    """An Alice and a Bob engine joined by in-memory, in-order queues, each with its store and link."""

    def __init__(
        self,
        alice: engine.Engine,
        alice_store: MemoryStore,
        bob: engine.Engine,
        bob_store: MemoryStore,
        links: tuple[AliceLink, BobLink],
    ) -> None:
        self.alice, self.alice_store, self.bob, self.bob_store = alice, alice_store, bob, bob_store
        self.links = {"alice": links[0], "bob": links[1]}
        self.queues: dict[str, list[bytes]] = {"alice": [], "bob": []}  # frames waiting for that role
        self.log: list[tuple[str, str]] = []  # (sender, message type)
        self.summaries: dict[str, list[RoundSummary]] = {"alice": [], "bob": []}

    def engine(self, role: str) -> engine.Engine:
        return self.alice if role == "alice" else self.bob

    def store(self, role: str) -> MemoryStore:
        return self.alice_store if role == "alice" else self.bob_store

    def work(self, role: str, action: Compute | FetchFrame) -> None:
        """Carry out work the engine handed out (here: at once, on this thread) and hand it back."""
        self.complete(role, action, action.run(self.links[role]))

    def complete(self, role: str, action: Compute | FetchFrame, outcome: Outcome) -> None:
        self.handle(role, self.engine(role).completed(action.job, outcome))

    def handle(self, role: str, actions: list[Action]) -> None:
        peer = "bob" if role == "alice" else "alice"
        work: list[Compute | FetchFrame] = []
        for action in actions:
            if isinstance(action, engine.Send):
                self.queues[peer].append(action.frame)
                self.log.append((role, action.message))
            elif isinstance(action, Compute | FetchFrame):
                work.append(action)  # after the frames and writes before it, as a driver would
            else:
                if isinstance(action, engine.RoundEnded):
                    self.summaries[role].append(action.summary)
                self.store(role).apply(action)
        for action in work:
            self.work(role, action)

    def connect(self) -> None:
        self.handle("alice", self.alice.initiate())
        self.handle("bob", self.bob.initiate())
        self.run()

    def step(self) -> bool:
        """Deliver one frame (Alice's queue first); False when both queues are empty."""
        for role in ("alice", "bob"):
            if self.queues[role]:
                (payload,) = wire.FrameDecoder().feed(self.queues[role].pop(0))
                self.handle(role, self.engine(role).receive_frame(payload))
                return True
        return False

    def run(self, max_steps: int = 100_000) -> None:
        """Deliver frames until both queues are empty.

        Raises:
            AssertionError: they never empty (the engines talk in a loop: a bug).
        """
        for _ in range(max_steps):
            if not self.step():
                return
        raise AssertionError("the engines did not settle")

    def round(self) -> None:
        self.handle("alice", self.alice.start_round())
        self.run()

    def rounds(self, count: int, max_steps: int = 1_000_000) -> None:
        """Run ``count`` rounds, Alice opening each as soon as her window allows (several in flight)."""
        started = 0
        for _ in range(max_steps):
            if started < count and self.alice.can_start_round:
                self.handle("alice", self.alice.start_round())
                started += 1
            elif not self.step():
                if started < count:
                    raise AssertionError("the engines stopped with rounds left to start")
                return
        raise AssertionError("the engines did not settle")


def run_rounds(
    settings: engine.EngineSettings,
    links: tuple[AliceLink, BobLink],
    randoms: tuple[RandomSource, RandomSource],
    rounds: int,
    stores: tuple[MemoryStore, MemoryStore] | None = None,
) -> list[RoundSummary]:
    """Connect an Alice and a Bob engine in memory and run ``rounds`` rounds; Alice's summaries."""
    alice_store, bob_store = stores or (MemoryStore(), MemoryStore())
    alice = engine.Engine("alice", settings, info=links[0].info, store=alice_store, random=randoms[0])
    bob = engine.Engine("bob", settings, info=links[1].info, store=bob_store, random=randoms[1])
    pair = EnginePair(alice, alice_store, bob, bob_store, links)
    pair.connect()
    pair.rounds(rounds)
    return pair.summaries["alice"]
