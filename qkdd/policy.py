"""Protocol policy as pure functions (protocol/qkdp-v2.md §17, §22): which handshake key to use, when to
take a new one, when the PSK retires; how much of a round refills the reserve and how long its output is;
how long to wait after rounds lost to an attacker.

Theory of operation
-------------------
A side's handshake keys are at most two positions in the key reserve: ``current``, the key of the last
handshake that verified, and ``next``, a key Alice has announced in ``resolve`` and that has not been used
yet. Both hellos list them; both sides pick the same key from the two lists (:func:`choose_key`). Keys
change only on authenticated events: a verified proof retires every older key (:func:`after_verified`),
and Alice takes a new key only after an authenticated ``sync`` and only when the reserve has grown since
her current key was adopted (:func:`want_new_key`), so cutting connections spends nothing. Nothing here
reads a clock, the disk or the network: the engine, ``qkdd conform`` and the tests call the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

HANDSHAKE_KEY_BITS = 256
"""Reserve bits of one handshake key (the HMAC key of the PSK handshake, §12, in place of the PSK)."""
UPGRADE_KEY = 0
"""The handshake key of a link upgraded from qkdp/1 after its PSK was retired: the 128 hash-key bits of
the reserve, the only secret both sides surely share unused by a pad. Used for the first handshake only:
its resolve announces a key of 256 fresh bits at once. A new link never uses it (its PSK authenticates
until a key it announced is held by both)."""


@dataclass(frozen=True, slots=True)
class HandshakeKeys:
    """One side's handshake keys (reserve positions) and the reserve's size when ``current`` was adopted."""

    current: int | None = None
    next: int | None = None
    since: int = 0

    def positions(self) -> list[int]:
        """The keys this side holds, oldest first."""
        return [key for key in (self.current, self.next) if key is not None]


def choose_key(ours: Sequence[int], theirs: Sequence[int]) -> int | None:
    """§17: the newest key both hellos list (``None``: none in common). Both sides compute the same."""
    common = set(ours) & set(theirs)
    return max(common) if common else None


def after_verified(keys: HandshakeKeys, used: int, reserve_total: int) -> HandshakeKeys:
    """The keys once the peer's proof made with key ``used`` verified: every older key retires, since the
    peer holds ``used`` and never again needs an older one (only an authenticated proof moves keys)."""
    if used == keys.current:
        return keys
    if used == keys.next:
        return HandshakeKeys(used, None, reserve_total)
    raise ValueError(f"handshake key {used} is not one of {keys}")


def want_new_key(keys: HandshakeKeys, reserve_total: int, switch_bits: int, *, keyed: bool) -> bool:
    """Alice: whether to announce a new key now. Never while one is announced and unused (she sends that
    one again); otherwise when this connection was not authenticated by a handshake key (the first key, or
    a link re-bootstrapped after its keys parted), or when the reserve grew since the current key was
    adopted. So a connection that is cut after ``resolve`` costs no key bits."""
    if keys.next is not None or reserve_total < switch_bits:
        return False
    return keys.current is None or not keyed or reserve_total > keys.since


def key_fits(position: int, consumed: int, common_total: int) -> bool:
    """Whether a new key can start at ``position`` (the agreed first unused bit) in both reserves."""
    return position >= consumed and position + HANDSHAKE_KEY_BITS <= common_total


def retire_psk(auth: str, retired: bool, fallback_to_psk: bool) -> bool:
    """Whether a verified handshake retires the bootstrap PSK: the first one authenticated by a reserve
    key, unless ``auth.fallback_to_psk`` keeps it."""
    return auth == "reserve" and not retired and not fallback_to_psk


def reserve_refill(
    bound: int, available_bits: int, per_round: int, target_bits: int, key_block_bits: int = 0
) -> int:
    """Alice: how many leading output bits of a round go to the key reserve (§17): up to ``per_round``
    while the reserve holds fewer than ``target_bits`` unused bits, never more than a quarter of the
    round's length bound ``bound`` (the rest is key), and never so many that no whole key block of
    ``key_block_bits`` is left when the bound has room for one (a round then yields key, not nothing).
    Bob takes her word and checks the output length."""
    share = max(0, min(per_round, target_bits - available_bits, bound // 4))
    if key_block_bits and bound >= key_block_bits:
        share = min(share, bound - key_block_bits)
    return share


def output_bits(bound: int, reserve_bits: int, key_block_bits: int) -> int:
    """A round's output length (§17): the reserve bits plus whole key blocks of what the bound leaves
    (both sides drop the same tail); 0 when not even one block fits."""
    key_bits = (bound - reserve_bits) // key_block_bits * key_block_bits
    return reserve_bits + key_bits if key_bits > 0 else 0


LOST_ROUND_FIRST_DELAY = 1.0
LOST_ROUND_LONGEST_DELAY = 86400.0


def lost_round_delay(
    available_bits: int, available_after_commit: int, target_bits: int, round_bits: int
) -> float:
    """Alice: seconds to wait before opening the next reserve round.

    A round that spent its pads and committed nothing (an attacker can cut every round after its first
    tag) costs the reserve without refilling it. Below half of its target, each such round doubles the
    wait, up to a day: an attack that never stops takes about log2(one day) rounds' pads and then one a
    day, so half the default reserve lasts about two months of it, and a committed round ends the
    backoff (qkdp-v2.md §22, I3).

    Args:
        available_bits: unused reserve bits now.
        available_after_commit: unused reserve bits right after the last round that committed.
        target_bits: ``auth.reserve_target_bits``.
        round_bits: the pads one reserve round takes.
    """
    lost = (available_after_commit - available_bits) // round_bits
    if available_bits >= target_bits // 2 or lost <= 0:
        return 0.0
    return float(min(LOST_ROUND_LONGEST_DELAY, LOST_ROUND_FIRST_DELAY * 2.0 ** min(lost - 1, 64)))


def may_start_round(open_states: Sequence[str], window: int, *, ended_one: bool = True) -> bool:
    """Alice opens a round while fewer than ``window`` are open and every open one is past sifting
    (§13): the new round's link frame and sifting then overlap the open rounds' estimation,
    reconciliation and amplification instead of competing with another round's sifting, and on a long
    round trip a round opens every sifting's worth of work, not every sifting and estimation's round
    trips. Until a round of the connection has ended (``ended_one``), its first round runs alone, so that
    the first key comes as soon as on a connection without rounds in flight."""
    if not ended_one and open_states:
        return False
    return len(open_states) < window and "SIFTING" not in open_states


ROUNDS_ON_LOOPBACK = 8
"""Rounds Alice keeps open when the round trip costs nothing: enough for one round's link frame and sifting
to overlap the others' reconciliation and amplification; more only cost memory and page faults."""
ROUNDS_PER_MS = 1.2
"""Rounds Alice keeps open on top of those per millisecond of the round trip: a 2^26-pulse round waits
for 105–120 Cascade round trips, and a round starts about every 0.25 s, so each millisecond of round
trip keeps about half a round more in flight; 1.2 leaves room for the queueing of many rounds on one
connection."""


