"""A ConnectionPair-style helper: Alice's and Bob's engines joined in memory (after h11's helpers)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import trio

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
    made = engine.Engine(role, config, info=link.info, store=store, random=SeededRandom(seed))
    LINKS[made] = link
    return made, store


LINKS: weakref.WeakKeyDictionary[engine.Engine, Any] = weakref.WeakKeyDictionary()
"""The link of each engine make_engine built (the engine never calls it: its driver does)."""


def drive(made: engine.Engine, actions: list[engine.Action]) -> list[engine.Action]:
    """``actions`` with the work among them done at once, each outcome handed back and what that
    returned put in its place (for tests that drive one engine by hand)."""
    out: list[engine.Action] = []
    for action in actions:
        if isinstance(action, engine.Compute | engine.FetchFrame):
            out += drive(made, made.completed(action.job, action.run(LINKS[made])))
        else:
            out.append(action)
    return out


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
        super().__init__(alice, alice_store, bob, bob_store, (LINKS[alice], LINKS[bob]))
        # do the work handed out at once ("now"); on a thread of its own while frames go on, its outcome
        # handed back once it is done, as the daemon does ("thread"); or only when no frame can be
        # delivered, so that frames wait for it ("late")
        self.run_compute = "now"
        self.later: list[tuple[str, engine.Compute | engine.FetchFrame, Any]] = []
        self.computes: list[tuple[str, int, bool]] = []  # (role, frames it had sent by then, urgent)
        # work to hold back until release() (a slow worker), chosen by (role, action, its round)
        self.defer: Callable[[str, engine.Compute | engine.FetchFrame, int | None], bool] = lambda *_: False
        self.deferred: list[tuple[str, engine.Compute | engine.FetchFrame]] = []
        self.kinds: list[tuple[str, str]] = []  # (role, kind) of each piece of work handed out

    def work(self, role: str, action: engine.Compute | engine.FetchFrame) -> None:
        if self.defer(role, action, self.engine(role).round_of_job(action.job)):
            self.deferred.append((role, action))
            return
        if isinstance(action, engine.Compute):
            self.computes.append((role, len(self.log), action.urgent))
            self.kinds.append((role, action.kind))
        if self.run_compute == "now":
            super().work(role, action)
        elif self.run_compute == "thread":
            outcome: list[engine.Outcome] = []
            thread = threading.Thread(target=lambda: outcome.append(action.run(self.links[role])))
            thread.start()
            self.later.append((role, action, (thread, outcome)))
        else:
            self.later.append((role, action, None))

    def release(self) -> None:
        """Hand back the work held back by ``defer``."""
        deferred, self.deferred = self.deferred, []
        for role, action in deferred:
            self.complete(role, action, action.run(self.links[role]))

    def join(self) -> None:
        """Wait for the work still running on threads."""
        for _, _, running in self.later:
            if running is not None:
                running[0].join(timeout=60)

    def step(self) -> bool:
        """Hand back the work that is done (on threads), else deliver one frame, else do the oldest work;
        False when nothing is left."""
        for i, (role, action, running) in enumerate(self.later):
            if running is not None and not running[0].is_alive():
                del self.later[i]
                self.complete(role, action, running[1][0])
                return True
        if super().step():
            return True
        if not self.later:
            return False
        role, action, running = self.later.pop(0)
        if running is None:
            self.complete(role, action, action.run(self.links[role]))
        else:
            running[0].join(timeout=60)
            self.complete(role, action, running[1][0])
        return True


@contextlib.contextmanager
def logged(seen: Callable[[logging.LogRecord], bool]) -> Iterator[trio.Event]:
    """An event set once a record of the ``qkdd`` logger makes ``seen`` true; the watch ends with the
    block. A test waits on it instead of polling the log."""
    event = trio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if seen(record):
                event.set()

    watch = Watch()
    logging.getLogger("qkdd").addHandler(watch)
    try:
        yield event
    finally:
        logging.getLogger("qkdd").removeHandler(watch)


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition()`` until it returns something true; fail after ``timeout`` seconds. For the
    e2e tests, whose daemons are other processes: nothing there can set an event of ours."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)
