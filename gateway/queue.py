"""The queue manager: from the durable spool to storage, with retries and DSNs.

Theory of operation
-------------------
Every message in the spool has a `QueueEntry` in memory: its envelope, which
recipients are done or failed (from the state log), the attempt count and the time of
the next attempt. A freshly accepted message is attempted at once, from the bytes
still in memory; later attempts read the spool file again.

An attempt asks the router to group the pending recipients by destination (each
mailbox's storage backend is looked up again at every attempt, so a migrated
mailbox follows its new backend), delivers the groups concurrently, and writes all
of the attempt's outcomes to the state log in one synced append:

* 2xx: the recipient is done;
* 5xx: the recipient failed; a DSN will report it;
* 4xx: the recipient stays pending; the next attempt is scheduled with exponential
  backoff (retry_min doubling up to retry_max, ±20 % jitter so a storage outage
  does not end in a thundering herd), until the message is older than `lifetime`,
  when pending recipients fail with 4.4.7.

When no recipient is pending, failures (if any) become one DSN to the envelope
sender (never to the null sender, never for a DSN, never for spam: see dsn.py),
queued as a message of its own, and the entry is removed from the spool: message
file first, state second, so a crash in between leaves only a stale state file that
recovery deletes.

At start-up every message in the spool is loaded with its state and scheduled:
nothing that got a 250 is forgotten by a restart. Crash between a delivery and its
state append means that recipient is delivered again (the unavoidable at-least-once
window of any MTA); nothing is ever lost.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import QueueSettings
from gateway.delivery import Outcome
from gateway.metrics import Metrics
from gateway.spool import (
    Attempt,
    CorruptEntry,
    Done,
    Dropped,
    Envelope,
    Failed,
    Spool,
    StateRecord,
)

log = logging.getLogger(__name__)

EXPIRED = Outcome(450, "4.4.7", "Message expired in queue: delivery kept failing temporarily")


class PerTenant:
    """`metric.labels(metrics.tenant(t))`, remembered per tenant id.

    labels() joins, hashes and locks on every call (a few µs, several times per
    message); the child it returns for a tenant never changes: TenantLabels only grows
    to its limit, after which a new tenant stays "other" for good. Emptied when full,
    so tens of thousands of tenants cost no more than today.
    """

    __slots__ = ("_children", "_label", "_metric")
    MAX = 4096

    def __init__(self, metric: Any, label: Callable[[str | None], str]) -> None:
        self._metric = metric
        self._label = label
        self._children: dict[str | None, Any] = {}

    def __call__(self, tenant: str | None) -> Any:
        child = self._children.get(tenant)
        if child is None:
            if len(self._children) >= self.MAX:
                self._children.clear()
            child = self._children[tenant] = self._metric.labels(self._label(tenant))
        return child


@dataclass(slots=True)
class QueueEntry:
    envelope: Envelope
    message: bytes | None = None  # kept only until the first attempt
    done: set[int] = field(default_factory=set)
    failed: dict[int, Failed] = field(default_factory=dict)
    attempts: int = 0
    next_at: float = 0.0
    last_error: str = ""
    running: bool = False
    dropped: bool = False
    # False only while no state log can exist for it: accepted by this process and
    # never given a record (a recovered entry may have one).
    state_logged: bool = True

    @property
    def id(self) -> str:
        return self.envelope.id

    def pending(self) -> list[int]:
        return [i for i in range(len(self.envelope.recipients))
                if i not in self.done and i not in self.failed]

    def apply(self, record: StateRecord) -> None:
        if isinstance(record, Done):
            self.done.add(record.index)
        elif isinstance(record, Failed):
            self.failed[record.index] = record
        elif isinstance(record, Attempt):
            self.attempts = max(self.attempts, record.count)
            self.next_at = record.next_at
            self.last_error = record.last_error
        elif isinstance(record, Dropped):
            self.dropped = True


class Router:
    """What the queue needs from the router (gateway/router.py)."""

    async def deliver(self, entry: QueueEntry, message: bytes,
                      pending: list[int]) -> dict[int, Outcome]:
        raise NotImplementedError


DsnHook = Callable[[QueueEntry, bytes], Awaitable[None]]


class Queue:
    def __init__(self, spool: Spool, router: Router, settings: QueueSettings,
                 metrics: Metrics, on_failures: DsnHook | None = None) -> None:
        self.spool = spool
        self.router = router
        self.settings = settings
        self.metrics = metrics
        self.on_failures = on_failures
        self.entries: dict[str, QueueEntry] = {}
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._active = asyncio.Semaphore(settings.max_active)
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._stopping = False
        self.idle = asyncio.Event()
        self.idle.set()
        self._delivered = PerTenant(metrics.delivered, metrics.tenant)
        self._deferred_count = PerTenant(metrics.deferred, metrics.tenant)
        self._bounced = PerTenant(metrics.bounced, metrics.tenant)
        self._depth_active = metrics.queue_depth.labels("active")
        self._depth_deferred = metrics.queue_depth.labels("deferred")
        # Ids of entries counted as deferred (tried, recipients still pending), kept up to
        # date per entry so the gauges cost O(1) per message, not a walk of the queue.
        self._deferred: set[str] = set()

    # -- life cycle ------------------------------------------------------------------

    async def start(self) -> int:
        """Recover every message in the spool and start scheduling; returns the count."""
        recovered = await asyncio.to_thread(self._recover)
        for entry in recovered:
            self.entries[entry.id] = entry
            self._schedule(entry, entry.next_at)
        if recovered:
            log.info("queue: recovered %d message(s) from the spool", len(recovered))
        self._update_gauges()
        self._scheduler = asyncio.create_task(self._run_scheduler(), name="queue-scheduler")
        return len(recovered)

    def _recover(self) -> list[QueueEntry]:
        entries = []
        for queue_id in self.spool.queued_ids():
            try:
                envelope, _ = self.spool.load_sync(queue_id)
            except (CorruptEntry, OSError) as exc:
                log.error("queue: %s cannot be read (%s); moved to corrupt/", queue_id, exc)
                self.spool.quarantine_corrupt(queue_id)
                continue
            entry = QueueEntry(envelope)
            for record in self.spool.load_state_sync(queue_id):
                entry.apply(record)
            if entry.dropped or (not entry.pending() and not entry.failed):
                self.spool.remove_sync(queue_id)
                continue
            entries.append(entry)
        return entries

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        if self._tasks:
            _, still = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)

    # -- intake ----------------------------------------------------------------------

    def submit(self, envelope: Envelope, message: bytes) -> None:
        """A message just committed to the spool: attempt it at once, from memory."""
        entry = QueueEntry(envelope, message=message, state_logged=False)
        self.entries[entry.id] = entry
        self._update_gauges(entry)
        self._launch(entry)

    # -- scheduling ------------------------------------------------------------------

    def _schedule(self, entry: QueueEntry, when: float) -> None:
        entry.next_at = when
        heapq.heappush(self._heap, (when, entry.id))
        self._wake.set()

    async def _run_scheduler(self) -> None:
        while True:
            now = time.time()
            while self._heap and self._heap[0][0] <= now:
                when, queue_id = heapq.heappop(self._heap)
                entry = self.entries.get(queue_id)
                if entry is None or entry.running or entry.next_at != when:
                    continue  # finished, already running, or rescheduled since
                self._launch(entry)
            delay = self._heap[0][0] - now if self._heap else 3600.0
            self._wake.clear()
            try:
                async with asyncio.timeout(max(0.0, min(delay, 3600.0))):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _launch(self, entry: QueueEntry) -> None:
        if self._stopping:
            return
        entry.running = True
        self.idle.clear()
        task = asyncio.create_task(self._attempt(entry), name=f"deliver-{entry.id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self.idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("queue: delivery task failed", exc_info=task.exception())

    def backoff(self, attempts: int) -> float:
        base = min(self.settings.retry_max, self.settings.retry_min * 2 ** max(0, attempts - 1))
        return float(base * random.uniform(0.8, 1.2))

    # -- one attempt -----------------------------------------------------------------

    async def _attempt(self, entry: QueueEntry) -> None:
        try:
            async with self._active:
                await self._attempt_locked(entry)
        finally:
            entry.running = False

    async def _attempt_locked(self, entry: QueueEntry) -> None:
        if entry.id not in self.entries:
            return
        message = entry.message
        entry.message = None
        if message is None:
            try:
                _, message = await self.spool.load(entry.id)
            except (OSError, CorruptEntry) as exc:
                log.error("queue: %s cannot be read for delivery (%s)", entry.id, exc)
                self._schedule(entry, time.time() + self.backoff(entry.attempts + 1))
                return
        pending = entry.pending()
        outcomes = await self.router.deliver(entry, message, pending) if pending else {}
        now = time.time()
        records: list[StateRecord] = []
        temporary: list[str] = []
        expired = now - entry.envelope.received > self.settings.lifetime
        for index in pending:
            outcome = outcomes.get(index) or Outcome(451, "4.3.0", "no outcome from router")
            recipient = entry.envelope.recipients[index]
            tenant = recipient.tenant
            if outcome.delivered:
                records.append(Done(index=index, code=outcome.code, status=outcome.status,
                                    text=outcome.text[:200], at=now))
                self._delivered(tenant).inc()
                log.info("queue=%s to=<%s> status=delivered via %s: %s %s %s", entry.id,
                         recipient.mailbox, outcome.remote, outcome.code, outcome.status,
                         outcome.text)
                continue
            if outcome.temporary and expired:
                # RFC 3464: a message given up on after retries is "failed" with the
                # temporary status 4.4.7, so the DSN says why it never arrived.
                log.info("queue=%s to=<%s> status=expired last=%s %s %s", entry.id,
                         recipient.mailbox, outcome.code, outcome.status, outcome.text)
                records.append(Failed(index=index, code=EXPIRED.code, status=EXPIRED.status,
                                      text=f"{EXPIRED.text}; last reply: {outcome.code} "
                                           f"{outcome.status} {outcome.text}"[:500],
                                      remote=outcome.remote, at=now))
                self._bounced(tenant).inc()
            elif outcome.temporary:
                temporary.append(f"{outcome.code} {outcome.status} {outcome.text}")
                self._deferred_count(tenant).inc()
                log.info("queue=%s to=<%s> status=deferred via %s: %s %s %s", entry.id,
                         recipient.mailbox, outcome.remote, outcome.code, outcome.status,
                         outcome.text)
            else:
                records.append(Failed(index=index, code=outcome.code, status=outcome.status,
                                      text=outcome.text[:500], remote=outcome.remote, at=now))
                self._bounced(tenant).inc()
                log.info("queue=%s to=<%s> status=failed via %s: %s %s %s", entry.id,
                         recipient.mailbox, outcome.remote, outcome.code, outcome.status,
                         outcome.text)
        attempts = entry.attempts + 1
        next_at = now + self.backoff(attempts) if temporary else 0.0
        records.append(Attempt(at=now, next_at=next_at, count=attempts,
                               last_error=temporary[0][:300] if temporary else ""))
        for record in records:
            entry.apply(record)
        # A message delivered to every recipient is finished by removing it, so a
        # synced record saying so first would only cost a file and an fsync: a crash
        # before the removal redelivers it either way (the LMTP window).
        if entry.pending() or entry.failed:
            entry.state_logged = True  # even a failed append may have left a part
            try:
                await self.spool.append_state(entry.id, *records)
            except OSError as exc:
                # Without the record a restart would retry finished recipients; keep
                # going in memory and let the next attempt try to write again.
                log.error("queue: %s state not written (%s)", entry.id, exc)
        if entry.pending():
            self._schedule(entry, next_at)
        else:
            await self._finish(entry, message)
        self._update_gauges(entry)

    async def _finish(self, entry: QueueEntry, message: bytes) -> None:
        if entry.failed and self.on_failures is not None:
            try:
                await self.on_failures(entry, message)
            except Exception:
                # Keep the entry: removing it would lose the failure report.
                log.exception("queue: %s DSN could not be queued; retrying later", entry.id)
                self._schedule(entry, time.time() + self.backoff(entry.attempts))
                return
        await self.spool.remove(entry.id, state=entry.state_logged)
        self.entries.pop(entry.id, None)
        # debug: every recipient's outcome was logged at info already, one line each.
        log.debug("queue=%s removed (done %d, failed %d)", entry.id, len(entry.done),
                  len(entry.failed))

    # -- operator actions ------------------------------------------------------------

    def retry(self, queue_id: str) -> bool:
        entry = self.entries.get(queue_id)
        if entry is None:
            return False
        if not entry.running:
            self._schedule(entry, time.time())
        return True

    def retry_all(self) -> int:
        count = 0
        for queue_id in list(self.entries):
            count += self.retry(queue_id)
        return count

    async def delete(self, queue_id: str) -> bool:
        entry = self.entries.pop(queue_id, None)
        if entry is None:
            return False
        await self.spool.append_state(queue_id, Dropped(at=time.time(), reason="operator"))
        await self.spool.remove(queue_id)
        self._update_gauges(entry)
        log.info("queue=%s deleted by operator", queue_id)
        return True

    def _update_gauges(self, changed: QueueEntry | None = None) -> None:
        """Set the depth gauges; after a change to one entry, recount only that entry
        (`changed`), else (start-up) walk the whole queue."""
        if changed is None:
            self._deferred = {e.id for e in self.entries.values() if e.attempts and e.pending()}
        elif (self.entries.get(changed.id) is changed and changed.attempts
              and changed.pending()):
            self._deferred.add(changed.id)
        else:
            self._deferred.discard(changed.id)
        deferred = len(self._deferred)
        self._depth_active.set(len(self.entries) - deferred)
        self._depth_deferred.set(deferred)