def rounds_to_open(round_trip: float) -> int:
    """Alice: how many rounds to keep open at most on a connection whose round trip is ``round_trip``
    seconds (as she measures it: from her estimate answer to the round's first Cascade request); the
    connection's window bounds it too (memory: about 50 MB an open round at 2^26 pulses), and this keeps
    a short round trip from paying for a window it cannot use."""
    return ROUNDS_ON_LOOPBACK + math.ceil(ROUNDS_PER_MS * max(0.0, round_trip) * 1e3)


UNRELATED_ERROR = 0.35
"""An error rate at or above this means Alice's and Bob's bits are about unrelated (1/2 at random): far
above any working link (a few %) and the abort threshold (11%), and what a mismatched link configuration
(the simulator's seed, a hardware timing offset) gives rather than an eavesdropper, who must stay below
the threshold to learn anything unseen."""
UNRELATED_ROUNDS = 3
"""Rounds in a row near 1/2 error before Alice says so and backs off."""
UNRELATED_FIRST_DELAY = 5.0
UNRELATED_LONGEST_DELAY = 300.0


def unrelated(qber: float | None, phase_error: float | None) -> bool:
    """Whether a round's measured error rates say the two sides' bits are unrelated."""
    return max(qber or 0.0, phase_error or 0.0) >= UNRELATED_ERROR


def unrelated_delay(streak: int) -> float:
    """Alice: seconds to wait before the next round after ``streak`` rounds in a row near 1/2 error:
    none below :data:`UNRELATED_ROUNDS`, then doubling up to five minutes, so that a misconfigured link
    does not spin through frames (and log lines) while the operator fixes it."""
    if streak < UNRELATED_ROUNDS:
        return 0.0
    return min(UNRELATED_LONGEST_DELAY, UNRELATED_FIRST_DELAY * 2.0 ** min(streak - UNRELATED_ROUNDS, 16))
