"""The operator's surface: the mailedge CLI and the admin HTTP endpoints."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.peers.dovecot import DovecotLmtp
from tests.support.node import NodeHarness, wait_for
from tests.support.smtp import RawSMTP, dot_stuff, message

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def mailedge(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60, check=False)


async def amailedge(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(mailedge, *args)


def test_check_config_accepts_the_example(tmp_path: Path) -> None:
    # As after `make run` in a fresh checkout: the example config plus a dev certificate.
    shutil.copytree(REPO / "config", tmp_path / "config")
    result = mailedge("check-config", "--config", "config/mailedge.toml", cwd=tmp_path)
    assert result.returncode == 2 and "var/tls/cert.pem does not exist" in result.stderr
    assert mailedge("dev-cert", "--dir", "var/tls", cwd=tmp_path).returncode == 0
    result = mailedge("check-config", "--config", "config/mailedge.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_config_lists_every_problem_with_key_and_line(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[tenant.a]\ndomains = ["a.example"]\nmailboxes = ["x@b.example"]\n')
    config = tmp_path / "bad.toml"
    config.write_text(
        "[node]\nname = \"Bad Name\"\n\n[inbound]\nmax_recipients = 10\nlisten = [\"nope\"]\n"
        f"colour = \"blue\"\n\n[tenants]\nfile = \"{tenants}\"\n")
    result = mailedge("check-config", "--config", str(config))
    assert result.returncode != 0
    err = result.stderr
    assert "line 2: node.name" in err
    assert "line 5: inbound.max_recipients" in err
    assert "line 6: inbound.listen" in err
    assert "line 7: inbound.colour: unknown key" in err
    # The tenants file is checked only once the config itself is valid.
    good = tmp_path / "good.toml"
    good.write_text(f"[tenants]\nfile = \"{tenants}\"\n")
    result = mailedge("check-config", "--config", str(good))
    assert result.returncode != 0
    assert "line 3: tenant.a.mailbox.x@b.example" in result.stderr


def test_print_pipeline() -> None:
    result = mailedge("print-pipeline", "--config", "config/mailedge.toml", "--tenant", "acme")
    assert result.returncode == 0, result.stderr
    assert "message  size_limit" in result.stdout
    assert "tenant acme: domains example.test" in result.stdout


async def test_queue_commands_against_running_node(node_factory,  # type: ignore[no-untyped-def]
                                                   dovecot: DovecotLmtp) -> None:
    harness: NodeHarness = await node_factory(overrides={
        "storage": {"lmtp": f"127.0.0.1:{dovecot.port}", "maildir": None},
        "queue": {"retry_min": 300, "retry_max": 600}})
    dovecot.stop()
    client, _ = await RawSMTP.connect(harness.port)
    reply = await client.transaction("s@remote.example", ["bob@example.test"],
                                     dot_stuff(message("queued")))
    queue_id = reply.text.rsplit(" ", 1)[-1]
    second = await client.transaction("s@remote.example", ["alice@example.test"],
                                      dot_stuff(message("to delete")))
    doomed = second.text.rsplit(" ", 1)[-1]
    await client.close()
    await harness.wait_idle()
    config = str(harness.root / "mailedge.toml")

    listed = await amailedge("queue", "list", "--config", config)
    assert listed.returncode == 0, listed.stderr
    assert queue_id in listed.stdout and "1 pending" in listed.stdout
    shown = await amailedge("queue", "show", queue_id, "--config", config)
    detail = json.loads(shown.stdout)
    assert detail["recipients"][0]["mailbox"] == "bob@example.test"
    assert "4.4.1" in detail["last_error"]

    deleted = await amailedge("queue", "delete", doomed, "--config", config)
    assert deleted.returncode == 0
    assert harness.node is not None and doomed not in harness.node.queue.entries
    assert not (harness.root / "spool" / "queue" / f"{doomed}.msg").exists()

    missing = await amailedge("queue", "show", "NOPE.test1", "--config", config)
    assert missing.returncode == 1 and "no message" in missing.stderr

    dovecot.start()
    retried = await amailedge("queue", "retry", queue_id, "--config", config)
    assert retried.returncode == 0
    await harness.wait_empty()
    assert len(dovecot.messages("bob@example.test")) == 1
    assert dovecot.messages("alice@example.test") == []


async def test_queue_commands_with_node_stopped(node_factory,  # type: ignore[no-untyped-def]
                                                dovecot: DovecotLmtp) -> None:
    harness: NodeHarness = await node_factory(overrides={
        "storage": {"lmtp": f"127.0.0.1:{dovecot.port}", "maildir": None}})
    dovecot.stop()
    client, _ = await RawSMTP.connect(harness.port)
    reply = await client.transaction("s@remote.example", ["bob@example.test"],
                                     dot_stuff(message("offline")))
    queue_id = reply.text.rsplit(" ", 1)[-1]
    await client.close()
    await harness.wait_idle()
    await harness.stop()
    config = str(harness.root / "mailedge.toml")
    listed = await amailedge("queue", "list", "--config", config)
    assert queue_id in listed.stdout
    deleted = await amailedge("queue", "delete", queue_id, "--config", config)
    assert deleted.returncode == 0
    assert not any((harness.root / "spool" / "queue").iterdir())


async def test_offline_changes_refused_while_a_node_runs(node_factory,  # type: ignore[no-untyped-def]
                                                          dovecot: DovecotLmtp) -> None:
    """No admin endpoint to ask, but the node runs: the spool is not changed under it."""
    harness: NodeHarness = await node_factory(overrides={
        "storage": {"lmtp": f"127.0.0.1:{dovecot.port}", "maildir": None},
        "admin": {"listen": ""}})  # "" switches the admin endpoint off
    dovecot.stop()
    client, _ = await RawSMTP.connect(harness.port)
    reply = await client.transaction("s@remote.example", ["bob@example.test"],
                                     dot_stuff(message("kept")))
    queue_id = reply.text.rsplit(" ", 1)[-1]
    await client.close()
    config = str(harness.root / "mailedge.toml")
    deleted = await amailedge("queue", "delete", queue_id, "--config", config)
    assert deleted.returncode != 0
    assert "a node is running on this spool" in deleted.stderr
    assert (harness.root / "spool" / "queue" / f"{queue_id}.msg").exists()
    listed = await amailedge("queue", "list", "--config", config)  # reading is harmless
    assert queue_id in listed.stdout


async def test_health_ready_and_per_tenant_metrics(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory(overrides={"admin": {"tenant_label_limit": 1}})
    client, _ = await RawSMTP.connect(harness.port)
    assert (await client.transaction("s@remote.example", ["alice@example.test"],
                                     dot_stuff(message("m1")))).code == 250
    await client.cmd("RSET")
    assert (await client.transaction("s@remote.example", ["carol@example.org"],
                                     dot_stuff(message("m2")))).code == 250
    await client.cmd("MAIL FROM:<s@remote.example>")
    await client.cmd("RCPT TO:<nobody@example.test>")
    await client.close()
    await harness.wait_empty()
    base = f"http://127.0.0.1:{harness.admin_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/health") as response:
            assert response.status == 200
        async with http.get(f"{base}/ready") as response:
            assert response.status == 200 and (await response.json())["ready"] is True
        async with http.get(f"{base}/metrics") as response:
            text = await response.text()
    assert 'mailedge_messages_accepted_total{tenant="acme"} 1.0' in text
    # The label cap is 1: the second tenant is counted under "other".
    assert 'mailedge_messages_accepted_total{tenant="other"} 1.0' in text
    assert 'mailedge_recipients_delivered_total{tenant="acme"} 1.0' in text
    assert ('mailedge_rejected_total{reason="unknown_user",stage="rcpt",tenant="acme"} 1.0'
            in text)
    assert 'mailedge_queue_messages{state="active"} 0.0' in text


async def quarantined_copy(harness: NodeHarness, subject: str) -> str:
    """Send a 5 KB message to acme and globex: globex (2000-byte limit) quarantines."""
    client, _ = await RawSMTP.connect(harness.port)
    body = ("q" * 70 + "\r\n") * 70
    reply = await client.transaction("s@remote.example",
                                     ["alice@example.test", "carol@example.org"],
                                     dot_stuff(message(subject, body=body)))
    assert reply.code == 250
    await client.close()
    await harness.wait_empty()
    assert harness.node is not None
    ids = harness.node.quarantine.ids("globex")
    assert ids
    return ids[-1]


async def test_quarantine_commands(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory()
    config = str(harness.root / "mailedge.toml")
    first = await quarantined_copy(harness, "held one")
    second = await quarantined_copy(harness, "held two")
    listed = await amailedge("quarantine", "list", "--config", config)
    assert listed.returncode == 0 and first in listed.stdout and second in listed.stdout
    assert "size_limit" in listed.stdout  # the reason
    shown = json.loads((await amailedge("quarantine", "show", "globex", first,
                                        "--config", config)).stdout)
    assert shown["recipients"] == ["carol@example.org"] and "Subject: held one" in \
        shown["headers"]
    released = await amailedge("quarantine", "release", "globex", first, "--config", config)
    assert released.returncode == 0, released.stderr
    await harness.wait_empty()
    [delivered] = harness.maildir_messages("carol@example.org")
    assert b"Subject: held one" in delivered
    assert b"X-Mailedge-Quarantine-Reason" not in delivered
    deleted = await amailedge("quarantine", "delete", "globex", second, "--config", config)
    assert deleted.returncode == 0
    assert harness.node is not None and harness.node.quarantine.ids("globex") == []
    missing = await amailedge("quarantine", "show", "globex", second, "--config", config)
    assert missing.returncode == 1


async def test_quarantine_offline_and_retention(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory()
    entry = await quarantined_copy(harness, "offline")
    assert harness.node is not None
    quarantine = harness.node.quarantine
    assert quarantine.purge({"globex": 30}, 30) == 0  # young enough
    await harness.stop()
    config = str(harness.root / "mailedge.toml")
    listed = await amailedge("quarantine", "list", "globex", "--config", config)
    assert entry in listed.stdout
    released = await amailedge("quarantine", "release", "globex", entry, "--config", config)
    assert "delivered when it starts" in released.stdout
    # The released copy waits in the spool; the next start delivers it.
    await harness.start()
    await harness.wait_empty()
    assert len(harness.maildir_messages("carol@example.org")) == 1
    # Retention: an entry older than its tenant's days is purged.
    another = await quarantined_copy(harness, "old")
    assert quarantine.purge({"globex": 1}, 30, now=time.time() + 2 * 86400) == 1
    assert another not in quarantine.ids("globex")


async def test_active_sessions_gauge_counts_open_connections(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory()
    url = f"http://127.0.0.1:{harness.admin_port}/metrics"

    async def active() -> float:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            text = await response.text()
        [line] = [x for x in text.splitlines() if x.startswith("mailedge_active_sessions ")]
        return float(line.split()[1])

    assert await active() == 0.0
    clients = [(await RawSMTP.connect(harness.port))[0] for _ in range(3)]
    assert await active() == 3.0
    for client in clients:
        await client.cmd("QUIT")
        await client.close()
    await wait_for(lambda: harness.node is not None and not harness.node.listener.sessions)
    assert await active() == 0.0
