"""Denials from CONNECT/HELO/MAIL are held until RCPT, where postmaster@ stays reachable."""

from __future__ import annotations

import asyncio

import pytest

from filters import REGISTRY
from filters.base import CONTINUE, Action, Context, Outcome, Reply, Stage, Verdict
from tests.support.node import NodeHarness
from tests.support.smtp import RawSMTP, dot_stuff, message

pytestmark = pytest.mark.integration


class BlockListedClient:
    """A scripted reputation check: every client is "listed" (what a DNSBL would say)."""

    name = "test_blocklist"
    stages = frozenset({Stage.CONNECT})
    timeout = 1.0
    on_error = Action.TEMPFAIL

    async def check(self, ctx: Context) -> Verdict:
        ctx.note(Outcome.FAIL, f"{ctx.session.client_ip} listed")
        return Verdict(Action.REJECT, Reply(554, "5.7.1", "Client host blocked"),
                       reason="listed")


class SlowHelo:
    name = "test_slow_helo"
    stages = frozenset({Stage.HELO})
    timeout = 0.05
    on_error = Action.TEMPFAIL

    async def check(self, ctx: Context) -> Verdict:
        await asyncio.sleep(1)
        return CONTINUE


async def test_connect_denial_applies_at_rcpt_except_postmaster(node_factory,  # type: ignore[no-untyped-def]
                                                                monkeypatch) -> None:
    monkeypatch.setitem(REGISTRY, BlockListedClient.name, BlockListedClient)
    harness: NodeHarness = await node_factory(
        overrides={"pipeline": {"connect": [BlockListedClient.name]}})
    client, greeting = await RawSMTP.connect(harness.port)
    assert greeting.code == 220  # not refused at connect: the tenant's context decides
    await client.cmd("EHLO client.example")
    assert (await client.cmd("MAIL FROM:<s@remote.example>")).code == 250
    reply = await client.cmd("RCPT TO:<alice@example.test>")
    assert (reply.code, reply.status) == (554, "5.7.1")
    assert (await client.cmd("RCPT TO:<postmaster@example.test>")).code == 250
    assert (await client.cmd("RCPT TO:<Abuse@example.test>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    await client.send(dot_stuff(message("why am I blocked?")))
    assert (await client.read_reply()).code == 250
    await client.close()
    await harness.wait_empty()
    assert len(harness.maildir_messages("postmaster@example.test")) == 1
    assert harness.maildir_messages("alice@example.test") == []


async def test_filter_timeout_is_a_held_tempfail(node_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(REGISTRY, SlowHelo.name, SlowHelo)
    harness: NodeHarness = await node_factory(
        overrides={"pipeline": {"helo": [SlowHelo.name]}})
    client, _ = await RawSMTP.connect(harness.port)
    assert (await client.cmd("EHLO client.example")).code == 250
    await client.cmd("MAIL FROM:<s@remote.example>")
    reply = await client.cmd("RCPT TO:<alice@example.test>")
    assert (reply.code, reply.status) == (451, "4.7.1")
    await client.close()
