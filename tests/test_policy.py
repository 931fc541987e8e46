"""The pure policy functions of qkdp-v2.md §17 (handshake keys, the PSK) and §22 (lost rounds)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdd import policy
from qkdd.policy import HandshakeKeys


def test_the_newest_common_key_is_chosen_and_both_sides_choose_the_same() -> None:
    assert policy.choose_key([0, 500], [500]) == 500
    assert policy.choose_key([128, 500], [128, 900]) == 128
    assert policy.choose_key([128], [500]) is None
    assert policy.choose_key([], []) is None


@given(st.lists(st.integers(0, 2000), max_size=3), st.lists(st.integers(0, 2000), max_size=3))
def test_the_choice_is_symmetric(ours: list[int], theirs: list[int]) -> None:
    assert policy.choose_key(ours, theirs) == policy.choose_key(theirs, ours)


def test_a_verified_proof_retires_older_keys_only() -> None:
    keys = HandshakeKeys(700, 1200, 5000)
    assert policy.after_verified(keys, 700, 9000) == keys
    assert policy.after_verified(keys, 1200, 9000) == HandshakeKeys(1200, None, 9000)
    upgraded = HandshakeKeys(policy.UPGRADE_KEY, None, 0)
    assert policy.after_verified(upgraded, policy.UPGRADE_KEY, 9000) == upgraded
    with pytest.raises(ValueError, match="not one of"):
        policy.after_verified(keys, 128, 9000)


def test_a_new_key_only_after_a_refill_or_on_a_bootstrap_connection_and_never_while_one_waits() -> None:
    assert not policy.want_new_key(HandshakeKeys(700, 1200), 9000, 1024, keyed=True)
    assert not policy.want_new_key(HandshakeKeys(700, None, 9000), 9000, 1024, keyed=True)
    assert policy.want_new_key(HandshakeKeys(700, None, 9000), 9001, 1024, keyed=True)
    assert policy.want_new_key(HandshakeKeys(700, None, 9000), 9000, 1024, keyed=False)
    assert policy.want_new_key(HandshakeKeys(), 2048, 1024, keyed=False)
    assert not policy.want_new_key(HandshakeKeys(), 1000, 1024, keyed=False)
    assert policy.key_fits(2000, 2000, 2256) and not policy.key_fits(2000, 2000, 2255)
    assert not policy.key_fits(1999, 2000, 9000)


def test_the_psk_retires_on_the_first_reserve_handshake_unless_kept() -> None:
    assert policy.retire_psk("reserve", retired=False, fallback_to_psk=False)
    assert not policy.retire_psk("reserve", retired=True, fallback_to_psk=False)
    assert not policy.retire_psk("reserve", retired=False, fallback_to_psk=True)
    assert not policy.retire_psk("psk", retired=False, fallback_to_psk=False)


def test_rounds_lost_after_their_tags_back_off_exponentially_only_when_the_reserve_is_low() -> None:
    target, cost = 65536, 366
    assert policy.lost_round_delay(60000, 60000 + 5 * cost, target, cost) == 0  # plenty left
    low = target // 2 - 1
    assert policy.lost_round_delay(low, low, target, cost) == 0  # nothing lost since the last commit
    delays = [policy.lost_round_delay(low - n * cost, low, target, cost) for n in range(1, 8)]
    assert delays == [1, 2, 4, 8, 16, 32, 64]
    assert policy.lost_round_delay(0, low + 100 * cost, target, cost) == policy.LOST_ROUND_LONGEST_DELAY


def test_an_attack_that_never_stops_takes_logarithmically_many_rounds_then_one_a_day() -> None:
    """Sixty days of rounds cut after their tags, each as soon as the backoff allows, from the point
    where the backoff starts: about log2(one day) rounds while the wait doubles, then one a day; half the
    default reserve outlasts it."""
    target, cost = 65536, 366
    available = after_commit = target // 2 - 1
    elapsed, lost = 0.0, 0
    while elapsed < 60 * 86400.0:
        elapsed += policy.lost_round_delay(available, after_commit, target, cost)
        available -= cost
        lost += 1
    assert lost <= 17 + 60 + 1
    assert available > 0


def test_a_round_refills_the_reserve_up_to_its_target_with_at_most_a_quarter_of_its_bound() -> None:
    assert policy.reserve_refill(100_000, 1000, 2048, 65536) == 2048
    assert policy.reserve_refill(100_000, 65000, 2048, 65536) == 536
    assert policy.reserve_refill(100_000, 70000, 2048, 65536) == 0
    assert policy.reserve_refill(4000, 1000, 2048, 65536) == 1000


def test_the_output_is_the_reserve_share_and_whole_key_blocks_or_nothing() -> None:
    assert policy.output_bits(10_000, 2048, 256) == 2048 + 31 * 256
    assert policy.output_bits(2048 + 255, 2048, 256) == 0
    assert policy.output_bits(256, 0, 256) == 256


def test_alice_keeps_more_rounds_open_the_longer_the_round_trip() -> None:
    """Loopback keeps 8 open; each millisecond of round trip 1.2 more (the window caps it, not this)."""
    assert policy.rounds_to_open(0.0) == policy.rounds_to_open(-1.0) == 8
    assert policy.rounds_to_open(0.0005) == 9
    assert policy.rounds_to_open(0.010) == 8 + 12
    assert policy.rounds_to_open(0.050) == 8 + 60
