"""The supervisor of a node with several worker processes (`mailedge run --workers N`).

Theory of operation
-------------------
The supervisor binds the SMTP listeners, one socket per worker per address, all with
SO_REUSEPORT on the same port, so the kernel spreads new connections over the
workers. Each worker is `python -m gateway worker ...`, a complete node process
(gateway/app.py with a `WorkerRole`) that inherits its sockets. The supervisor keeps
its copy of every socket open: when a worker dies, connections the kernel already
queued on that worker's socket wait for its successor instead of being reset.

The spool is shared. A worker writes queue ids carrying its slot and recovers,
delivers and cleans up only the slots it owns, locked for its lifetime
(gateway/ownership.py); a successor takes the same slots over once the kernel has
released the dead worker's locks. What a killed worker had handed to LMTP but not
yet recorded is delivered again by its successor (the LMTP window); nothing else.

A worker that dies is started again (1 s, doubling to 30 s while it keeps dying
within a minute of its start). A worker that exits by itself (status 0) was told to
stop by someone else; it is started again after a second unless the node is stopping.
Workers run in their own session, so a terminal's Ctrl-C reaches only the supervisor,
which stops them with SIGTERM (SIGKILL after the grace). A pipe whose write end only
the supervisor holds tells workers when the supervisor itself is gone.

The admin API (`[admin] listen`) is the supervisor's. Each worker answers on a UNIX
socket in `<spool>/run/`; the supervisor sums the workers' metrics (counters,
histograms and gauges add up; 0/1 state gauges take the maximum), keeps the last
counters it read from a worker that died so node totals never go backwards, lists
the queue of every worker, and sends actions on one message to the worker that owns
its slot. Quarantine actions go to worker 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.config import HostPort, Settings
from gateway.ownership import slot_of

log = logging.getLogger(__name__)

RESTART_FIRST = 1.0
RESTART_MAX = 30.0
STABLE_AFTER = 60.0  # a worker up this long has its restart delay reset
SCRAPE_EVERY = 5.0  # so a killed worker's counters are at most this old when retired
# 0/1 gauges that mean "something is wrong": the node's value is the worst worker's.
MAX_GAUGES = {"mailedge_state_degraded", "mailedge_tenant_api_circuit_open"}
# Sample types whose values keep counting up; a dead worker's last values are kept.
MONOTONIC = {"counter", "histogram", "summary"}


def default_worker_count(settings: Settings) -> int:
    """[node] workers, or with 0: one per core when state is shared in Redis, else 1."""
    if settings.node.workers:
        return settings.node.workers
    if settings.state.redis_url:
        return min(os.cpu_count() or 1, 64)
    return 1


def bind_listeners(addresses: tuple[HostPort, ...], count: int) -> list[list[socket.socket]]:
    """For each worker, one listening SO_REUSEPORT socket per address (port 0: one port)."""
    per_worker: list[list[socket.socket]] = [[] for _ in range(count)]
    try:
        for address in addresses:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
                port = address.port
                for worker in range(count):
                    sock = socket.socket(family, kind, proto)
                    per_worker[worker].append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind((sockaddr[0], port, *sockaddr[2:]))
                    port = sock.getsockname()[1]
                    sock.listen(1024)
                    sock.setblocking(False)
                log.info("smtp listening on %s (port %d) for %d workers", address, port, count)
    except BaseException:
        for socks in per_worker:
            for sock in socks:
                sock.close()
        raise
    return per_worker


@dataclass
class Worker:
    index: int
    listeners: list[socket.socket]
    admin_socket: Path
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restart_delay: float = RESTART_FIRST
    restarts: int = 0
    # The last metric samples read from the current process, and its pid.
    last_samples: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = \
        field(default_factory=dict)
    session: aiohttp.ClientSession | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Supervisor:
    def __init__(self, config: Path, settings: Settings, count: int,
                 *, grace: float = 30.0) -> None:
        self.config = config
        self.settings = settings
        self.count = count
        self.grace = grace
        self.run_dir = settings.node.spool_dir / "run"
        self.workers: list[Worker] = []
        self.stopping = asyncio.Event()
        self._parent_read, self._parent_write = os.pipe()
        self._retired: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        self._families: dict[str, tuple[str, str]] = {}  # name -> (type, help), first seen
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- life cycle -------------------------------------------------------------------

    async def run(self) -> int:
        """Start the workers and the admin API, supervise until SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        listeners = bind_listeners(self.settings.inbound.listen, self.count)
        self.workers = [Worker(i, listeners[i], self.run_dir / f"worker-{i}.sock")
                        for i in range(self.count)]
        try:
            for worker in self.workers:
                await self._spawn(worker)
            if not await self._wait_started():
                log.error("a worker did not start; stopping the node")
                return 1
            admin = self.settings.admin.listen
            if admin is not None:
                await self._start_admin(admin)
            log.info("node %s ready: supervisor pid %d, %d workers (pids %s)",
                     self.settings.node.name, os.getpid(), self.count,
                     ", ".join(str(w.pid) for w in self.workers))
            self._tasks = [asyncio.create_task(self._watch(w), name=f"watch-{w.index}")
                           for w in self.workers]
            self._tasks.append(asyncio.create_task(self._scrape_loop(), name="scrape"))
            await self.stopping.wait()
            log.info("shutting down %d workers", self.count)
        finally:
            # Also when start-up failed (a worker exited, the admin port was taken):
            # no worker may outlive its supervisor.
            self.stopping.set()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._stop_workers()
            if self._runner is not None:
                await self._runner.cleanup()
            for worker in self.workers:
                if worker.session is not None:
                    await worker.session.close()
                for sock in worker.listeners:
                    sock.close()
            os.close(self._parent_write)
            os.close(self._parent_read)
        return 0

    def _command(self, worker: Worker) -> list[str]:
        fds = ",".join(str(s.fileno()) for s in worker.listeners)
        return [sys.executable, "-m", "gateway", "worker", "--config", str(self.config),
                "--index", str(worker.index), "--count", str(self.count), "--fds", fds,
                "--admin-socket", str(worker.admin_socket),
                "--parent-fd", str(self._parent_read)]

    async def _spawn(self, worker: Worker) -> None:
        if worker.last_samples:  # its predecessor's counts stay in the node's totals
            self._retire(worker)
        worker.process = await asyncio.create_subprocess_exec(
            *self._command(worker),
            pass_fds=[s.fileno() for s in worker.listeners] + [self._parent_read],
            start_new_session=True)
        worker.started = time.monotonic()
        log.info("worker %d started: pid %d", worker.index, worker.process.pid)

    async def _wait_started(self, within: float = 60.0) -> bool:
        """Until every worker answers /health on its admin socket; False if one exits."""
        deadline = time.monotonic() + within
        pending = list(self.workers)
        while pending and time.monotonic() < deadline:
            for worker in list(pending):
                assert worker.process is not None
                if worker.process.returncode is not None:
                    log.error("worker %d exited during start-up with status %s",
                              worker.index, worker.process.returncode)
                    return False
                try:
                    status, _, _ = await self._ask(worker, "GET", "/health", seconds=1.0)
                except (aiohttp.ClientError, OSError, TimeoutError):
                    continue
                if status == 200:
                    pending.remove(worker)
            if pending:
                await asyncio.sleep(0.05)
        return not pending

    async def _watch(self, worker: Worker) -> None:
        """Start the worker again whenever it ends, unless the node is stopping."""
        while True:
            if worker.process is not None:
                status = await worker.process.wait()
                if self.stopping.is_set():
                    return
                delay = self._ended(worker, status)
            else:  # its last start failed (no processes, no memory): back off
                delay = worker.restart_delay
                worker.restart_delay = min(worker.restart_delay * 2, RESTART_MAX)
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            worker.restarts += 1
            try:
                await self._spawn(worker)
            except OSError as exc:
                log.error("worker %d could not be started: %s", worker.index, exc)
                worker.process = None

    def _ended(self, worker: Worker, status: int) -> float:
        """Log how the worker ended; the delay before its successor starts."""
        assert worker.process is not None
        up = time.monotonic() - worker.started
        if up >= STABLE_AFTER:
            worker.restart_delay = RESTART_FIRST
        if status == 0:
            log.warning("worker %d (pid %d) stopped by itself after %.0f s; starting it "
                        "again", worker.index, worker.process.pid, up)
            return 1.0
        how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        log.error("worker %d (pid %d) %s after %.0f s; starting it again in %.0f s "
                  "(its messages stay in the spool for its successor)",
                  worker.index, worker.process.pid, how, up, worker.restart_delay)
        delay = worker.restart_delay
        worker.restart_delay = min(worker.restart_delay * 2, RESTART_MAX)
        return delay

    async def _stop_workers(self) -> None:
        running = [w for w in self.workers
                   if w.process is not None and w.process.returncode is None]
        for worker in running:
            assert worker.process is not None
            worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace  # one grace for all, not one each
        for worker in running:
            assert worker.process is not None
            try:
                await asyncio.wait_for(worker.process.wait(),
                                       max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                log.error("worker %d did not stop within %.0f s; killing it",
                          worker.index, self.grace)
                worker.process.kill()
                await worker.process.wait()

    # -- talking to workers -----------------------------------------------------------

    async def _ask(self, worker: Worker, method: str, path: str, body: bytes | None = None,
                   seconds: float = 10.0) -> tuple[int, bytes, str]:
        if worker.session is None:
            worker.session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(worker.admin_socket)))
        async with worker.session.request(
                method, f"http://worker{path}", data=body,
                timeout=aiohttp.ClientTimeout(total=seconds)) as response:
            return response.status, await response.read(), response.content_type

    async def _ask_all(self, method: str, path: str) -> list[tuple[Worker, Any]]:
        """JSON answers of every worker that answers (errors logged, left out)."""
        async def one(worker: Worker) -> tuple[Worker, Any] | None:
            try:
                status, body, _ = await self._ask(worker, method, path)
                return worker, {"status": status, "body": json.loads(body)}
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.warning("admin: worker %d did not answer %s %s: %s", worker.index,
                            method, path, exc or type(exc).__name__)
                return None
        answers = await asyncio.gather(*(one(w) for w in self.workers))
        return [a for a in answers if a is not None]

    # -- metrics ----------------------------------------------------------------------

    async def _scrape(self, worker: Worker) -> None:
        try:
            status, body, _ = await self._ask(worker, "GET", "/metrics")
        except (aiohttp.ClientError, OSError, TimeoutError):
            return  # a dead or starting worker: its last samples stand
        if status != 200:
            return
        samples: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(body.decode()):
            self._families.setdefault(family.name, (family.type, family.documentation))
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = sample.value
        worker.last_samples = samples

    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.sleep(SCRAPE_EVERY)
            await asyncio.gather(*(self._scrape(w) for w in self.workers))

    def _retire(self, worker: Worker) -> None:
        for key, value in worker.last_samples.items():
            if self._families.get(key[0], ("",))[0] in MONOTONIC:
                self._retired[key] = self._retired.get(key, 0.0) + value
        worker.last_samples = {}

    def merged(self) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], float]:
        """The node's samples: the workers' summed, plus what dead workers had counted."""
        total = dict(self._retired)
        for worker in self.workers:
            for key, value in worker.last_samples.items():
                if key[0] in MAX_GAUGES:
                    total[key] = max(total.get(key, 0.0), value)
                else:
                    total[key] = total.get(key, 0.0) + value
        return total

    def render_metrics(self) -> bytes:
        registry = CollectorRegistry()
        registry.register(_Merged(self))
        return generate_latest(registry)

    # -- admin API --------------------------------------------------------------------

    async def _start_admin(self, listen: HostPort) -> None:
        app = web.Application()
        app.add_routes([
            web.get("/health", self.health),
            web.get("/ready", self.readiness),
            web.get("/metrics", self.prometheus),
            web.get("/queue", self.queue_list),
            web.post("/queue/retry", self.queue_retry_all),
            web.route("*", "/queue/{id}", self.to_owner),
            web.route("*", "/queue/{id}/{action}", self.to_owner),
            web.route("*", "/quarantine", self.to_first),
            web.route("*", "/quarantine/{tail:.*}", self.to_first),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, listen.host, listen.port, reuse_address=True).start()
        log.info("admin listening on %s:%d", listen.host, listen.port)

    def _worker_status(self) -> list[dict[str, Any]]:
        return [{"index": w.index, "pid": w.pid, "restarts": w.restarts,
                 "running": w.process is not None and w.process.returncode is None}
                for w in self.workers]

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pid": os.getpid(),
                                  "workers": self._worker_status()})

    async def readiness(self, request: web.Request) -> web.Response:
        answers = {w.index: a for w, a in await self._ask_all("GET", "/ready")}
        details = []
        ready = True
        for worker in self.workers:
            answer = answers.get(worker.index)
            ok = answer is not None and answer["status"] == 200
            ready = ready and ok
            details.append({"index": worker.index, "ready": ok,
                            "detail": answer["body"].get("detail") if answer else
                            "not answering"})
        # A worker that cannot take mail still gets its share of new connections.
        return web.json_response({"ready": ready, "detail": "ok" if ready else
                                  "a worker is not ready", "workers": details},
                                 status=200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        await asyncio.gather(*(self._scrape(w) for w in self.workers))
        return web.Response(body=self.render_metrics(),
                            headers={"Content-Type": "text/plain; version=0.0.4"})

    async def queue_list(self, request: web.Request) -> web.Response:
        entries = [entry for _, answer in await self._ask_all("GET", "/queue")
                   if answer["status"] == 200 for entry in answer["body"]]
        entries.sort(key=lambda e: e.get("received", 0))
        return web.json_response(entries)

    async def queue_retry_all(self, request: web.Request) -> web.Response:
        retried = sum(answer["body"].get("retried", 0)
                      for _, answer in await self._ask_all("POST", "/queue/retry")
                      if answer["status"] == 200)
        return web.json_response({"retried": retried})

    async def to_owner(self, request: web.Request) -> web.Response:
        """An action on one message goes to the worker owning the id's slot."""
        owner = self.workers[slot_of(request.match_info["id"]) % self.count]
        return await self._forward(owner, request)

    async def to_first(self, request: web.Request) -> web.Response:
        return await self._forward(self.workers[0], request)

    async def _forward(self, worker: Worker, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            status, answer, content_type = await self._ask(worker, request.method,
                                                           request.path_qs, body or None)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return web.json_response({"error": f"worker {worker.index} not answering: "
                                      f"{exc or type(exc).__name__}"}, status=503)
        return web.Response(status=status, body=answer, content_type=content_type)


class _Merged(Collector):
    """The supervisor's merged samples as metric families, plus its own two."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        s = self.supervisor
        families: dict[str, Metric] = {}
        for (name, sample, labels), value in s.merged().items():  # exposition order
            family = families.get(name)
            if family is None:
                kind, documentation = s._families.get(name, ("unknown", ""))
                family = families[name] = Metric(name, documentation, kind)
            family.add_sample(sample, dict(labels), value)
        yield from families.values()
        workers = Metric("mailedge_workers", "Worker processes running", "gauge")
        workers.add_sample("mailedge_workers", {}, float(sum(
            1 for w in s.workers if w.process is not None and w.process.returncode is None)))
        yield workers
        restarts = Metric("mailedge_worker_restarts", "Workers started again after they "
                          "ended", "counter")
        restarts.add_sample("mailedge_worker_restarts_total", {},
                            float(sum(w.restarts for w in s.workers)))
        yield restarts
