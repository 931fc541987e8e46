"""A ConnectionPair-style helper: Alice's and Bob's engines joined in memory (after h11's helpers)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from qkdd import engine
from qkdd.links.sim import SimParameters, open_link
from qkdd.loopback import EnginePair, MemoryStore

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


class ConnectionPair(EnginePair):
    """Alice and Bob connected by an in-memory, in-order channel, built from test settings."""

    def __init__(self, **kwargs: Any) -> None:
        stores = ("alice_store", "bob_store")
        alice_kwargs = {k[6:]: v for k, v in kwargs.items() if k.startswith("alice_") and k not in stores}
        bob_kwargs = {k[4:]: v for k, v in kwargs.items() if k.startswith("bob_") and k not in stores}
        common = {k: v for k, v in kwargs.items() if not k.startswith(("alice_", "bob_"))}
        alice, alice_store = make_engine(
            "alice", kwargs.get("alice_store"), seed=1, **{**common, **alice_kwargs}
        )
        bob, bob_store = make_engine("bob", kwargs.get("bob_store"), seed=2, **{**common, **bob_kwargs})
        super().__init__(alice, alice_store, bob, bob_store)
        # act on Compute at once (True), on a thread of its own while frames go on, as the daemon does
        # ("thread"), or not at all, as a driver that ignores it (False)
        self.run_compute: bool | str = True
        self.threads: list[threading.Thread] = []
        self.computes: list[tuple[str, int]] = []  # (role, frames it had sent by then) per Compute

    def compute(self, role: str, action: engine.Compute) -> None:
        self.computes.append((role, len(self.log)))
        if self.run_compute == "thread":
            thread = threading.Thread(target=self.engine(role).compute, args=(action.urgent,))
            thread.start()
            self.threads.append(thread)
        elif self.run_compute:
            self.engine(role).compute(action.urgent)
