"""A ConnectionPair-style helper: Alice's and Bob's engines joined in memory (after h11's helpers)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qkdd import engine, policy, wire
from qkdd.auth import wegman_carter as wc
from qkdd.links.sim import SimParameters, open_link
from qkdd.records import RoundSummary

PSK = bytes(range(32))
SMALL_SIM = {"pulses_per_frame": 1 << 19, "z_probability": 0.7, "seed": 7, "single_photon": True}


class SeededRandom:
    """A deterministic RandomSource for tests (never for secrets)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def bytes(self, n: int) -> bytes:
        return self._rng.bytes(n)


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
            for data, count in (self.chunks[r] for r in sorted(self.chunks))
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
        if position == policy.INITIAL_KEY:
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


def make_engine(
    role: str,
    store: MemoryStore | None = None,
    *,
    seed: int = 0,
    sim: dict[str, Any] | None = None,
    **settings: Any,
) -> tuple[engine.Engine, MemoryStore]:
    store = store if store is not None else MemoryStore()
    options = {**SMALL_SIM, **(sim or {})}
    SimParameters.from_options(options)
    link = open_link(role, options)
    config = engine.EngineSettings(
        link_id=settings.pop("link_id", "test-link"), psk=settings.pop("psk", PSK), **settings
    )
    return engine.Engine(role, config, link=link, store=store, random=SeededRandom(seed)), store


class ConnectionPair:
    """Alice and Bob connected by an in-memory, in-order channel."""

    def __init__(self, **kwargs: Any) -> None:
        stores = ("alice_store", "bob_store")
        alice_kwargs = {k[6:]: v for k, v in kwargs.items() if k.startswith("alice_") and k not in stores}
        bob_kwargs = {k[4:]: v for k, v in kwargs.items() if k.startswith("bob_") and k not in stores}
        common = {k: v for k, v in kwargs.items() if not k.startswith(("alice_", "bob_"))}
        self.alice, self.alice_store = make_engine(
            "alice", kwargs.get("alice_store"), seed=1, **{**common, **alice_kwargs}
        )
        self.bob, self.bob_store = make_engine(
            "bob", kwargs.get("bob_store"), seed=2, **{**common, **bob_kwargs}
        )
        self.queues: dict[str, list[bytes]] = {"alice": [], "bob": []}  # frames waiting for that role
        self.log: list[tuple[str, str]] = []  # (sender, message type)
        self.summaries: dict[str, list[RoundSummary]] = {"alice": [], "bob": []}
        # act on Compute at once (True), on a thread of its own while frames go on, as the daemon does
        # ("thread"), or not at all, as a driver that ignores it (False)
        self.run_compute: bool | str = True
        self.threads: list[threading.Thread] = []
        self.computes: list[tuple[str, int]] = []  # (role, frames it had sent by then) per Compute

    def engine(self, role: str) -> engine.Engine:
        return self.alice if role == "alice" else self.bob

    def store(self, role: str) -> MemoryStore:
        return self.alice_store if role == "alice" else self.bob_store

    def handle(self, role: str, actions: list[engine.Action]) -> None:
        peer = "bob" if role == "alice" else "alice"
        for action in actions:
            if isinstance(action, engine.Send):
                self.queues[peer].append(action.frame)
                self.log.append((role, action.message))
            elif isinstance(action, engine.Compute):
                self.computes.append((role, len(self.log)))
                if self.run_compute == "thread":
                    thread = threading.Thread(target=self.engine(role).compute, args=(action.urgent,))
                    thread.start()
                    self.threads.append(thread)
                elif self.run_compute:
                    self.engine(role).compute(action.urgent)
            else:
                if isinstance(action, engine.RoundEnded):
                    self.summaries[role].append(action.summary)
                self.store(role).apply(action)

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
        """Deliver frames until both queues are empty."""
        for _ in range(max_steps):
            if not self.step():
                return
        raise AssertionError("the engines did not settle")

    def round(self) -> None:
        self.handle("alice", self.alice.start_round())
        self.run()
