"""Background threads run at a lower priority than the rest of the daemon (qkdd.background)."""

from __future__ import annotations

import os
import threading

import pytest
import trio
import trio.testing

from qkdd import background


def test_background_threads_alone_run_at_a_lower_priority() -> None:
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness()
    with background.executor("test-background") as pool:
        inside = pool.submit(niceness).result(timeout=10)
    assert inside == min(19, before + background.NICENESS)
    assert niceness() == before  # the calling thread (and the process) keep theirs
    with background.executor("test-urgent", lower=False) as pool:  # work the round is about to wait for
        assert pool.submit(niceness).result(timeout=10) == before


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux names threads in /proc")
def test_background_threads_carry_their_name_for_the_os() -> None:
    def comm() -> str:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()

    mine = comm()
    with background.executor("qkdd-test-naming-long") as pool:
        assert pool.submit(comm).result(timeout=10) == "qkdd-test-namin"  # 15 bytes: the kernel's limit
    assert comm() == mine


@pytest.mark.trio
async def test_a_serial_thread_runs_each_call_on_its_one_thread_in_order() -> None:
    worker = background.SerialThread("qkdd-test-serial")
    seen: list[tuple[int, int]] = []

    def note(number: int) -> int:
        seen.append((number, threading.get_ident()))
        return number * 2

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for number in range(5):
                nursery.start_soon(worker.run, note, number)
        assert await worker.run(note, 7) == 14
    assert sorted(n for n, _ in seen) == [0, 1, 2, 3, 4, 7]
    threads = {thread for _, thread in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads


@pytest.mark.trio
async def test_a_serial_thread_raises_the_calls_error_and_goes_on() -> None:
    worker = background.SerialThread("qkdd-test-serial")

    def fail() -> None:
        raise ValueError("the call failed")

    with trio.fail_after(10):
        with pytest.raises(ValueError, match="the call failed"):
            await worker.run(fail)
        assert await worker.run(len, "abc") == 3


@pytest.mark.trio
async def test_a_call_handed_to_a_serial_thread_runs_to_its_end_even_if_its_task_is_cancelled() -> None:
    """As trio.to_thread.run_sync: cancelled before the hand-over, the call never runs; after it, the
    task waits for the call's end and gets its result (a store transaction is never left half done);
    the cancellation comes at its next checkpoint."""
    worker = background.SerialThread("qkdd-test-serial")
    started, go = threading.Event(), threading.Event()
    ran: list[str] = []

    def slow() -> None:
        started.set()
        go.wait(10)
        ran.append("slow")

    with trio.fail_after(10):
        with trio.CancelScope() as before:
            before.cancel()
            await worker.run(ran.append, "never")
        assert before.cancelled_caught
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def call() -> None:
                with scope:
                    await worker.run(slow)
                    ran.append("returned")
                    await trio.lowlevel.checkpoint()
                    ran.append("not cancelled")

            nursery.start_soon(call)
            await trio.to_thread.run_sync(started.wait, 10)
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert ran == []  # still waiting for the call
            go.set()
        assert scope.cancelled_caught and ran == ["slow", "returned"]


@pytest.mark.trio
async def test_a_closed_serial_thread_ends_and_a_later_call_starts_another() -> None:
    worker = background.SerialThread("qkdd-test-serial")
    with trio.fail_after(10):
        first = await worker.run(threading.current_thread)
        worker.close()
        await trio.to_thread.run_sync(first.join, 10)
        assert not first.is_alive()
        second = await worker.run(threading.current_thread)
        assert second is not first and second.is_alive()
        worker.close()
