"""Slow clients, PROXY protocol, and a tenant directory that cannot answer."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from tenant_api_client import Recipient, Tenant, Unavailable, Unknown
from tests.support.node import NodeHarness
from tests.support.smtp import RawSMTP, dot_stuff, message

pytestmark = pytest.mark.integration


async def test_trickling_data_is_cut_off(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory(overrides={"inbound": {
        "min_data_rate": 1000, "data_rate_grace": 0.5}})
    client, _ = await RawSMTP.connect(harness.port)
    await client.cmd("EHLO client.example")
    await client.cmd("MAIL FROM:<s@remote.example>")
    await client.cmd("RCPT TO:<alice@example.test>")
    assert (await client.cmd("DATA")).code == 354
    reply = None
    async with asyncio.timeout(10):
        for _ in range(100):  # one byte every 0.1 s: far below 1000 bytes/s
            try:
                await client.send(b"x")
            except ConnectionError:
                break
            try:
                reply = await client.read_reply(timeout=0.1)
                break
            except TimeoutError:
                continue
    assert reply is not None and (reply.code, reply.status) == (451, "4.4.2"), reply
    assert "Data rate too low" in reply.text
    assert await client.closed()
    await client.close()
    assert harness.node is not None and not harness.node.queue.entries


async def test_transaction_time_limit(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory(overrides={"inbound": {
        "max_transaction_time": 0.5, "min_data_rate": 0}})
    client, _ = await RawSMTP.connect(harness.port)
    await client.cmd("EHLO client.example")
    await client.cmd("MAIL FROM:<s@remote.example>")
    await client.cmd("RCPT TO:<alice@example.test>")
    assert (await client.cmd("DATA")).code == 354
    await client.send(b"Subject: slow\r\n")
    reply = await client.read_reply(timeout=5)
    assert (reply.code, reply.status) == (451, "4.4.2")
    assert "Transaction took too long" in reply.text
    assert await client.closed()
    await client.close()
    assert harness.node is not None and not harness.node.queue.entries


async def test_silence_during_data_is_an_idle_timeout(node_factory) -> None:  # type: ignore[no-untyped-def]
    """No data for the command timeout after the 354: 421, closed, nothing queued; a
    message completed just before still gets its 250 and the session goes on."""
    harness: NodeHarness = await node_factory(overrides={"inbound": {
        "command_timeout": 0.6, "min_data_rate": 0}})
    client, _ = await RawSMTP.connect(harness.port)
    await client.cmd("EHLO client.example")
    first = await client.transaction("s@remote.example", ["alice@example.test"],
                                     dot_stuff(message("in time")))
    assert first.code == 250
    await asyncio.sleep(0.3)  # within the timeout, counted from the last reply
    await client.cmd("MAIL FROM:<s@remote.example>")
    await client.cmd("RCPT TO:<alice@example.test>")
    assert (await client.cmd("DATA")).code == 354
    await client.send(b"Subject: never finished\r\n")
    started = time.monotonic()
    reply = await client.read_reply(timeout=5)
    assert (reply.code, reply.status) == (421, "4.4.2"), reply
    assert 0.4 <= time.monotonic() - started < 3.0
    assert await client.closed()
    await client.close()
    await harness.wait_empty()
    assert len(harness.maildir_messages("alice@example.test")) == 1


async def test_idle_timeout_says_421(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory(overrides={"inbound": {"command_timeout": 0.5}})
    client, _ = await RawSMTP.connect(harness.port)
    reply = await client.read_reply(timeout=5)
    assert (reply.code, reply.status) == (421, "4.4.2")
    assert await client.closed()
    await client.close()


async def test_idle_timeout_counts_from_the_last_command(node_factory) -> None:  # type: ignore[no-untyped-def]
    """The idle timer is moved by every command (one timer re-armed when it fires)."""
    harness: NodeHarness = await node_factory(overrides={"inbound": {"command_timeout": 0.5}})
    client, _ = await RawSMTP.connect(harness.port)
    for _ in range(5):  # 1.5 s in all, well past the first deadline
        await asyncio.sleep(0.3)
        assert (await client.cmd("NOOP")).code == 250
    last = time.monotonic()
    reply = await client.read_reply(timeout=5)
    assert (reply.code, reply.status) == (421, "4.4.2")
    assert 0.4 <= time.monotonic() - last < 2.0
    assert await client.closed()
    await client.close()


def proxy_v2(src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", src_port,
                                                                            dst_port)
    return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


async def test_proxy_protocol_from_balancer(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory(
        overrides={"inbound": {"proxy_protocol_from": ["127.0.0.1/32"]}})
    for header in (b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n",
                   proxy_v2("192.0.2.8", 40001, "127.0.0.1", 25)):
        client, greeting = await RawSMTP.connect(harness.port, prefix=header)
        assert greeting.code == 220
        reply = await client.transaction("s@remote.example", ["alice@example.test"],
                                         dot_stuff(message("proxied")))
        assert reply.code == 250
        await client.close()
    await harness.wait_empty()
    stored = harness.maildir_messages("alice@example.test")
    assert len(stored) == 2
    assert b"[192.0.2.7]" in stored[0] + stored[1] and b"[192.0.2.8]" in stored[0] + stored[1]


async def test_proxy_header_required_from_balancer(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory(
        overrides={"inbound": {"proxy_protocol_from": ["127.0.0.1/32"]}})
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    writer.write(b"EHLO not-a-proxy-header\r\n")
    async with asyncio.timeout(15):
        assert await reader.read() == b""  # closed without a greeting
    writer.close()
    await writer.wait_closed()


async def test_proxy_header_ignored_from_others(node: NodeHarness) -> None:
    # Not from a configured balancer: a PROXY line is just a bad command, never trusted.
    client, greeting = await RawSMTP.connect(node.port,
                                             prefix=b"PROXY TCP4 192.0.2.9 127.0.0.1 1 25\r\n")
    assert greeting.code == 220
    reply = await client.read_reply()
    assert reply.code == 500
    reply = await client.transaction("s@remote.example", ["alice@example.test"],
                                     dot_stuff(message("direct")))
    assert reply.code == 250
    await client.close()
    await node.wait_empty()
    [stored] = node.maildir_messages("alice@example.test")
    assert b"192.0.2.9" not in stored and b"[127.0.0.1]" in stored


class DownDirectory:
    """A tenant directory whose backend is down: the embedded file directory cannot be.

    The HTTP client's real outage behaviour is tested against the reference server in
    the tenant API issue; this stands in for "Unavailable" at the interface.
    """

    async def lookup_recipient(self, local: str, domain: str) -> Recipient | Unknown:
        raise Unavailable("backend down")

    async def tenant(self, tenant_id: str) -> Tenant | None:
        raise Unavailable("backend down")

    def ready(self) -> bool:
        return False

    async def aclose(self) -> None:
        return None


async def test_directory_unavailable_is_451_never_5xx(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory(directory=DownDirectory())
    client, _ = await RawSMTP.connect(harness.port)
    await client.cmd("EHLO client.example")
    await client.cmd("MAIL FROM:<s@remote.example>")
    for rcpt in ("alice@example.test", "nobody@elsewhere.example"):
        reply = await client.cmd(f"RCPT TO:<{rcpt}>")
        assert (reply.code, reply.status) == (451, "4.4.3")
    await client.close()


class BrokenDirectory(DownDirectory):
    """A directory with a bug: raises something that is not a documented error."""

    async def lookup_recipient(self, local: str, domain: str) -> Recipient | Unknown:
        raise ValueError("SECRET internal detail /etc/passwd")


async def test_internal_errors_are_bland_4xx(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory(directory=BrokenDirectory())
    client, _ = await RawSMTP.connect(harness.port)
    await client.cmd("EHLO client.example")
    await client.cmd("MAIL FROM:<s@remote.example>")
    reply = await client.cmd("RCPT TO:<alice@example.test>")
    assert (reply.code, reply.status) == (451, "4.3.0")
    assert "SECRET" not in reply.text and "ValueError" not in reply.text
    assert "session" in reply.text
    assert (await client.cmd("NOOP")).code == 250  # the session survives
    await client.close()
