"""A ConnectionPair-style helper: Alice's and Bob's engines joined in memory (after h11's helpers)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from qkdd import engine, wire
from qkdd.links.sim import SimParameters, open_link
from qkdd.loopback import MemoryStore
from qkdd.records import RoundSummary

PSK = bytes(range(32))
SMALL_SIM = {"pulses_per_frame": 1 << 19, "z_probability": 0.7, "seed": 7, "single_photon": True}


class SeededRandom:
    """A deterministic RandomSource for tests (never for secrets)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def bytes(self, n: int) -> bytes:
        return self._rng.bytes(n)


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
