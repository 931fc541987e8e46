"""The figures `qkdd bench e2e` derives from a run: its steady rounds and their CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from qkdd.demo import WATCH_SECONDS, ProcessWatch, rounds_in_flight, steady_rounds

SAMPLES = [(10.0, 1.0), (11.0, 3.0), (12.0, 3.5), (14.0, 5.5)]


def test_the_cpu_between_two_moments_is_interpolated_between_samples() -> None:
    assert ProcessWatch.between(SAMPLES, 10.0, 14.0) == pytest.approx(4.5)
    assert ProcessWatch.between(SAMPLES, 10.5, 13.0) == pytest.approx(4.5 - 2.0)  # 4.5 at 13, 2 at 10.5
    assert ProcessWatch.between(SAMPLES, 11.0, 11.0) is None


@pytest.mark.parametrize(("start", "end"), [(9.0, 12.0), (11.0, 14.5), (12.0, 11.0)])
def test_a_stretch_the_samples_do_not_cover_has_no_figure(start: float, end: float) -> None:
    assert ProcessWatch.between(SAMPLES, start, end) is None
    assert ProcessWatch.between([], 1.0, 2.0) is None


@pytest.mark.timeout(30)
def test_the_watch_reads_a_live_process() -> None:
    watch = ProcessWatch([os.getpid()])
    try:
        while len(watch.cpu) < 3:  # busy: this process's CPU grows between samples
            sum(range(10_000))
    finally:
        watch.stop()
    (t0, c0), (t1, c1) = watch.cpu[0], watch.cpu[-1]
    assert t1 > t0 and c1 >= c0 > 0 and watch.bytes > 0


@pytest.mark.timeout(30)
def test_a_process_that_ended_keeps_its_last_reading_so_the_samples_cover_the_end() -> None:
    child = subprocess.Popen([sys.executable, "-c", "sum(range(20_000_000))"])
    watch = ProcessWatch([child.pid])
    try:
        child.wait()  # reaped: its /proc entry is gone
        ended = time.time()
        deadline = time.monotonic() + 10
        while not (watch.cpu and watch.cpu[-1][0] > ended) and time.monotonic() < deadline:
            time.sleep(WATCH_SECONDS)  # polls the watch's progress; the deadline only bounds a failure
    finally:
        watch.stop()
    assert watch.cpu[-1][0] > ended, "no sample after the process ended"
    readings = [cpu for _, cpu in watch.cpu]
    assert readings == sorted(readings) and readings[-1] > 0
    assert ProcessWatch.between(watch.cpu, watch.cpu[0][0], ended) is not None


def test_steady_rounds_leave_out_filling_and_draining_the_window() -> None:
    rounds = [{"finished_at": float(i)} for i in range(7)]
    steady, since = steady_rounds(rounds, 2)
    assert [r["finished_at"] for r in steady] == [2.0, 3.0, 4.0, 5.0] and since == 1.0
    assert steady_rounds(rounds[:4], 2) == ([], None)


def test_the_rounds_in_flight_are_read_from_when_each_round_started_and_ended() -> None:
    # (finished_at, seconds): one alone, then three at once, then one starting as another ends
    rounds = [(1.0, 1.0), (4.0, 2.5), (4.5, 2.0), (5.0, 2.0), (7.0, 2.0)]
    assert rounds_in_flight([{"finished_at": end, "seconds": took} for end, took in rounds]) == 3
    assert rounds_in_flight([{"finished_at": 2.0, "seconds": 1.0}, {"finished_at": 3.0, "seconds": 1.0}]) == 1
    assert rounds_in_flight([]) == 0
