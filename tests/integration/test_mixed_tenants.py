"""Scan once, decide per tenant: one transaction, recipients of several tenants.

In the test tenants, globex takes messages of at most 2000 bytes (its own policy) and
acme takes up to the node's limit. A 5 KB message to both must be accepted (250),
delivered to acme, kept in globex's quarantine, and never bounced.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from filters import REGISTRY
from filters.base import CONTINUE, Action, Context, Stage, Verdict
from tests.support.node import NodeHarness
from tests.support.sink import SmtpSink
from tests.support.smtp import RawSMTP, dot_stuff, message

pytestmark = pytest.mark.integration


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    server = await SmtpSink().start()
    yield server
    await server.stop()


async def send(harness: NodeHarness, recipients: list[str], size: int) -> tuple[int, str]:
    original = message("mixed", body=("m" * 70 + "\r\n") * (size // 72))
    client, _ = await RawSMTP.connect(harness.port)
    reply = await client.transaction("sender@remote.example", recipients, dot_stuff(original))
    await client.close()
    return reply.code, reply.status


async def test_one_rejects_one_accepts(node_factory, sink: SmtpSink) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory(
        overrides={"outbound": {"smarthost": f"127.0.0.1:{sink.port}"}})
    code, _ = await send(harness, ["alice@example.test", "carol@example.org"], 5000)
    assert code == 250
    await harness.wait_empty()
    assert len(harness.maildir_messages("alice@example.test")) == 1
    assert harness.maildir_messages("carol@example.org") == []
    assert harness.node is not None
    assert len(harness.node.quarantine.ids("globex")) == 1
    envelope, held = harness.node.quarantine.load("globex", harness.node.quarantine.ids(
        "globex")[0])
    assert [r.mailbox for r in envelope.recipients] == ["carol@example.org"]
    assert b"X-Mailedge-Quarantine-Reason: size_limit" in held
    await asyncio.sleep(0.3)
    assert sink.messages == []  # no bounce, ever


async def test_every_tenant_rejects(node: NodeHarness) -> None:
    code, status = await send(node, ["carol@example.org"], 5000)
    assert (code, status) == (552, "5.3.4")
    assert node.node is not None and not node.node.queue.entries


async def test_small_message_goes_to_both(node: NodeHarness) -> None:
    code, _ = await send(node, ["alice@example.test", "carol@example.org"], 500)
    assert code == 250
    await node.wait_empty()
    assert len(node.maildir_messages("alice@example.test")) == 1
    assert len(node.maildir_messages("carol@example.org")) == 1


class TempfailGlobex:
    """A scripted filter: globex's scanner is "down" (TEMPFAIL), acme's is fine."""

    name = "test_tempfail_globex"
    stages = frozenset({Stage.MESSAGE})
    timeout = 1.0
    on_error = Action.TEMPFAIL

    async def check(self, ctx: Context) -> Verdict:
        assert ctx.tenant is not None
        if ctx.tenant.id == "globex":
            return Verdict(Action.TEMPFAIL, reason="scanner down")
        return CONTINUE


async def test_any_tempfail_defers_the_whole_message(node_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(REGISTRY, TempfailGlobex.name, TempfailGlobex)
    harness: NodeHarness = await node_factory(
        overrides={"pipeline": {"message": ["size_limit", TempfailGlobex.name]}})
    code, status = await send(harness, ["alice@example.test", "carol@example.org"], 500)
    assert (code, status) == (451, "4.7.1")
    assert harness.node is not None and not harness.node.queue.entries
    assert harness.maildir_messages("alice@example.test") == []
