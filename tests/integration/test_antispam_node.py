"""Spam scanning through a whole node: SMTP in, Rspamd (real), per-tenant copies out.

The node's side (gateway/config.py, gateway/app.py): `[antispam] rspamd_url` (unset: no
scanner, the `antispam` filter skips), `timeout` (seconds per scan; below the filter's 60 s),
`max_scan_size` (bytes; larger messages are not scanned) build one
`filters.rspamd.RspamdClient` in `Services.rspamd`; `[pipeline] message` names "antispam".

The node's client connects from 127.0.0.1, which Rspamd treats as a local address (fewer
checks); with NXDOMAIN for every DNS query a plain message scores about 0. Tests that need
"spam" below GTUBE level use tenants with very low thresholds (TOML has no null, so a
threshold cannot be switched off here; 1000 stands for "never").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.peers.dns import AuthoritativeDNS
from tests.peers.ports import free_port
from tests.peers.rspamd import GTUBE, Rspamd
from tests.support.node import NodeHarness
from tests.support.smtp import RawSMTP, dot_stuff

# Until tests/conftest.py star-imports tests.peers.fixtures_rspamd:
pytest_plugins = ["tests.peers.fixtures_rspamd"]

pytestmark = pytest.mark.integration

TENANTS = """
[tenant.acme]
domains = ["example.test"]
mailboxes = ["alice@example.test", "postmaster@example.test"]

[tenant.globex]
domains = ["example.org"]
mailboxes = ["carol@example.org"]
[tenant.globex.policy]
spam_tag_score = -100.0
antispam_fail_open = true

