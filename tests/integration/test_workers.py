"""`mailedge run --workers 2`: one port, one spool, two processes, real peers.

Each test starts the real command as a child process (supervisor and two workers) on
free loopback ports and talks to it over SMTP and the admin API. Storage is a private
Dovecot LMTP, stopped while mail should stay queued.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.ownership import slot_of
from tests.integration.test_durability import wait_port
from tests.peers.dovecot import DovecotLmtp
from tests.support.node import NodeHarness
from tests.support.smtp import RawSMTP, dot_stuff, message

pytestmark = pytest.mark.integration


class Cluster:
    """A `mailedge run --workers N` process tree and its admin API."""

    def __init__(self, harness: NodeHarness, workers: int = 2) -> None:
        self.harness = harness
        self.workers = workers
        self.config = harness.write()
        self.log = harness.root / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(self.config),
                 "--workers", str(self.workers)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.harness.root)

    async def start(self) -> Cluster:
        self.launch()
        await wait_port(self.harness.port)
        await self.wait(lambda: len(self.running_pids()) == self.workers, "workers up")
        await self.wait(lambda: self.get("/ready")[0] == 200, "node ready")
        return self

    def get(self, path: str, method: str = "GET") -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.harness.admin_port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
        except OSError:
            return 0, None
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode()

    def health(self) -> dict[str, Any]:
        status, body = self.get("/health")
        assert status == 200, body
        return dict(body)

    def running_pids(self) -> list[int]:
        status, body = self.get("/health")
        if status != 200:
            return []
        return [w["pid"] for w in body["workers"] if w["running"]]

    def metric(self, name: str) -> float:
        status, text = self.get("/metrics")
        assert status == 200
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    async def wait(self, predicate: Any, what: str, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await asyncio.to_thread(predicate):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for: {what}\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
async def cluster_factory(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[Cluster] = []

    async def make(overrides: dict[str, Any], workers: int = 2) -> Cluster:
        harness = NodeHarness(tmp_path / f"node{len(started)}", overrides={
            "node": {"log_level": "info"}, **overrides})
        cluster = Cluster(harness, workers)
        started.append(cluster)
        return await cluster.start()

    yield make
    for cluster in started:
        cluster.stop()
        worker_pids = [int(p) for p in _worker_pids(cluster.harness.root)]
        for pid in worker_pids:  # a supervisor killed by a test leaves none behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _worker_pids(root: Path) -> list[str]:
    """Pids of worker processes whose command line names this node's config."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in cmdline and str(root / "mailedge.toml").encode() in cmdline:
            pids.append(entry.name)
    return pids


async def send(port: int, subject: str, rcpt: str = "alice@example.test") -> str:
    """One message on its own connection; returns the queue id from the 250."""
    smtp, _ = await RawSMTP.connect(port)
    try:
        await smtp.cmd("EHLO load.example")
        await smtp.cmd("MAIL FROM:<s@remote.example>")
        await smtp.cmd(f"RCPT TO:<{rcpt}>")
        await smtp.cmd("DATA")
        await smtp.send(dot_stuff(message(subject)))
        reply = await smtp.read_reply()
        assert reply.code == 250, reply
        await smtp.cmd("QUIT")
        return reply.text.rsplit(" ", 1)[-1]
    finally:
        await smtp.close()


def subjects(stored: list[bytes]) -> Counter[str]:
    return Counter(line.split(b": ", 1)[1].decode() for m in stored
                   for line in m.split(b"\r\n") if line.startswith(b"Subject: "))


def lmtp(dovecot: DovecotLmtp) -> dict[str, Any]:
    return {"storage": {"lmtp": f"127.0.0.1:{dovecot.port}", "maildir": None}}


async def test_two_workers_share_the_port_and_metrics_add_up(cluster_factory: Any,
                                                             dovecot: DovecotLmtp) -> None:
    cluster = await cluster_factory(lmtp(dovecot))
    pids = cluster.running_pids()
    assert len(set(pids)) == 2 and cluster.proc.pid not in pids

    ids = await asyncio.gather(*(send(cluster.harness.port, f"spread {n}")
                                 for n in range(40)))
    # The kernel spread the connections: both workers wrote (and own) messages.
    slots = Counter(slot_of(i) for i in ids)
    assert set(slots) == {0, 1}, slots
    await cluster.wait(lambda: len(dovecot.messages("alice@example.test")) >= 40, "delivery")
    assert subjects(dovecot.messages("alice@example.test")) == \
        Counter(f"spread {n}" for n in range(40))
    # One /metrics for the node: the sum of both workers.
    assert cluster.metric("mailedge_messages_accepted_total") == 40
    await cluster.wait(lambda: cluster.metric("mailedge_recipients_delivered_total") == 40,
                       "delivered counter")
    assert cluster.metric("mailedge_connections_total") == 40
    assert cluster.metric("mailedge_workers") == 2
    await cluster.wait(lambda: "[w0]" in cluster.log_text() and "[w1]" in cluster.log_text(),
                       "log lines of both workers")  # info lines are written within 0.1 s
    assert cluster.stop() == 0
    assert not _worker_pids(cluster.harness.root), "workers outlived a stopped node"
    assert "Traceback" not in cluster.log_text()


