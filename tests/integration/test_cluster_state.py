"""Two nodes, one Redis: a cluster acts as one (DESIGN: shared state lives in Redis).

A per-client message limit counts across both nodes; reputation learned from one
node's decisions applies on the other; and when Redis dies mid-test both nodes keep
accepting mail on node-local state.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.peers.redis import RedisServer
from tests.support.node import NodeHarness
from tests.support.smtp import RawSMTP, dot_stuff, message

pytestmark = pytest.mark.integration

LIMITS_OFF = {"max_connections_per_ip": 0, "connection_rate_per_minute": 0,
              "messages_per_ip_per_hour": 0, "recipients_per_ip_per_hour": 0}


async def mail_through(harness: NodeHarness, rcpt: str = "alice@example.test",
                       size: int = 200) -> tuple[int, str]:
    client, _ = await RawSMTP.connect(harness.port)
    try:
        await client.cmd("EHLO client.example")
        await client.cmd("MAIL FROM:<s@remote.example>")
        reply = await client.cmd(f"RCPT TO:<{rcpt}>")
        if reply.code != 250:
            return reply.code, reply.status
        await client.cmd("DATA")
        await client.send(dot_stuff(message("cluster", body=("c" * 70 + "\r\n") * (size // 72))))
        reply = await client.read_reply()
        return reply.code, reply.status
    finally:
        await client.close()


async def two_nodes(node_factory, redis: RedisServer, **tables: object) -> tuple[  # type: ignore[no-untyped-def]
        NodeHarness, NodeHarness]:
    overrides = {"state": {"redis_url": redis.url}, **tables}
    first = await node_factory("a", overrides=overrides)
    second = await node_factory("b", overrides=overrides)
    return first, second


async def test_message_limit_counts_across_nodes(node_factory, redis_server) -> None:  # type: ignore[no-untyped-def]
    a, b = await two_nodes(node_factory, redis_server,
                           limits={**LIMITS_OFF, "messages_per_ip_per_hour": 3},
                           pipeline={"mail": ["limits"], "message": ["size_limit"]})
    assert await mail_through(a) == (250, "2.0.0")
    assert await mail_through(b) == (250, "2.0.0")
    assert await mail_through(a) == (250, "2.0.0")
    # The fourth message of this client this hour, on either node, is deferred.
    assert await mail_through(b) == (451, "4.7.1")
    assert await mail_through(a) == (451, "4.7.1")


async def test_reputation_learned_on_one_node_applies_on_the_other(  # type: ignore[no-untyped-def]
        node_factory, redis_server) -> None:
    a, b = await two_nodes(
        node_factory, redis_server,
        reputation={"min_samples": 3, "reject_below": -0.9, "tempfail_below": -1,
                    "tarpit_below": -1},
        pipeline={"connect": ["reputation"], "message": ["size_limit"]})
    # globex takes at most 2000 bytes: three big messages there are refused on node a.
    for _ in range(3):
        assert await mail_through(a, "carol@example.org", size=5000) == (552, "5.3.4")
    # Node b has never seen this client, but the cluster has.
    assert await mail_through(b) == (554, "5.7.1")


async def test_redis_down_both_nodes_keep_accepting(node_factory, redis_server) -> None:  # type: ignore[no-untyped-def]
    a, b = await two_nodes(node_factory, redis_server,
                           limits={**LIMITS_OFF, "messages_per_ip_per_hour": 100},
                           pipeline={"connect": ["reputation", "limits"], "mail": ["limits"],
                                     "message": ["size_limit"]})
    assert await mail_through(a) == (250, "2.0.0")
    redis_server.kill()
    for node in (a, b, a, b):
        assert await mail_through(node) == (250, "2.0.0")
    assert a.node is not None and b.node is not None
    assert a.node.state.degraded and b.node.state.degraded
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{a.admin_port}/metrics") as response:
        text = await response.text()
    assert "mailedge_state_degraded 1.0" in text
    assert 'mailedge_state_events_total{event="outages"} 1.0' in text
    await a.wait_empty()
    await b.wait_empty()
    assert len(a.maildir_messages("alice@example.test")) == 3
    assert len(b.maildir_messages("alice@example.test")) == 2
