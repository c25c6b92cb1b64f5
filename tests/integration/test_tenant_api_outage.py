"""The gateway against the reference tenant API over real HTTP: caching and outages.

Known recipients keep flowing from cache while the API is slow, refusing connections,
answering 500 or answering garbage; unknown ones are deferred with 451 4.4.3, never
refused with a 5xx because of an outage; the outage is logged once per period, not
once per message; and with a warm cache the API sees next to no requests.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tenant_api_client.server import ReferenceServer
from tests.peers.ports import free_port
from tests.support.node import DEFAULT_TENANTS, NodeHarness
from tests.support.smtp import RawSMTP, dot_stuff, message

pytestmark = pytest.mark.integration
TOKEN = "outage-token"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ReferenceServer]:
    data = tmp_path / "api-tenants.toml"
    data.write_text(DEFAULT_TENANTS)
    server = ReferenceServer(data, TOKEN)
    await server.start("127.0.0.1", free_port())
    yield server
    await server.stop()


async def api_node(node_factory, api: ReferenceServer, **tenants: object) -> NodeHarness:  # type: ignore[no-untyped-def]
    settings = {"api_url": f"http://127.0.0.1:{api.port}", "token": TOKEN,
                "lookup_timeout": 0.5, "breaker_reset": 0.5, **tenants}
    harness: NodeHarness = await node_factory(overrides={"tenants": settings})
    return harness


async def rcpt_codes(harness: NodeHarness, recipients: list[str]) -> list[tuple[int, str]]:
    client, _ = await RawSMTP.connect(harness.port)
    await client.cmd("EHLO client.example")
    await client.cmd("MAIL FROM:<s@remote.example>")
    codes = []
    for rcpt in recipients:
        reply = await client.cmd(f"RCPT TO:<{rcpt}>")
        codes.append((reply.code, reply.status))
    await client.close()
    return codes


async def test_mail_flows_through_the_api(node_factory, api: ReferenceServer) -> None:  # type: ignore[no-untyped-def]
    harness = await api_node(node_factory, api)
    assert await rcpt_codes(harness, ["alice@example.test", "nobody@example.test",
                                      "x@elsewhere.example", "disabled@example.test",
                                      "full@example.test"]) == [
        (250, "2.1.5"), (550, "5.1.1"), (550, "5.7.1"), (550, "5.2.1"), (452, "4.2.2")]
    client, _ = await RawSMTP.connect(harness.port)
    assert (await client.transaction("s@remote.example", ["alice@example.test"],
                                     dot_stuff(message("via api")))).code == 250
    await client.close()
    await harness.wait_empty()
    assert len(harness.maildir_messages("alice@example.test")) == 1


async def test_warm_cache_needs_almost_no_requests(node_factory, api: ReferenceServer) -> None:  # type: ignore[no-untyped-def]
    harness = await api_node(node_factory, api)
    recipients = ["alice@example.test", "bob@example.test", "carol@example.org"]
    client, _ = await RawSMTP.connect(harness.port)
    for i in range(3):  # warm up: each recipient, its tenant, its domain once
        assert (await client.transaction("s@remote.example", [recipients[i]],
                                         dot_stuff(message(f"warm {i}")))).code == 250
    warm = api.requests
    for i in range(300):
        reply = await client.transaction("s@remote.example", [recipients[i % 3]],
                                         dot_stuff(message(f"steady {i}")))
        assert reply.code == 250
    await client.close()
    steady = api.requests - warm
    assert steady < 3, f"{steady} API requests for 300 messages with a warm cache"
    await harness.wait_empty(timeout=30)
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{harness.admin_port}/metrics") as response:
        text = await response.text()
    hits = re.search(r'mailedge_tenant_api_cache_events_total\{cache="recipient",'
                     r'event="hits"\} (\d+)', text)
    assert hits is not None and int(hits.group(1)) >= 300
    assert "mailedge_tenant_api_circuit_open 0.0" in text


@pytest.mark.parametrize("fault", ["slow", "500", "malformed", "down"])
async def test_outage_serves_known_defers_unknown(node_factory, api: ReferenceServer,  # type: ignore[no-untyped-def]
                                                  fault: str, caplog) -> None:
    api.positive_max_age = 1
    api.negative_max_age = 1
    api.policy_max_age = 1
    harness = await api_node(node_factory, api)
    # Warm: one known and one unknown recipient are cached, then both expire.
    assert await rcpt_codes(harness, ["alice@example.test", "nobody@example.test"]) == [
        (250, "2.1.5"), (550, "5.1.1")]
    await asyncio.sleep(1.3)
    if fault == "down":
        await api.stop()
    else:
        api.fault = fault
        api.slow_seconds = 3.0
    caplog.set_level(logging.WARNING)
    for _ in range(10):
        codes = await rcpt_codes(harness, ["alice@example.test", "nobody@example.test",
                                           "never-seen@example.test",
                                           "x@elsewhere.example"])
        # alice: stale-if-error; the rest: deferred, never refused because of the outage.
        assert codes == [(250, "2.1.5"), (451, "4.4.3"), (451, "4.4.3"), (451, "4.4.3")]
    client, _ = await RawSMTP.connect(harness.port)
    reply = await client.transaction("s@remote.example", ["alice@example.test"],
                                     dot_stuff(message(f"during {fault}")))
    assert reply.code == 250
    await client.close()
    # 40 lookups and a message during the outage: the warnings are per call type and
    # kind of failure (and the breaker opening), not per message or recipient.
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("tenant API unavailable" in w for w in warnings), warnings
    assert len(warnings) <= 6, warnings
    if fault != "down":
        api.fault = None
    await harness.wait_empty(timeout=30)
    assert len(harness.maildir_messages("alice@example.test")) == 1
