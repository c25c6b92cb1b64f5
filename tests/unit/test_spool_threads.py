"""gateway.spool_threads.BatchThreads: blocking calls off the loop, handed back in batches."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gateway.spool_threads import BatchThreads


async def test_results_and_exceptions_reach_their_awaiters() -> None:
    threads = BatchThreads(2)
    try:
        def fail(text: str) -> None:
            raise OSError(28, text)

        assert await threads.run(pow, 2, 10) == 1024
        with pytest.raises(OSError, match="disk full"):
            await threads.run(fail, "disk full")
        assert await threads.run(lambda: "still working") == "still working"
    finally:
        threads.close()


async def test_calls_run_off_the_event_loop_thread() -> None:
    threads = BatchThreads(1)
    try:
        name = await threads.run(lambda: threading.current_thread().name)
        assert name == "spool-0" and name != threading.current_thread().name
    finally:
        threads.close()


async def test_many_calls_are_handed_back_in_few_batches() -> None:
    """While a thread is busy, calls queue up and come back with one loop callback."""
    threads = BatchThreads(1)
    loop = asyncio.get_running_loop()
    settled: list[int] = []
    real = loop.call_soon_threadsafe

    def counting(callback, *args):  # type: ignore[no-untyped-def]
        settled.append(len(args[0]))
        return real(callback, *args)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        gate = threading.Event()
        first = asyncio.ensure_future(threads.run(gate.wait, 5))
        await asyncio.sleep(0.05)  # the thread is now blocked in the first call
        rest = [asyncio.ensure_future(threads.run(lambda i=i: i)) for i in range(50)]
        await asyncio.sleep(0)
        gate.set()
        assert await first is True
        assert await asyncio.gather(*rest) == list(range(50))
    finally:
        loop.call_soon_threadsafe = real  # type: ignore[method-assign]
        threads.close()
    assert sum(settled) == 51 and len(settled) <= 3, settled


async def test_every_call_is_answered_under_concurrency() -> None:
    threads = BatchThreads(3)
    try:
        def slow(i: int) -> int:
            time.sleep(0.0005 if i % 7 == 0 else 0)
            return i * i

        results = await asyncio.gather(*(threads.run(slow, i) for i in range(500)))
        assert results == [i * i for i in range(500)]
    finally:
        threads.close()


async def test_a_cancelled_awaiter_does_not_break_the_batch() -> None:
    threads = BatchThreads(1)
    try:
        gate = threading.Event()
        blocker = asyncio.ensure_future(threads.run(gate.wait, 5))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(threads.run(lambda: "never read"))
        kept = asyncio.ensure_future(threads.run(lambda: "read"))
        await asyncio.sleep(0)
        doomed.cancel()
        gate.set()
        assert await blocker is True
        assert await kept == "read"
        with pytest.raises(asyncio.CancelledError):
            await doomed
    finally:
        threads.close()


async def test_close_finishes_queued_calls_then_refuses_new_ones() -> None:
    threads = BatchThreads(1)
    done: list[int] = []
    gate = threading.Event()
    first = asyncio.ensure_future(threads.run(gate.wait, 5))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(threads.run(done.append, 1))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.to_thread(threads.close)  # joins: the queued call has run
    assert done == [1]
    assert await first is True and await queued is None
    with pytest.raises(RuntimeError, match="closed"):
        await threads.run(done.append, 2)


def test_needs_a_thread() -> None:
    with pytest.raises(ValueError):
        BatchThreads(0)
