"""What ``qkdd status`` and the metrics report: the running daemon's figures, and the store's.

Theory of operation
-------------------
* The daemon tells a :class:`Monitor` what happens — the link's state and why, each round that ends,
  each pending round committed or dropped — with the time it happened on its own clock (trio's; a
  MockClock in tests). The monitor keeps the live figures (uptime, the last reconciled round's
  efficiency, the secret key committed over the last minute and hour) and passes each
  event on to the Prometheus :class:`~qkdd.metrics.Metrics`, if the daemon exports any.
* Durable figures (rounds in the store, the key reserve, key delivery) come from the store each time
  they are asked for (:func:`store_figures`), so they never go stale, whatever the link does; the same
  function serves ``qkdd status`` when no daemon runs.
* Nothing here is secret: counts, rates and error rates only (DESIGN: secrets never reach metrics).
"""

from __future__ import annotations

import collections
import datetime
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from qkdd.records import RoundSummary
from qkdd.stages.confirm import TAG_BITS
from qkdd.stages.keylength import binary_entropy

if TYPE_CHECKING:
    from qkdd.metrics import Metrics
    from qkdd.store import KeyStore

LINK_STATES = ("up", "down", "paused", "stopped")
WINDOWS = {"1m": 60.0, "1h": 3600.0}
"""The spans the secret key rate is averaged over (``secret_bits_per_second_1m``, ``..._1h``)."""
MAX_REASON = 300
"""Characters of a link state's reason kept for ``qkdd status``."""
MAX_SAMPLES = 1 << 17
"""Committed rounds remembered for the rates (an hour of rounds every 30 ms; older ones are dropped)."""


