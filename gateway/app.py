"""The composition root: builds every part of a node from its settings and wires them.

This is the only module that picks implementations (file directory or API client,
LMTP or Maildir storage, outbound agent) and owns start-up and shutdown order:

    start:  spool → queue recovery (delivery begins) → SMTP listeners → admin
    stop:   listeners (no new mail) → sessions drain → queue → agents → admin

Nothing here decides anything about mail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from filters import REGISTRY
from filters.clamav import ClamdClient
from filters.dmarc import default_org_domain
from filters.dns import AsyncResolver
from filters.rspamd import RspamdClient
from gateway.admin import AdminServer
from gateway.config import Settings
from gateway.delivery import DeliveryAgent, Outcome
from gateway.dsn import FailedRecipient, build_dsn, should_send_dsn
from gateway.inbound import Inbound
from gateway.lmtp_agent import LmtpAgent
from gateway.maildir import MaildirAgent
from gateway.metrics import Metrics
from gateway.outbound import OutboundAgent
from gateway.ownership import SlotOwnership
from gateway.pipeline import Pipeline
from gateway.quarantine import Quarantine
from gateway.queue import Queue, QueueEntry
from gateway.router import StorageRouter
from gateway.session import header_end
from gateway.smtp_handler import Listener
from gateway.spool import Envelope, Failed, QueueIdFactory, Spool, SpoolFS, SpoolRecipient
from gateway.state import FallbackStore, make_store
from tenant_api_client import FileDirectory, TenantDirectory
from tenant_api_client.cached import CachedTenantDirectory, CacheSettings
from tenant_api_client.client import TenantApiClient, Timeouts

log = logging.getLogger(__name__)
DEFAULT_QUARANTINE_DAYS = 30.0


def build_pipeline(settings: Settings, metrics: Metrics | None = None) -> Pipeline:
    names = {stage: settings.pipeline.for_stage(stage)
             for stage in ("connect", "helo", "mail", "rcpt", "message")}
    return Pipeline.from_names(names, REGISTRY,
                               observe=metrics.observe_filter() if metrics else None)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    cert, key = settings.inbound.tls_cert, settings.inbound.tls_key
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def build_directory(settings: Settings) -> TenantDirectory:
    """The tenant API (cached) when `[tenants] api_url` is set, else the tenants file."""
    t = settings.tenants
    if t.api_url is None:
        return FileDirectory(t.file)
    token = t.token or ""
    if t.token_file is not None:
        token = t.token_file.read_text().strip()
    client = TenantApiClient(t.api_url, token,
                             timeouts=Timeouts(lookup=t.lookup_timeout, auth=t.auth_timeout))
    return CachedTenantDirectory(client, CacheSettings(
        size=t.cache_size, recipient_stale=t.recipient_stale, policy_stale=t.policy_stale,
        limits_stale=t.limits_stale, negative_ttl=t.negative_ttl, auth_ttl=t.auth_ttl,
        breaker_failures=t.breaker_failures, breaker_reset=t.breaker_reset))


@dataclass(frozen=True)
class WorkerRole:
    """What makes a node process one worker of several (gateway/workers.py starts them).

    `listeners` are the SMTP sockets the supervisor bound for this worker with
    SO_REUSEPORT (one per address), already listening; the worker accepts on them.
    Its admin API answers on the UNIX socket `admin_socket`, which the supervisor
    reads to serve the node's summed metrics and the queue of every worker.
    """

    index: int
    count: int
    listeners: tuple[socket.socket, ...]
    admin_socket: Path


class Node:
    def __init__(self, settings: Settings, *, spool_fs: SpoolFS | None = None,
                 directory: TenantDirectory | None = None,
                 role: WorkerRole | None = None) -> None:
        self.settings = settings
        self.role = role
        self.metrics = Metrics(settings.admin.tenant_label_limit)
        self.directory = directory or build_directory(settings)
        self.pipeline = build_pipeline(settings, self.metrics)
        if isinstance(self.directory, CachedTenantDirectory):
            cached = self.directory
            self.metrics.watch_cache(cached.stats.snapshot, lambda: str(cached.breaker.state))
        self.ownership = SlotOwnership(settings.node.spool_dir, role.index, role.count) \
            if role is not None else SlotOwnership(settings.node.spool_dir)
        self.spool = Spool(settings.node.spool_dir, owner=self.ownership,
                           fs=spool_fs or SpoolFS(fsync=settings.queue.fsync))
        self.quarantine = Quarantine(settings.node.spool_dir / "quarantine", self.spool.fs)
        self.ids = QueueIdFactory(settings.node.name, slot=role.index if role else 0)
        storage = settings.storage
        self._lmtp_agents: dict[str, LmtpAgent] = {}
        self.maildir = MaildirAgent(storage.maildir, fsync=settings.queue.fsync) \
            if storage.maildir is not None else None
        dns_settings = settings.dns
        self.dns = AsyncResolver(
            [(ns.host, ns.port) for ns in dns_settings.nameservers] or None,
            timeout=dns_settings.timeout, cache_size=dns_settings.cache_size)
        self.outbound = OutboundAgent(helo_name=settings.outbound.helo_name
                                      or settings.inbound.hostname,
                                      smarthost=settings.outbound.smarthost, resolver=self.dns,
                                      timeout=settings.outbound.timeout)
        self.router = StorageRouter(self.directory, default_lmtp=storage.lmtp,
                                    lmtp_agent=self._lmtp_agent, maildir_agent=self.maildir,
                                    outbound_agent=self.outbound,
                                    backend_pause=storage.backend_pause)
        self.queue = Queue(self.spool, self.router, settings.queue, self.metrics,
                           on_failures=self._report_failures)
        self.state = make_store(settings.state.redis_url)
        if isinstance(self.state, FallbackStore):
            self.metrics.watch_state(self.state.snapshot)
        av, sp = settings.antivirus, settings.antispam
        self.clamav = ClamdClient(av.clamd, timeout=av.timeout, max_stream=av.max_scan_size) \
            if av.clamd else None
        self.rspamd = RspamdClient(sp.rspamd_url, timeout=sp.timeout, max_size=sp.max_scan_size,
                                   password=sp.password) if sp.rspamd_url else None
        self.inbound = Inbound(settings, self.directory, self.pipeline, self.spool, self.queue,
                               self.quarantine, self.metrics, self.ids, self.dns, self.state,
                               self.clamav, self.rspamd)
        self.admin = AdminServer(self.metrics, self.queue, self.ready,
                                 str(settings.node.spool_dir), self.quarantine,
                                 self.release_quarantined)
        self.servers: list[asyncio.Server] = []
        self.listener: Listener | None = None
        self.shutdown_grace = 5.0
        self.ports: list[int] = []
        self.admin_port: int | None = None
        self._purger: asyncio.Task[None] | None = None

    def _lmtp_agent(self, endpoint: str) -> DeliveryAgent:
        agent = self._lmtp_agents.get(endpoint)
        if agent is None:
            s = self.settings.storage
            agent = LmtpAgent(endpoint, lhlo_name=self.settings.inbound.hostname,
                              max_connections=s.lmtp_max_connections,
                              connect_timeout=s.lmtp_connect_timeout,
                              command_timeout=s.lmtp_command_timeout,
                              data_timeout=s.lmtp_data_timeout)
            self._lmtp_agents[endpoint] = agent
        return agent

    async def start(self) -> None:
        # Own our slots of the spool before reading it: a predecessor that is still
        # dying lets go of them when the kernel reaps it.
        # A worker waits for the kernel to reap a predecessor it replaces.
        await asyncio.to_thread(self.ownership.acquire, 10.0 if self.role else 1.0)
        if any(f.name == "dmarc" for stage in self.pipeline.stages.values() for f in stage):
            # Parse the public suffix list now, not inside the first message's DMARC check.
            await asyncio.to_thread(default_org_domain)
        recovered = await self.queue.start()
        self.listener = Listener(self.inbound, self.settings.inbound, self.metrics,
                                 tls_context(self.settings))
        loop = asyncio.get_running_loop()
        if self.role is not None:
            for sock in self.role.listeners:
                server = await loop.create_server(self.listener, sock=sock, backlog=1024)
                self.servers.append(server)
                self.ports.append(sock.getsockname()[1])
            await self.admin.start_unix(self.role.admin_socket)
        else:
            for address in self.settings.inbound.listen:
                server = await loop.create_server(self.listener, address.host, address.port,
                                                  reuse_address=True, backlog=1024)
                self.servers.append(server)
                for sock in server.sockets:
                    self.ports.append(sock.getsockname()[1])
                log.info("smtp listening on %s (port %d)", address, self.ports[-1])
            admin = self.settings.admin.listen
            if admin is not None:
                await self.admin.start(admin.host, admin.port)
                self.admin_port = admin.port
        if self.role is None or self.role.index == 0:  # one purger per spool
            self._purger = asyncio.create_task(self._purge_quarantine(),
                                               name="quarantine-purge")
        what = f"worker {self.role.index} of {self.role.count}" if self.role else "node"
        log.info("%s %s ready: pid %d, %d message(s) recovered from the spool",
                 what, self.settings.node.name, os.getpid(), recovered)

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            await asyncio.gather(self._purger, return_exceptions=True)
        for server in self.servers:
            server.close()
        if self.listener is not None:
            await self.listener.close_sessions(grace=self.shutdown_grace)
        await self.queue.stop()
        for agent in self._lmtp_agents.values():
            await agent.aclose()
        if self.maildir is not None:
            await self.maildir.aclose()
        await self.outbound.aclose()
        await self.admin.stop()
        await self.directory.aclose()
        await self.dns.aclose()
        await self.state.aclose()
        if self.rspamd is not None:
            await self.rspamd.aclose()
        self.spool.close()
        self.ownership.release()

    def ready(self) -> tuple[bool, str]:
        if not self.servers:
            return False, "listeners not started"
        if not self.directory.ready():
            return False, "tenant directory not answering"
        if not os.access(self.spool.queue_dir, os.W_OK):
            return False, "spool not writable"
        return True, "ok"

    async def release_quarantined(self, tenant: str, entry_id: str) -> str:
        """Deliver a quarantined copy as if it had been accepted; returns its queue id."""
        envelope, message = await asyncio.to_thread(self.quarantine.take, tenant, entry_id)
        released = msgspec.structs.replace(envelope, id=self.ids.new(), received=time.time())
        await self.spool.commit(released, message)
        await asyncio.to_thread(self.quarantine.delete, tenant, entry_id)
        self.queue.submit(released, message)
        log.info("quarantine %s/%s released as queue=%s", tenant, entry_id, released.id)
        return released.id

    async def _purge_quarantine(self) -> None:
        """Hourly: drop quarantine entries past their tenant's retention."""
        while True:
            try:
                retention: dict[str, float] = {}
                for tenant_id in await asyncio.to_thread(self.quarantine.tenants):
                    tenant = await self.directory.tenant(tenant_id)
                    if tenant is not None:
                        retention[tenant_id] = tenant.policy.quarantine_retention_days
                await asyncio.to_thread(self.quarantine.purge, retention,
                                        DEFAULT_QUARANTINE_DAYS)
            except Exception:
                log.exception("quarantine purge failed; trying again in an hour")
            await asyncio.sleep(3600)

    async def _report_failures(self, entry: QueueEntry, message: bytes) -> None:
        """Queue one DSN for the entry's failed recipients, unless it must not get one."""
        env = entry.envelope
        headers = message[:env.header_size or header_end(message)]
        send, why = should_send_dsn(sender=env.sender, original_headers=headers,
                                    spam=env.spam or env.dsn)
        if not send:
            log.info("queue=%s no DSN: %s", env.id, why)
            return
        failed = [FailedRecipient(address=env.recipients[i].mailbox,
                                  original_address=(env.recipients[i].address
                                                    if env.recipients[i].address.lower()
                                                    != env.recipients[i].mailbox else None),
                                  outcome=_outcome(record), last_attempt=_dt(record.at))
                  for i, record in sorted(entry.failed.items())]
        dsn_id = self.ids.new()
        host = self.settings.inbound.hostname
        dsn = build_dsn(reporting_mta=host, queue_id=env.id, original_sender=env.sender,
                        original_headers=headers, failed=failed,
                        arrival_date=_dt(env.received), dsn_id=dsn_id,
                        postmaster=f"postmaster@{host}")
        tenant = env.recipients[next(iter(entry.failed))].tenant
        dsn_env = Envelope(id=dsn_id, sender="", recipients=(SpoolRecipient(
            address=env.sender, mailbox=env.sender, tenant=tenant, kind="remote"),),
            received=time.time(), dsn=True, header_size=header_end(dsn),
            smtputf8=not env.sender.isascii(), eight_bit=not dsn.isascii())
        await self.spool.commit(dsn_env, dsn)
        self.metrics.dsn_sent.inc()
        log.info("queue=%s DSN %s queued to <%s> for %d recipient(s)", env.id, dsn_id,
                 env.sender, len(failed))
        self.queue.submit(dsn_env, dsn)


def _dt(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _outcome(record: Failed) -> Outcome:
    return Outcome(record.code, record.status, record.text, record.remote)
