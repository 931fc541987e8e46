"""The status snapshot and its rates (trio's MockClock), and the Prometheus metrics fed from it."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from qkdd import metrics, monitor
from qkdd.records import RoundSummary
from qkdd.stages.confirm import TAG_BITS
from qkdd.stages.keylength import binary_entropy

WALL = 1_800_000_000.0  # 2027-01-15T08:00:00+00:00


def summary(number: int, secret: int, qber: float | None = 0.02, reason: str | None = None) -> RoundSummary:
    reconciled = 0 if qber is None else 10_000
    disclosed = 0 if qber is None else int(1.1 * 10_000 * binary_entropy(qber)) + TAG_BITS
    return RoundSummary(
        number,
        number,
        1 << 20,
        20_000,
        12_000,
        qber,
        0.03,
        disclosed,
        secret,
        reason is not None,
        reason,
        "psk",
        reconciled,
    )


class Wall:
    """A wall clock the test moves with trio's."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self.clock = clock

    def __call__(self) -> float:
        return WALL + self.clock.current_time()


def test_rates_over_the_last_minute_and_hour_with_a_mock_clock() -> None:
    clock = trio.testing.MockClock()

    async def main() -> None:
        book = monitor.Monitor("alice", wall=Wall(clock))
        book.start(trio.current_time())
        clock.jump(10)
        book.round_ended(summary(0, 6000), "committed", trio.current_time())
        clock.jump(20)
        book.round_ended(summary(1, 0, reason="QBER 12% exceeds threshold"), "aborted", trio.current_time())
        book.round_ended(summary(2, 3000), "committed", trio.current_time())
        # 30 s up: both windows average over the uptime, not over time the daemon did not run
        assert book.rate(60, trio.current_time()) == 9000 / 30
        assert book.rate(3600, trio.current_time()) == 9000 / 30
        clock.jump(70)  # 100 s: rounds 0 and 2 ended at 10 s and 30 s, out of the last minute
        assert book.rate(60, trio.current_time()) == 0
        assert book.rate(3600, trio.current_time()) == 9000 / 100
        book.round_ended(summary(3, 1200), "committed", trio.current_time())
        assert book.rate(60, trio.current_time()) == 1200 / 60
        clock.jump(3600)  # an hour later: everything aged out
        assert book.rate(3600, trio.current_time()) == 0
        snap = book.snapshot(trio.current_time())
        assert snap["uptime_seconds"] == 3700.0 and snap["rounds_this_run"] == 4
        assert snap["started_at"] == "2027-01-15T08:00:00+00:00"
        assert snap["secret_bits_per_second_1m"] == 0 and snap["secret_bits_per_second_1h"] == 0

    trio.run(main, clock=clock)


def test_bob_counts_a_pending_round_when_alice_commits_it_and_never_a_dropped_one() -> None:
    clock = trio.testing.MockClock()

    async def main() -> None:
        book = monitor.Monitor("bob", metrics=metrics.Metrics("bob", "lab"), wall=Wall(clock))
        book.start(trio.current_time())
        clock.jump(30)
        book.round_ended(summary(0, 4000), "pending", trio.current_time())
        book.round_ended(summary(1, 8000), "pending", trio.current_time())
        assert book.rate(60, trio.current_time()) == 0  # nothing committed yet
        book.committed([0, 7], trio.current_time())  # 7: not a round held here
        book.dropped([1])
        assert book.rate(60, trio.current_time()) == 4000 / 30
        assert book.metrics is not None
        found = samples(book.metrics)
        assert found[("qkdd_rounds_total", (("outcome", "committed"),))] == 1
        assert found[("qkdd_rounds_total", (("outcome", "aborted"),))] == 1
        assert found[("qkdd_secret_bytes_total", ())] == 500

    trio.run(main, clock=clock)


