"""Threads that run the spool's blocking file calls in batches, off the event loop.

Theory of operation
-------------------
Every accepted message costs the spool three or four blocking calls (write and fsync,
directory fsync, unlink). Through a `ThreadPoolExecutor` each call is one thread
wake-up, one hand-over of the GIL, and one `call_soon_threadsafe` (a write to the
loop's wake-up fd) with its own callback; under load those hand-overs cost about as
much CPU as the calls themselves (futex and context-switch time: 80 futex calls per
message were counted).

`BatchThreads` keeps a few long-lived threads, each with its own queue of calls. The
event loop appends a call to the queue of a thread that is busy anyway (as long as
fewer than four calls wait there), else to a waiting thread, which it wakes; when all
are busy and full, to the shortest queue. A thread takes *everything* queued for it,
runs the calls one after another, and hands all their results back with one
`call_soon_threadsafe`. Under load a thread finds several calls per wake-up and the
loop gets one callback per batch.

Several threads keep slow calls from queueing behind each other: fsyncs of different
files run in parallel, and the file system's journal merges them as before (group
commit). A call's exception is raised by its awaiter, as with `run_in_executor`.

`close()` lets the threads finish what is queued and joins them; `submit` after that
raises RuntimeError.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["BatchThreads"]

R = TypeVar("R")
#: Calls queued for a busy thread before a waiting one is woken instead.
_ENOUGH_QUEUED = 4
_Call = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]
_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


class _Worker:
    """One thread and its queue; the queue and `waiting` are guarded by `ready`."""

    def __init__(self, name: str) -> None:
        self.ready = threading.Condition(threading.Lock())
        self.calls: deque[tuple[asyncio.AbstractEventLoop, _Call]] = deque()
        self.waiting = False
        self.closing = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def put(self, loop: asyncio.AbstractEventLoop, call: _Call) -> None:
        with self.ready:
            if self.closing:
                raise RuntimeError("spool threads are closed")
            self.calls.append((loop, call))
            if self.waiting:
                self.waiting = False
                self.ready.notify()


    def close(self) -> None:
        with self.ready:
            self.closing = True
            self.ready.notify()
        self.thread.join()

    def _run(self) -> None:
        while True:
            with self.ready:
                while not self.calls and not self.closing:
                    self.waiting = True
                    self.ready.wait()
                self.waiting = False
                if not self.calls:
                    return  # closing, and nothing left to do
                batch = list(self.calls)
                self.calls.clear()
            by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
            for loop, (future, function, args) in batch:
                try:
                    outcome: _Outcome = (future, function(*args), None)
                except BaseException as exc:  # handed to the awaiter, like an executor
                    outcome = (future, None, exc)
                by_loop.setdefault(loop, []).append(outcome)
            for loop, outcomes in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_settle, outcomes)
                except RuntimeError:
                    pass  # that loop is closed: nobody awaits these any more


def _settle(outcomes: list[_Outcome]) -> None:
    for future, result, error in outcomes:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class BatchThreads:
    """`threads` worker threads running blocking calls in batches (see the module doc)."""

    def __init__(self, threads: int = 4, name: str = "spool") -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._workers = [_Worker(f"{name}-{i}") for i in range(threads)]

    async def run(self, function: Callable[..., R], *args: Any) -> R:
        """`function(*args)` in one of the threads; its result, or its exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pick().put(loop, (future, function, args))
        return await future

    def _pick(self) -> _Worker:
        # A running thread takes the call with its next batch, without a wake-up; wake
        # a waiting one only when the running ones already have enough queued.
        # (Read without the lock: a stale answer only costs a wake-up or a short wait.)
        idle = None
        for worker in self._workers:
            if worker.waiting:
                idle = idle or worker
            elif len(worker.calls) < _ENOUGH_QUEUED:
                return worker
        return idle or min(self._workers, key=lambda worker: len(worker.calls))

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