def iso(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC with its offset, to the second (``None`` stays ``None``)."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="seconds")


def efficiency(summary: RoundSummary) -> float | None:
    """Reconciliation efficiency f: bits Cascade disclosed over the Shannon limit n·h(QBER) of the
    ``reconciled_bits`` it corrected (1 is the limit; ``None`` without an error rate above 0)."""
    if summary.qber is None or summary.qber <= 0 or summary.reconciled_bits <= 0:
        return None
    return (summary.disclosed_bits - TAG_BITS) / (summary.reconciled_bits * binary_entropy(summary.qber))


def parse_link(text: str) -> tuple[str, str | None]:
    """``"paused: key store full"`` → ``("paused", "key store full")``: the state and the reason."""
    state, _, reason = text.partition(": ")
    if state not in LINK_STATES:
        raise ValueError(f"not a link state: {state!r}")
    return state, reason or None


class Monitor:
    """The live figures of one daemon (see the module docstring); ``now`` arguments are on the daemon's
    clock, ``wall`` gives the Unix time for timestamps shown to people."""

    def __init__(
        self, role: str, *, metrics: Metrics | None = None, wall: Callable[[], float] = time.time
    ) -> None:
        self.role = role
        self.metrics = metrics
        self._wall = wall
        self.started, self.started_at = 0.0, wall()
        self.link = "down"
        self.reason: str | None = "starting"
        self.peer: str | None = None
        self.link_since = self.started_at
        self.rounds_ended = 0  # this run: committed (or pending) plus aborted
        self.efficiency: float | None = None  # of the last round reconciled at an error rate above 0
        self._committed: collections.deque[tuple[float, int]] = collections.deque()
        self._pending: dict[int, int] = {}  # Bob: secret bits of rounds held pending, by round
        if metrics is not None:
            metrics.link(self.link)

    def start(self, now: float) -> None:
        """The daemon starts serving (``now`` on its clock): uptime counts from here."""
        self.started, self.started_at = now, self._wall()

    def set_link(self, text: str, peer: str | None = None) -> None:
        """The link is ``text``: ``up``, ``down``, ``paused`` or ``stopped``, optionally followed by
        ``": "`` and the reason."""
        state, reason = parse_link(text)
        if reason is not None:
            # a reason may quote what a peer (or anyone, before authentication) said: printable, bounded
            reason = "".join(c if c.isprintable() else "?" for c in reason[:MAX_REASON])
        if state != self.link:
            self.link_since = self._wall()
        self.link, self.reason = state, reason
        if peer is not None or state != "paused":
            self.peer = peer
        if self.metrics is not None:
            self.metrics.link(state)

    def round_ended(
        self, summary: RoundSummary, disposition: str, now: float, stages: Mapping[str, float] | None = None
    ) -> None:
        """A round ended ``committed``, ``pending`` (Bob: committed once Alice says so) or ``aborted``;
        ``stages``: the seconds it spent in each engine state."""
        self.rounds_ended += 1
        reconciled = efficiency(summary)
        if reconciled is not None:
            self.efficiency = reconciled
        if disposition == "committed":
            self._commit(summary.secret_bits, now)
        elif disposition == "pending":
            self._pending[summary.round] = summary.secret_bits
        else:
            self._pending.pop(summary.round, None)  # a round held pending, then aborted: not counted twice
        if self.metrics is not None:
            self.metrics.round_ended(summary, disposition, stages or {}, reconciled)
            if disposition == "committed":
                self.metrics.committed(summary.secret_bits)

    def committed(self, rounds: Iterable[int], now: float) -> None:
        """Bob: Alice committed these pending rounds."""
        for number in rounds:
            bits = self._pending.pop(number, None)
            if bits is not None:
                self._commit(bits, now)
                if self.metrics is not None:
                    self.metrics.committed(bits)

    def dropped(self, rounds: Iterable[int]) -> None:
        """Bob: pending rounds Alice never committed (they count as aborted)."""
        for number in rounds:
            if self._pending.pop(number, None) is not None and self.metrics is not None:
                self.metrics.dropped()

    def _commit(self, bits: int, now: float) -> None:
        self._committed.append((now, bits))
        while len(self._committed) > MAX_SAMPLES:
            self._committed.popleft()

    def rate(self, window: float, now: float) -> float:
        """Secret bits per second committed over the last ``window`` seconds (over the uptime while that
        is shorter, so a fresh daemon's rate is not diluted by time it did not run)."""
        while self._committed and self._committed[0][0] <= now - max(WINDOWS.values()):
            self._committed.popleft()
        bits = sum(b for t, b in self._committed if t > now - window)
        span = min(window, now - self.started)
        return bits / span if span > 0 else 0.0

    def snapshot(self, now: float) -> dict[str, Any]:
        """The live fields of ``qkdd status`` (README "Status"), in their order."""
        return {
            "running": True,
            "pid": os.getpid(),
            "role": self.role,
            "link": self.link,
            "reason": self.reason,
            "peer": self.peer,
            "link_since": iso(self.link_since),
            "started_at": iso(self.started_at),
            "uptime_seconds": round(now - self.started, 1),
            "rounds_this_run": self.rounds_ended,
            **{
                f"secret_bits_per_second_{name}": round(self.rate(span, now), 1)
                for name, span in WINDOWS.items()
            },
            "reconciliation_efficiency": None if self.efficiency is None else round(self.efficiency, 4),
        }


def store_figures(store: KeyStore, role: str) -> dict[str, Any]:
    """The durable fields of ``qkdd status``, from the store (the caller owns it for the call)."""
    stats = store.statistics()
    last = stats.last_round or {}
    return {
        "link_id": store.link_id,
        "rounds_committed": stats.committed_rounds,
        "rounds_aborted": stats.aborted_rounds,
        "rounds_pending": stats.pending_rounds,
        "next_round": store.next_round,
        "last_round": last.get("round"),
        "last_round_at": iso(last.get("finished_at")),
        "last_round_state": last.get("state"),
        "last_round_reason": last.get("reason"),
        "last_qber": last.get("qber"),
        "last_phase_error": last.get("phase_error"),
        "auth": last.get("auth"),
        "stored_keys": stats.stored_keys,
        "stored_key_bits": stats.stored_key_bits,
        "epoch": store.epoch,
        "handshake_keys": store.reserve.handshake_keys().positions(),
        **delivery_figures(store, role),
        "delivery_assignments": store.ledger(role).assignments(),
    }


def delivery_figures(store: KeyStore, role: str) -> dict[str, Any]:
    """The key reserve and key delivery figures that the metrics export too."""
    reserve = store.reserve.status()
    ledger = store.ledger(role)
    return {
        "reserve_bits": reserve.available_bits,
        "reserve_total_bits": reserve.total_bits,
        "psk_retired": store.psk_retired,
        # ETSI 014 key delivery (§19): Bob's free pool, Alice's unused leases, keys waiting for their
        # slave SAEs, and the assignments of both sites' logs held here
        "delivery_available_bits": 8 * ledger.available_bytes(),
        "delivery_leased_bits": 8 * ledger.lease_bytes(),
        "delivery_waiting_keys": ledger.waiting_keys(),
    }