def test_link_state_reason_and_since() -> None:
    clock = trio.testing.MockClock()

    async def main() -> None:
        book = monitor.Monitor("alice", wall=Wall(clock))
        book.start(trio.current_time())
        assert (book.link, book.reason) == ("down", "starting")
        clock.jump(5)
        book.set_link("down: cannot connect to bob:7700: Connection refused")
        assert book.link_since == WALL  # still down: the state's start stays
        assert book.reason == "cannot connect to bob:7700: Connection refused"
        book.set_link("up", "10.0.0.2:7700")
        book.set_link("paused: key store full")
        snap = book.snapshot(trio.current_time())
        assert (snap["link"], snap["reason"], snap["peer"]) == ("paused", "key store full", "10.0.0.2:7700")
        assert snap["link_since"] == "2027-01-15T08:00:05+00:00"
        with pytest.raises(ValueError, match="not a link state"):
            book.set_link("sideways")
        book.set_link("down: protocol error bad-frame with 10.0.0.9:4000: \x1b[2J" + "x" * 1000)
        assert book.reason is not None and "\x1b" not in book.reason
        assert len(book.reason) == monitor.MAX_REASON

    trio.run(main, clock=clock)


def test_efficiency_is_disclosed_over_the_shannon_limit() -> None:
    round_ = summary(0, 100, qber=0.02)
    assert monitor.efficiency(round_) == pytest.approx(1.1, abs=1e-3)
    assert monitor.efficiency(summary(0, 0, qber=None)) is None
    assert monitor.efficiency(dataclasses.replace(round_, qber=0.0)) is None  # no errors: no limit to meet


def samples(exported: metrics.Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = exported.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_rounds_bits_stages_and_etsi014_requests() -> None:
    exported = metrics.Metrics("alice", "lab")
    book = monitor.Monitor("alice", metrics=exported)
    book.set_link("up", "peer")
    book.round_ended(summary(0, 5000), "committed", 1.0, {"IDLE": 0.01, "SIFTING": 0.2, "RECONCILING": 0.5})
    book.round_ended(summary(1, 0, qber=0.2, reason="too many errors"), "aborted", 2.0, {"SIFTING": 0.3})
    exported.store(
        {
            "reserve_bits": 9000,
            "psk_retired": True,
            "delivery_available_bits": 4096,
            "delivery_leased_bits": 0,
            "delivery_waiting_keys": 2,
        }
    )
    exported.etsi014_request("/api/v1/keys/sae-bob/enc_keys?number=2", 200, 0.004)
    exported.etsi014_request("/api/v1/keys/sae-bob/dec_keys", 400, 0.001)
    exported.etsi014_request("/anything/" + "x" * 500, 400, 0.001)  # cannot add a label value of its own
    found = samples(exported)
    assert found[("qkdd_rounds_total", (("outcome", "committed"),))] == 1
    assert found[("qkdd_rounds_total", (("outcome", "aborted"),))] == 1
    assert found[("qkdd_secret_bytes_total", ())] == 625
    assert found[("qkdd_sifted_bytes_total", ())] == 3000
    assert found[("qkdd_qber", ())] == 0.2 and found[("qkdd_link_up", ())] == 1
    assert found[("qkdd_reserve_bytes", ())] == 1125 and found[("qkdd_psk_retired", ())] == 1
    assert found[("qkdd_round_stage_duration_seconds_count", (("stage", "sifting"),))] == 2
    assert found[("qkdd_round_stage_duration_seconds_sum", (("stage", "reconciling"),))] == 0.5
    assert found[("qkdd_round_duration_seconds_count", ())] == 2
    assert found[("qkdd_etsi014_requests_total", (("route", "enc_keys"), ("status", "200")))] == 1
    assert found[("qkdd_etsi014_requests_total", (("route", "other"), ("status", "400")))] == 1
    assert found[("qkdd_etsi014_request_duration_seconds_count", (("route", "dec_keys"),))] == 1
    assert found[("qkdd_info", (("link_id", "lab"), ("role", "alice")))] == 1
    names = {family.name for family in text_string_to_metric_families(exported.exposition().decode())}
    # the parser names counters without _total: NAMES lists each family as it is exposed
    assert {name.removesuffix("_total") for name in metrics.NAMES} == names


def test_two_daemons_in_one_process_keep_their_metrics_apart() -> None:
    first, second = metrics.Metrics("alice", "lab"), metrics.Metrics("bob", "lab")
    first.committed(100)
    assert samples(first)[("qkdd_secret_bytes_total", ())] == 12.5
    assert samples(second)[("qkdd_secret_bytes_total", ())] == 0


def test_iso_timestamps_are_utc_with_an_offset() -> None:
    assert monitor.iso(WALL) == "2027-01-15T08:00:00+00:00" and monitor.iso(None) is None
