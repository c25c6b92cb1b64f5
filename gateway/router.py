"""Where each queued recipient goes at this attempt, and the attempt itself.

For every pending recipient the router asks the tenant directory again (a mailbox
migrated to another storage backend since acceptance follows it; one deleted since
fails with 5.1.1), picks the agent — the mailbox's own LMTP backend, else the node's
default LMTP backend, else the embedded Maildir store; outbound SMTP for mail leaving
the platform, such as DSNs to remote senders — and delivers each destination's group
of recipients in one transaction, all groups concurrently.

A destination that failed to connect is paused for `backend_pause` seconds: queued
messages for it are deferred without trying, and after the pause one attempt probes
it, so an outage is not hammered by every message in the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.delivery import DeliveryAgent, DeliveryJob, Outcome
from gateway.queue import QueueEntry, Router
from tenant_api_client import Recipient, TenantDirectory, Unavailable

log = logging.getLogger(__name__)

DIRECTORY_DOWN = Outcome(451, "4.4.3", "Tenant directory unavailable", "directory")
MAILBOX_GONE = Outcome(550, "5.1.1", "Mailbox no longer exists", "directory")
BACKEND_PAUSED = "Storage backend unavailable, delivery paused"


@dataclass(slots=True)
class _Destination:
    key: str
    agent: DeliveryAgent
    indexes: list[int] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Pause:
    until: float
    probing: bool = False
    reason: str = ""


class StorageRouter(Router):
    def __init__(self, directory: TenantDirectory, *, default_lmtp: str | None,
                 lmtp_agent: Callable[[str], DeliveryAgent],
                 maildir_agent: DeliveryAgent | None, outbound_agent: DeliveryAgent | None,
                 backend_pause: float) -> None:
        self.directory = directory
        self.default_lmtp = default_lmtp
        self.lmtp_agent = lmtp_agent
        self.maildir_agent = maildir_agent
        self.outbound_agent = outbound_agent
        self.backend_pause = backend_pause
        self._paused: dict[str, _Pause] = {}

    async def _destination(self, kind: str, mailbox: str) -> tuple[str, DeliveryAgent, str] | \
            Outcome:
        local, _, domain = mailbox.rpartition("@")
        try:
            found = await self.directory.lookup_recipient(local, domain)
        except Unavailable:
            return DIRECTORY_DOWN
        if isinstance(found, Recipient):
            storage = found.storage or self.default_lmtp
            if storage:
                return f"lmtp:{storage}", self.lmtp_agent(storage), found.address
            if self.maildir_agent is None:
                return Outcome(451, "4.3.5", "No storage configured", "router")
            return "maildir", self.maildir_agent, found.address
        if kind == "remote" and not found.domain_hosted and self.outbound_agent is not None:
            return f"smtp:{domain}", self.outbound_agent, mailbox
        return MAILBOX_GONE

    async def deliver(self, entry: QueueEntry, message: bytes,
                      pending: list[int]) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        groups: dict[str, _Destination] = {}
        recipients = entry.envelope.recipients
        # gather() makes a Task per coroutine; one recipient, or one destination (the
        # usual message), is awaited directly instead.
        lookups = [self._destination(recipients[i].kind, recipients[i].mailbox)
                   for i in pending]
        resolved = [await lookups[0]] if len(lookups) == 1 else await asyncio.gather(*lookups)
        for index, result in zip(pending, resolved, strict=True):
            if isinstance(result, Outcome):
                outcomes[index] = result
                continue
            key, agent, address = result
            group = groups.setdefault(key, _Destination(key, agent))
            group.indexes.append(index)
            group.addresses.append(address)
        jobs = [self._deliver_group(entry, message, g) for g in groups.values()]
        results = [await jobs[0]] if len(jobs) == 1 else await asyncio.gather(*jobs)
        for group, group_outcomes in zip(groups.values(), results, strict=True):
            outcomes.update(zip(group.indexes, group_outcomes, strict=True))
        return outcomes

    async def _deliver_group(self, entry: QueueEntry, message: bytes,
                             group: _Destination) -> list[Outcome]:
        pause = self._paused.get(group.key)
        now = time.monotonic()
        if pause is not None:
            if now < pause.until or pause.probing:
                return [Outcome(451, "4.4.1", f"{BACKEND_PAUSED}: {pause.reason}", group.key)
                        ] * len(group.indexes)
            pause.probing = True  # this attempt is the probe; others keep waiting
        job = DeliveryJob(queue_id=entry.id, sender=entry.envelope.sender,
                          recipients=tuple(group.addresses), message=message,
                          smtputf8=entry.envelope.smtputf8, eight_bit=entry.envelope.eight_bit)
        try:
            outcomes = await group.agent.deliver(job)
        except Exception as exc:
            log.exception("queue=%s agent %s failed", entry.id, group.key)
            outcomes = [Outcome(451, "4.3.0", f"Local delivery error ({type(exc).__name__})",
                                group.key)] * len(group.indexes)
        if len(outcomes) != len(group.indexes):
            log.error("queue=%s agent %s returned %d outcomes for %d recipients", entry.id,
                      group.key, len(outcomes), len(group.indexes))
            outcomes = [Outcome(451, "4.3.0", "Delivery agent error", group.key)] \
                * len(group.indexes)
        # A whole group failing with the same "cannot connect" class of reply means the
        # destination is down, not the mailboxes: pause it.
        unreachable = all(o.status in ("4.4.1", "4.4.2", "4.3.2") for o in outcomes)
        if unreachable:
            if group.key not in self._paused or self._paused[group.key].probing:
                log.warning("destination %s unreachable (%s); pausing %gs", group.key,
                            outcomes[0].text, self.backend_pause)
            self._paused[group.key] = _Pause(time.monotonic() + self.backend_pause,
                                             reason=outcomes[0].text[:100])
        elif group.key in self._paused:
            log.info("destination %s is back", group.key)
            del self._paused[group.key]
        return outcomes

    def paused(self) -> dict[str, float]:
        now = time.monotonic()
        return {k: max(0.0, p.until - now) for k, p in self._paused.items()}

