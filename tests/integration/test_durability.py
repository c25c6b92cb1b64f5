"""250 means durable: the sync order behind every 250, a full disk, and kill -9.

kill -9 alone cannot prove durability (the page cache survives a process kill), so
the first test watches the spool's file-operation seam: every 250 a client receives
must come after the fsync of its message file and after a directory fsync that began
after the file's rename. The seam's syncs are slowed down so a 250 sent too early
would reach the client before the sync ends and fail the test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.spool import SpoolFS
from tests.peers.dovecot import DovecotLmtp
from tests.peers.ports import free_port
from tests.peers.tmpfs import Tmpfs
from tests.support.node import DEFAULT_TENANTS, NodeHarness, render_config, wait_for
from tests.support.smtp import RawSMTP, dot_stuff, message

pytestmark = pytest.mark.integration


class RecordingFS(SpoolFS):
    """The real file operations, each logged with when it began and ended."""

    def __init__(self, delay: float) -> None:
        super().__init__(fsync=True)
        self.delay = delay
        self.events: list[tuple[str, str, float, float]] = []
        self.lock = threading.Lock()

    def _log(self, op: str, path: Path, began: float) -> None:
        with self.lock:
            self.events.append((op, path.name, began, time.monotonic()))

    def write_synced(self, path: Path, chunks: object) -> None:  # type: ignore[override]
        began = time.monotonic()
        super().write_synced(path, chunks)  # type: ignore[arg-type]
        time.sleep(self.delay)  # a slow disk: the file's fsync takes a while
        self._log("write+fsync", path, began)

    def rename(self, source: Path, target: Path) -> None:
        began = time.monotonic()
        super().rename(source, target)
        self._log("rename", target, began)

    def fsync_dir(self, path: Path) -> None:
        began = time.monotonic()
        super().fsync_dir(path)
        time.sleep(self.delay)
        self._log("fsync_dir", path, began)


async def test_every_250_follows_its_syncs(node_factory) -> None:  # type: ignore[no-untyped-def]
    fs = RecordingFS(delay=0.05)
    harness: NodeHarness = await node_factory(spool_fs=fs)
    received: dict[str, float] = {}

    async def one_client(n: int) -> None:
        client, _ = await RawSMTP.connect(harness.port)
        for i in range(5):
            reply = await client.transaction("s@remote.example", ["alice@example.test"],
                                             dot_stuff(message(f"seam {n} {i}")))
            at = time.monotonic()
            assert reply.code == 250
            received[reply.text.rsplit(" ", 1)[-1]] = at
        await client.close()

    await asyncio.gather(*(one_client(n) for n in range(8)))
    assert len(received) == 40
    with fs.lock:
        events = list(fs.events)
    dir_syncs = [(began, ended) for op, _, began, ended in events if op == "fsync_dir"]
    for queue_id, got_250 in received.items():
        [(_, _, _, written)] = [e for e in events if e[0] == "write+fsync" and e[1] == queue_id]
        [(_, _, _, renamed)] = [e for e in events
                                if e[0] == "rename" and e[1] == f"{queue_id}.msg"]
        assert written <= renamed <= got_250
        covering = [ended for began, ended in dir_syncs if began >= renamed and ended <= got_250]
        assert covering, f"{queue_id}: 250 without a directory sync after its rename"
    # Group commit: 40 messages from 8 concurrent clients shared directory syncs.
    assert len(dir_syncs) < 40


class CountingFS(SpoolFS):
    """The real file operations; counts the synced state-log appends per message."""

    def __init__(self) -> None:
        super().__init__(fsync=True)
        self.appends: list[str] = []

    def append_synced(self, path: Path, data: bytes) -> None:
        super().append_synced(path, data)
        self.appends.append(path.name)


async def test_state_log_only_for_unfinished_messages(node_factory) -> None:  # type: ignore[no-untyped-def]
    """A message delivered to all its recipients is finished by removing it: no synced
    state record first. One that must wait (or bounce) gets its record."""
    fs = CountingFS()
    harness: NodeHarness = await node_factory(spool_fs=fs)
    client, _ = await RawSMTP.connect(harness.port)
    done = await client.transaction("s@remote.example", ["alice@example.test"],
                                    dot_stuff(message("whole")))
    assert done.code == 250
    await harness.wait_empty()
    assert fs.appends == []
    assert harness.maildir_messages("alice@example.test")
    await client.close()
    # Storage down: the deferred message gets its synced attempt record.
    fs_down = CountingFS()
    down: NodeHarness = await node_factory(
        "down", spool_fs=fs_down,
        overrides={"storage": {"lmtp": f"127.0.0.1:{free_port()}", "maildir": None}})
    client, _ = await RawSMTP.connect(down.port)
    deferred = await client.transaction("s@remote.example", ["alice@example.test"],
                                        dot_stuff(message("later")))
    await client.close()
    assert deferred.code == 250
    queue_id = deferred.text.rsplit(" ", 1)[-1]
    await wait_for(lambda: f"{queue_id}.state" in fs_down.appends)


async def test_spool_disk_full(node_factory, tmpfs: Tmpfs) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory(
        overrides={"node": {"spool_dir": str(tmpfs.path / "spool")}})
    original = message("disk full", body=("f" * 78 + "\r\n") * 1000)  # 80 KB
    tmpfs.fill(leave_free=16 * 1024)
    client, _ = await RawSMTP.connect(harness.port)
    reply = await client.transaction("s@remote.example", ["alice@example.test"],
                                     dot_stuff(original))
    assert (reply.code, reply.status) == (452, "4.3.1")
    spool = tmpfs.path / "spool"
    assert list((spool / "queue").iterdir()) == []
    assert list((spool / "tmp").iterdir()) == []  # nothing half-written left behind
    assert harness.node is not None and not harness.node.queue.entries
    # Space returns: the same client's retry is accepted and delivered once.
    tmpfs.release()
    await client.cmd("RSET")
    reply = await client.transaction("s@remote.example", ["alice@example.test"],
                                     dot_stuff(original))
    assert reply.code == 250
    await client.close()
    await harness.wait_empty()
    [stored] = harness.maildir_messages("alice@example.test")
    assert stored.endswith(original)


TENANTS_FOR_CRASH = DEFAULT_TENANTS


def start_node_process(root: Path, config: Path) -> subprocess.Popen[bytes]:
    with open(root / "node.log", "ab") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=root)


async def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"port {port} not open")


async def test_kill_9_under_load_loses_nothing(tmp_path: Path, dovecot: DovecotLmtp) -> None:
    harness = NodeHarness(tmp_path / "crash", overrides={
        "storage": {"lmtp": f"127.0.0.1:{dovecot.port}", "maildir": None},
        "node": {"log_level": "info"}})
    harness.tenants = TENANTS_FOR_CRASH
    config = harness.write()
    proc = start_node_process(harness.root, config)
    acknowledged: set[str] = set()
    stop_at = time.monotonic() + 20  # bounded in time as well as in count
    try:
        await wait_port(harness.port)

        async def client(n: int) -> None:
            smtp: RawSMTP | None = None
            try:
                smtp, _ = await RawSMTP.connect(harness.port)
                await smtp.cmd("EHLO load.example")
                for i in range(40):
                    if time.monotonic() > stop_at:
                        return
                    subject = f"crash {n}-{i}"
                    await smtp.cmd("MAIL FROM:<s@remote.example>")
                    await smtp.cmd("RCPT TO:<alice@example.test>")
                    await smtp.cmd("DATA")
                    await smtp.send(dot_stuff(message(subject)))
                    reply = await smtp.read_reply()
                    if reply.code == 250:
                        acknowledged.add(subject)
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                return  # the node was killed under us
            finally:
                if smtp is not None:
                    await smtp.close()

        load = asyncio.gather(*(client(n) for n in range(6)))
        while len(acknowledged) < 60 and time.monotonic() < stop_at:
            await asyncio.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        await load
        assert acknowledged, "no message was acknowledged before the kill"

        proc = start_node_process(harness.root, config)
        await wait_port(harness.port)
        spool_queue = harness.root / "spool" / "queue"
        deadline = time.monotonic() + 30
        while any(spool_queue.glob("*.msg")) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(spool_queue.glob("*.msg")), "queue did not drain after restart"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stored = dovecot.messages("alice@example.test")
    subjects = {line.split(b": ", 1)[1].decode() for m in stored for line in m.split(b"\r\n")
                if line.startswith(b"Subject: ")}
    missing = acknowledged - subjects
    assert not missing, f"{len(missing)} acknowledged message(s) lost: {sorted(missing)[:5]}"


def test_render_config_round_trips(tmp_path: Path) -> None:
    text = render_config({"node": {"name": "x", "flag": True, "list": ["a", 1]}})
    assert 'name = "x"' in text and "flag = true" in text and 'list = ["a", 1]' in text