[tenant.initech]
domains = ["example.net"]
mailboxes = ["dave@example.net"]
[tenant.initech.policy]
spam_tag_score = -200.0
spam_quarantine_score = -100.0
spam_reject_score = 1000.0
"""

LIST_TENANTS = """
[tenant.acme]
domains = ["example.test"]
mailboxes = ["alice@example.test"]
[tenant.acme.policy]
spam_block_senders = ["@blocked.example"]
spam_allow_senders = ["@sender.example"]
spam_tag_score = -100.0
"""

NodeFactory = Callable[..., Any]


def mail(subject: str, body: str = "Hello Alice,\r\n\r\nsee you at noon.\r\n",
         sender: str = "bob@sender.example") -> bytes:
    return (f"From: Bob <{sender}>\r\nTo: <alice@example.test>\r\nSubject: {subject}\r\n"
            f"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@sender.example>\r\n\r\n{body}").encode()


async def start(node_factory: NodeFactory, url: str, tenants: str = TENANTS,
                pipeline: dict[str, list[str]] | None = None,
                **overrides: dict[str, Any]) -> NodeHarness:
    harness: NodeHarness = await node_factory(tenants=tenants, overrides={
        "antispam": {"rspamd_url": url, "timeout": 5.0, "max_scan_size": 10_000_000},
        "pipeline": pipeline or {"message": ["size_limit", "antispam"]}, **overrides})
    return harness


async def send(harness: NodeHarness, recipients: list[str], message: bytes,
               sender: str = "bob@sender.example") -> tuple[int, str]:
    client, _ = await RawSMTP.connect(harness.port)
    reply = await client.transaction(sender, recipients, dot_stuff(message))
    await client.close()
    return reply.code, reply.status


def header(stored: bytes, name: str) -> list[str]:
    head = stored.split(b"\r\n\r\n", 1)[0].decode()
    prefix = name.lower() + ":"
    return [line.split(":", 1)[1].strip() for line in head.split("\r\n")
            if line.lower().startswith(prefix)]


def scans(rspamd: Rspamd) -> int:
    return rspamd.count_log("rspamd_task_write_log")


async def test_gtube_is_refused(node_factory: NodeFactory, rspamd: Rspamd) -> None:
    harness = await start(node_factory, rspamd.url)
    before = scans(rspamd)
    assert await send(harness, ["alice@example.test"], mail("gtube", GTUBE + "\r\n")) == (
        550, "5.7.1")
    assert scans(rspamd) == before + 1
    assert harness.node is not None and not harness.node.queue.entries
    assert harness.maildir_messages("alice@example.test") == []


async def test_ham_is_delivered_with_its_score(node_factory: NodeFactory,
                                               rspamd: Rspamd) -> None:
    harness = await start(node_factory, rspamd.url)
    assert (await send(harness, ["alice@example.test"], mail("ham")))[0] == 250
    await harness.wait_empty()
    [stored] = harness.maildir_messages("alice@example.test")
    assert len(header(stored, "X-Spam-Score")) == 1
    assert header(stored, "X-Spam-Flag") == []


async def test_one_scan_each_tenant_its_own_copy(node_factory: NodeFactory,
                                                 rspamd: Rspamd) -> None:
    harness = await start(node_factory, rspamd.url)
    before = scans(rspamd)
    code, _ = await send(harness, ["alice@example.test", "carol@example.org",
                                   "dave@example.net"], mail("shared"))
    assert code == 250
    await harness.wait_empty()
    assert scans(rspamd) == before + 1
    [acme] = harness.maildir_messages("alice@example.test")
    [globex] = harness.maildir_messages("carol@example.org")
    assert header(acme, "X-Spam-Flag") == []
    assert header(globex, "X-Spam-Flag") == ["YES"]
    assert header(globex, "X-Spam-Status")[0].startswith("Yes, score=")
    assert harness.maildir_messages("dave@example.net") == []
    assert harness.node is not None and len(harness.node.quarantine.ids("initech")) == 1


async def test_gtube_refused_when_every_tenant_rejects(node_factory: NodeFactory,
                                                       rspamd: Rspamd) -> None:
    # A forced reject beats any finite threshold (initech's is 1000): both tenants reject.
    harness = await start(node_factory, rspamd.url)
    assert await send(harness, ["alice@example.test", "dave@example.net"],
                      mail("gtube both", GTUBE + "\r\n")) == (550, "5.7.1")


async def test_scanner_down_defers_unless_fail_open(node_factory: NodeFactory) -> None:
    harness = await start(node_factory, f"http://127.0.0.1:{free_port()}")
    assert await send(harness, ["alice@example.test"], mail("down")) == (451, "4.3.2")
    # globex chose fail-open: its mail goes on, marked unscanned.
    assert (await send(harness, ["carol@example.org"], mail("down open")))[0] == 250
    await harness.wait_empty()
    [stored] = harness.maildir_messages("carol@example.org")
    assert header(stored, "X-Spam-Status") == ["unscanned"]
    # One tenant deferring defers the whole transaction.
    assert await send(harness, ["alice@example.test", "carol@example.org"],
                      mail("down mixed")) == (451, "4.3.2")


async def test_too_large_to_scan(node_factory: NodeFactory, rspamd: Rspamd) -> None:
    harness: NodeHarness = await node_factory(tenants=TENANTS, overrides={
        "antispam": {"rspamd_url": rspamd.url, "timeout": 5.0, "max_scan_size": 200},
        "pipeline": {"message": ["antispam"]}})
    before = scans(rspamd)
    assert (await send(harness, ["alice@example.test"], mail("big", "x" * 500 + "\r\n")))[0] \
        == 250
    await harness.wait_empty()
    [stored] = harness.maildir_messages("alice@example.test")
    assert header(stored, "X-Spam-Status") == ["unscanned"]
    assert scans(rspamd) == before


async def test_block_list(node_factory: NodeFactory, rspamd: Rspamd) -> None:
    harness = await start(node_factory, rspamd.url, tenants=LIST_TENANTS)
    assert await send(harness, ["alice@example.test"], mail("blocked", sender="x@blocked.example"),
                      sender="x@blocked.example") == (550, "5.7.1")


async def test_allow_list_needs_spf_pass(node_factory: NodeFactory, rspamd: Rspamd,
                                         dns_server: AuthoritativeDNS) -> None:
    dns_server.zone("sender.example").txt("@", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.reload()
    servers = [f"{host}:{port}" for host, port in dns_server.nameservers]
    harness = await start(node_factory, rspamd.url, tenants=LIST_TENANTS,
                          pipeline={"mail": ["spf"], "message": ["spf", "antispam"]},
                          dns={"nameservers": servers, "timeout": 1.0})
    # acme tags everything (tag -100), except senders it allows *and* SPF authenticates.
    assert (await send(harness, ["alice@example.test"], mail("allowed")))[0] == 250
    await harness.wait_empty()
    [allowed] = harness.maildir_messages("alice@example.test")
    assert header(allowed, "X-Spam-Flag") == []
    assert header(allowed, "X-Spam-Status")[0].endswith("allowlisted")


MAILBOX_LIST_TENANTS = """
[tenant.acme]
domains = ["example.test"]
mailboxes = ["alice@example.test"]
[tenant.acme.mailbox."bob@example.test"]
spam_block_senders = ["@pushy.example"]
[tenant.acme.policy]
spam_tag_score = 100.0
"""


async def test_mailbox_block_list_applies_to_that_mailbox_only(node_factory: NodeFactory,
                                                               rspamd: Rspamd) -> None:
    harness = await start(node_factory, rspamd.url, tenants=MAILBOX_LIST_TENANTS)
    sender = "sales@pushy.example"
    # bob blocks the sender; alice does not: 250, alice's copy delivered, bob's held.
    assert await send(harness, ["alice@example.test", "bob@example.test"],
                      mail("offer", sender=sender), sender=sender) == (250, "2.0.0")
    await harness.wait_empty()
    assert len(harness.maildir_messages("alice@example.test")) == 1
    assert harness.maildir_messages("bob@example.test") == []
    assert harness.node is not None and len(harness.node.quarantine.ids("acme")) == 1
    # bob alone: refused.
    assert await send(harness, ["bob@example.test"], mail("offer 2", sender=sender),
                      sender=sender) == (550, "5.7.1")
