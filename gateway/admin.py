"""The node's admin HTTP surface: health, readiness, Prometheus metrics, the queue.

`/health` answers while the process runs; `/ready` only while the node can take mail
(listeners bound, tenant directory answering, spool writable), so a balancer stops
sending to a node that cannot accept. `/metrics` is Prometheus text. `/queue` lists
queued messages and takes operator actions (used by `mailedge queue`); `/quarantine`
does the same for the per-tenant quarantine (`mailedge quarantine`). Bind it to a
management address: it has no authentication of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.metrics import Metrics
from gateway.quarantine import NotQuarantined, Quarantine, split_reason
from gateway.queue import Queue, QueueEntry

log = logging.getLogger(__name__)


def entry_summary(entry: QueueEntry) -> dict[str, Any]:
    env = entry.envelope
    return {
        "id": env.id,
        "sender": env.sender,
        "received": env.received,
        "age_seconds": round(time.time() - env.received, 1),
        "attempts": entry.attempts,
        "next_attempt": entry.next_at or None,
        "last_error": entry.last_error,
        "recipients": [
            {"address": r.address, "mailbox": r.mailbox, "tenant": r.tenant, "kind": r.kind,
             "state": ("delivered" if i in entry.done else
                       "failed" if i in entry.failed else "pending")}
            for i, r in enumerate(env.recipients)
        ],
    }


def _clear_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)  # left by a predecessor that was killed


class AdminServer:
    def __init__(self, metrics: Metrics, queue: Queue, ready: Callable[[], tuple[bool, str]],
                 spool_dir: str, quarantine: Quarantine | None = None,
                 release: Callable[[str, str], Awaitable[str]] | None = None) -> None:
        self.metrics = metrics
        self.queue = queue
        self.quarantine = quarantine
        self.release = release
        self.ready = ready
        self.spool_dir = spool_dir
        self.app = web.Application()
        self.app.add_routes([
            web.get("/health", self.health),
            web.get("/ready", self.readiness),
            web.get("/metrics", self.prometheus),
            web.get("/queue", self.queue_list),
            web.get("/queue/{id}", self.queue_show),
            web.post("/queue/{id}/retry", self.queue_retry),
            web.post("/queue/retry", self.queue_retry_all),
            web.delete("/queue/{id}", self.queue_delete),
            web.get("/quarantine", self.quarantine_list),
            web.get("/quarantine/{tenant}/{id}", self.quarantine_show),
            web.post("/quarantine/{tenant}/{id}/release", self.quarantine_release),
            web.delete("/quarantine/{tenant}/{id}", self.quarantine_delete),
        ])
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        log.info("admin listening on %s:%d", host, port)

    async def start_unix(self, path: Path) -> None:
        """Answer on a UNIX socket only: a worker's private endpoint for its supervisor."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await asyncio.to_thread(_clear_socket_path, path)
        site = web.UnixSite(self._runner, str(path))
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pid": os.getpid()})

    async def readiness(self, request: web.Request) -> web.Response:
        ok, why = self.ready()
        return web.json_response({"ready": ok, "detail": why}, status=200 if ok else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4"})

    async def queue_list(self, request: web.Request) -> web.Response:
        entries = sorted(self.queue.entries.values(), key=lambda e: e.envelope.received)
        return web.json_response([entry_summary(e) for e in entries])

    def _entry(self, request: web.Request) -> QueueEntry:
        entry = self.queue.entries.get(request.match_info["id"])
        if entry is None:
            raise web.HTTPNotFound(text='{"error": "no such queue id"}',
                                   content_type="application/json")
        return entry

    async def queue_show(self, request: web.Request) -> web.Response:
        return web.json_response(entry_summary(self._entry(request)))

    async def queue_retry(self, request: web.Request) -> web.Response:
        entry = self._entry(request)
        self.queue.retry(entry.id)
        return web.json_response({"id": entry.id, "retry": True})

    async def queue_retry_all(self, request: web.Request) -> web.Response:
        return web.json_response({"retried": self.queue.retry_all()})

    async def queue_delete(self, request: web.Request) -> web.Response:
        entry = self._entry(request)
        await self.queue.delete(entry.id)
        return web.json_response({"id": entry.id, "deleted": True})

    # -- quarantine -------------------------------------------------------------------

    def _quarantine(self) -> Quarantine:
        if self.quarantine is None:
            raise web.HTTPNotFound(text='{"error": "no quarantine"}',
                                   content_type="application/json")
        return self.quarantine

    @staticmethod
    def _missing(request: web.Request) -> web.HTTPNotFound:
        return web.HTTPNotFound(
            text=json.dumps({"error": "no such quarantine entry",
                             "tenant": request.match_info["tenant"],
                             "id": request.match_info["id"]}),
            content_type="application/json")

    async def quarantine_list(self, request: web.Request) -> web.Response:
        quarantine = self._quarantine()
        tenant = request.query.get("tenant")
        entries = await asyncio.to_thread(quarantine.entries, tenant)
        return web.json_response([e.summary() for e in entries])

    async def quarantine_show(self, request: web.Request) -> web.Response:
        quarantine = self._quarantine()
        try:
            entry = await asyncio.to_thread(quarantine.entry, request.match_info["tenant"],
                                            request.match_info["id"])
            _, stored = await asyncio.to_thread(quarantine.load, request.match_info["tenant"],
                                                request.match_info["id"])
        except NotQuarantined:
            raise self._missing(request) from None
        headers = split_reason(stored)[1].split(b"\r\n\r\n", 1)[0]
        return web.json_response({**entry.summary(),
                                  "headers": headers.decode("utf-8", "replace")})

    async def quarantine_release(self, request: web.Request) -> web.Response:
        if self.release is None:
            raise web.HTTPNotFound(text='{"error": "release not available"}',
                                   content_type="application/json")
        try:
            queue_id = await self.release(request.match_info["tenant"],
                                          request.match_info["id"])
        except NotQuarantined:
            raise self._missing(request) from None
        return web.json_response({"released": True, "queue_id": queue_id})

    async def quarantine_delete(self, request: web.Request) -> web.Response:
        quarantine = self._quarantine()
        try:
            await asyncio.to_thread(quarantine.delete, request.match_info["tenant"],
                                    request.match_info["id"])
        except NotQuarantined:
            raise self._missing(request) from None
        return web.json_response({"deleted": True})
