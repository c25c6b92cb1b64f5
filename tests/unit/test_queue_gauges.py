"""Queue depth gauges and per-tenant counters, kept up to date per message.

The gauges are recounted for the one entry that changed (not by walking the queue),
so these check that the incremental count agrees with a full recount through
submissions, deferrals, deliveries and an operator's delete.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.config import QueueSettings
from gateway.delivery import Outcome
from gateway.metrics import Metrics
from gateway.queue import PerTenant, Queue, QueueEntry, Router
from gateway.spool import Envelope, SpoolRecipient, StateRecord

DELIVERED = Outcome(250, "2.0.0", "Ok", "test")
LATER = Outcome(451, "4.4.1", "Later", "test")


class FakeSpool:
    """Records what the queue asks of the spool (no files: the spool has its own tests)."""

    def __init__(self) -> None:
        self.appended: list[str] = []
        self.removed: list[tuple[str, bool]] = []

    async def append_state(self, queue_id: str, *records: StateRecord) -> None:
        self.appended.append(queue_id)

    async def remove(self, queue_id: str, *, state: bool = True) -> None:
        self.removed.append((queue_id, state))

    async def load(self, queue_id: str) -> tuple[Envelope, bytes]:
        return envelope(queue_id), b"m"


class ScriptedRouter(Router):
    def __init__(self) -> None:
        self.answer: dict[str, Outcome] = {}

    async def deliver(self, entry: QueueEntry, message: bytes,
                      pending: list[int]) -> dict[int, Outcome]:
        return {i: self.answer.get(entry.id, DELIVERED) for i in pending}


def envelope(queue_id: str, tenant: str = "acme") -> Envelope:
    return Envelope(id=queue_id, sender="s@remote.example",
                    recipients=(SpoolRecipient(address="a@example.test",
                                               mailbox="a@example.test", tenant=tenant),),
                    received=time.time())


def gauges(metrics: Metrics) -> tuple[float, float]:
    depth = metrics.queue_depth
    return (depth.labels("active")._value.get(), depth.labels("deferred")._value.get())


def recount(queue: Queue) -> tuple[float, float]:
    deferred = sum(1 for e in queue.entries.values() if e.attempts and e.pending())
    return float(len(queue.entries) - deferred), float(deferred)


async def test_depth_gauges_follow_each_message() -> None:
    metrics = Metrics()
    router = ScriptedRouter()
    queue = Queue(FakeSpool(), router, QueueSettings(), metrics)  # type: ignore[arg-type]
    router.answer["later-1"] = LATER
    router.answer["later-2"] = LATER
    for queue_id in ("now-1", "later-1", "later-2", "now-2"):
        queue.submit(envelope(queue_id), b"m")
    assert gauges(metrics) == (4.0, 0.0)
    await queue.idle.wait()
    assert gauges(metrics) == recount(queue) == (0.0, 2.0)
    # A deferred message delivered at its retry leaves the deferred count.
    del router.answer["later-1"]
    await queue._attempt(queue.entries["later-1"])  # what the scheduler would launch
    assert gauges(metrics) == recount(queue) == (0.0, 1.0)
    assert await queue.delete("later-2")
    assert gauges(metrics) == recount(queue) == (0.0, 0.0)
    assert metrics.delivered.labels("acme")._value.get() == 3.0
    assert metrics.deferred.labels("acme")._value.get() == 2.0
    await queue.stop()


async def test_state_log_unlinked_only_when_one_may_exist() -> None:
    """A message delivered at its first attempt never had a state log, so its removal
    skips that unlink; one that was deferred (or deleted by an operator) has one."""
    spool, router = FakeSpool(), ScriptedRouter()
    queue = Queue(spool, router, QueueSettings(), Metrics())  # type: ignore[arg-type]
    router.answer["later"] = LATER
    router.answer["deleted"] = LATER
    for queue_id in ("now", "later", "deleted"):
        queue.submit(envelope(queue_id), b"m")
    await queue.idle.wait()
    assert spool.removed == [("now", False)]
    assert sorted(spool.appended) == ["deleted", "later"]
    del router.answer["later"]
    await queue._attempt(queue.entries["later"])
    assert await queue.delete("deleted")
    assert spool.removed[1:] == [("later", True), ("deleted", True)]
    await queue.stop()


def test_per_tenant_children_respect_the_label_limit() -> None:
    metrics = Metrics(tenant_label_limit=1)
    accepted = PerTenant(metrics.accepted, metrics.tenant)
    accepted("acme").inc()
    accepted("globex").inc()  # over the limit: "other"
    accepted("acme").inc()
    accepted(None).inc()
    values: dict[str, Any] = {s.labels["tenant"]: s.value
                              for m in metrics.registry.collect() if m.name.endswith("accepted")
                              for s in m.samples}
    assert values == {"acme": 2.0, "other": 1.0, "-": 1.0}