async def test_killed_worker_successor_delivers_its_queue(cluster_factory: Any,
                                                          dovecot: DovecotLmtp) -> None:
    """Storage down, mail queued in both workers' slots, one worker SIGKILLed: the
    successor takes the slot over and every message arrives exactly once."""
    dovecot.stop()
    cluster = await cluster_factory(lmtp(dovecot))
    ids = await asyncio.gather(*(send(cluster.harness.port, f"held {n}") for n in range(30)))
    by_slot = Counter(slot_of(i) for i in ids)
    assert by_slot[0] and by_slot[1], by_slot

    # The supervisor lists and acts on the queue of both workers.
    status, listed = cluster.get("/queue")
    assert status == 200 and {e["id"] for e in listed} == set(ids)
    w1_id = next(i for i in ids if slot_of(i) == 1)
    status, shown = cluster.get(f"/queue/{w1_id}")
    assert status == 200 and shown["id"] == w1_id
    status, retried = cluster.get(f"/queue/{w1_id}/retry", method="POST")
    assert status == 200 and retried == {"id": w1_id, "retry": True}

    accepted_before = cluster.metric("mailedge_messages_accepted_total")  # scraped now
    assert accepted_before == 30
    victim = cluster.health()["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    await cluster.wait(lambda: cluster.health()["workers"][1]["restarts"] == 1
                       and cluster.health()["workers"][1]["running"]
                       and cluster.get("/ready")[0] == 200, "worker 1 restarted")
    assert cluster.health()["workers"][1]["pid"] != victim
    assert "killed by signal 9" in cluster.log_text()
    # Its successor recovered worker 1's messages from the spool.
    await cluster.wait(lambda: "worker 1 of 2 test1 ready" in cluster.log_text()
                       and f"{by_slot[1]} message(s) recovered" in cluster.log_text(),
                       "recovery of slot 1")
    # The dead worker's counts stay in the node's totals.
    assert cluster.metric("mailedge_messages_accepted_total") == accepted_before
    assert cluster.metric("mailedge_worker_restarts_total") == 1

    dovecot.start()
    await cluster.wait(lambda: cluster.get("/queue")[1] == [], "queue drained", 60)
    assert subjects(dovecot.messages("alice@example.test")) == \
        Counter(f"held {n}" for n in range(30))


async def test_worker_killed_under_load_loses_nothing(cluster_factory: Any,
                                                      dovecot: DovecotLmtp) -> None:
    cluster = await cluster_factory(lmtp(dovecot))
    acknowledged: set[str] = set()
    stop_at = time.monotonic() + 20  # bounded in time as well as in count

    async def client(n: int) -> None:
        for i in range(30):
            if time.monotonic() > stop_at:
                return
            try:
                await send(cluster.harness.port, f"load {n}-{i}")
            except (ConnectionError, OSError, asyncio.IncompleteReadError, AssertionError):
                continue  # this connection's worker was killed under it: try again
            acknowledged.add(f"load {n}-{i}")

    load = asyncio.gather(*(client(n) for n in range(6)))
    while len(acknowledged) < 40 and time.monotonic() < stop_at:
        await asyncio.sleep(0.01)
    os.kill(cluster.health()["workers"][1]["pid"], signal.SIGKILL)
    await load
    # Ready means every worker answers, so an empty /queue is not a missing worker's.
    await cluster.wait(lambda: cluster.health()["workers"][1]["restarts"] == 1
                       and cluster.get("/ready")[0] == 200, "restart")
    await cluster.wait(lambda: cluster.get("/queue")[1] == [], "queue drained", 60)
    stored = subjects(dovecot.messages("alice@example.test"))
    missing = acknowledged - set(stored)
    assert not missing, f"{len(missing)} acknowledged message(s) lost: {sorted(missing)[:5]}"
    # Again only what the killed worker had handed to LMTP without recording it yet.
    twice = [s for s, n in stored.items() if n > 1]
    assert len(twice) <= 20, twice


async def test_workers_stop_when_the_supervisor_is_killed(cluster_factory: Any) -> None:
    cluster = await cluster_factory({})
    pids = cluster.running_pids()
    assert cluster.stop(signal.SIGKILL) == -signal.SIGKILL

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() and
                       b"zombie" not in Path(f"/proc/{pid}/status").read_bytes().lower()
                       for pid in pids)
    deadline = time.monotonic() + 20
    while not gone() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert gone(), "workers outlived their supervisor"
    assert "supervisor gone; stopping" in cluster.log_text()


async def test_a_second_node_cannot_take_a_busy_spool(cluster_factory: Any) -> None:
    cluster = await cluster_factory({})
    other = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway", "run", "--config",
                         str(cluster.config), "--workers", "1"],
        capture_output=True, timeout=60, cwd=cluster.harness.root)
    assert other.returncode == 1
    assert b"another mailedge process holds spool slot" in other.stderr
    assert len(cluster.running_pids()) == 2  # the running node was not disturbed


async def test_failed_start_leaves_no_worker_behind(tmp_path: Path) -> None:
    """The admin port is taken: the supervisor gives up and stops the workers it began."""
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        harness = NodeHarness(tmp_path / "node", admin_port=squatter.getsockname()[1])
        config = harness.write()
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", "run", "--config", str(config),
                             "--workers", "2"],
            capture_output=True, timeout=120, cwd=harness.root)
    assert done.returncode == 1, done.stderr[-2000:]
    assert b"cannot start" in done.stderr and b"ddress already in use" in done.stderr
    assert b"worker 0 started" in done.stderr  # the workers had been started ...
    assert not _worker_pids(harness.root)  # ... and none outlived the supervisor
