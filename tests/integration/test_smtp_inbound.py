"""The SMTP front end to end over loopback: replies, recipient checks, delivery to Maildir."""

from __future__ import annotations

import asyncio
import socket
import ssl
from unittest import mock

import aiosmtplib
import pytest

from gateway.devcert import make_self_signed
from gateway.smtp_handler import GatewaySMTP
from tests.support.node import NodeHarness
from tests.support.smtp import RawSMTP, dot_stuff, message

pytestmark = pytest.mark.integration


async def test_ehlo_advertises_extensions(node: NodeHarness) -> None:
    client, greeting = await RawSMTP.connect(node.port)
    assert greeting.code == 220 and "mx.test.example" in greeting.text
    reply = await client.cmd("EHLO client.example")
    assert reply.code == 250
    keywords = {line.split()[0] for line in reply.lines[1:]}
    assert {"PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"} <= keywords
    assert "SIZE 1000000" in reply.lines
    await client.close()


async def test_message_lands_in_maildir_byte_exact(node: NodeHarness) -> None:
    body = ("Line one\r\n.starts with a dot\r\n..two dots\r\n" + "x" * 5000 + "\r\n"
            "caf\u00e9 8-bit\r\n")
    original = message("exact", body=body)
    client, _ = await RawSMTP.connect(node.port)
    reply = await client.transaction("sender@remote.example", ["Alice@Example.TEST"],
                                     dot_stuff(original))
    assert reply.code == 250 and reply.status == "2.0.0"
    assert "queued as" in reply.text
    queue_id = reply.text.rsplit(" ", 1)[-1]
    await client.cmd("QUIT")
    await client.close()
    await node.wait_empty()
    [stored] = node.maildir_messages("alice@example.test")
    assert stored.endswith(original), "the message must arrive unchanged after our headers"
    added = stored[: len(stored) - len(original)]
    assert b"Received: from client.example" in added
    assert queue_id.encode() in added
    assert b"Return-Path: <sender@remote.example>" in added


async def test_aiosmtplib_client_and_subaddress(node: NodeHarness) -> None:
    original = message("plus")
    errors, _ = await aiosmtplib.send(original, sender="s@remote.example",
                                      recipients=["bob+lists@example.test"],
                                      hostname="127.0.0.1", port=node.port, start_tls=False)
    assert errors == {}
    await node.wait_empty()
    [stored] = node.maildir_messages("bob@example.test")
    assert stored.endswith(original)


@pytest.mark.parametrize(("rcpt", "code", "status"), [
    ("nobody@example.test", 550, "5.1.1"),
    ("alice@elsewhere.example", 550, "5.7.1"),
    ("disabled@example.test", 550, "5.2.1"),
    ("full@example.test", 452, "4.2.2"),
    ("alice@[127.0.0.1]", 550, "5.7.1"),
    ("alice@example.test.", 553, "5.1.3"),
    ("a@b@example.test", 553, "5.1.3"),
])
async def test_recipient_verification(node: NodeHarness, rcpt: str, code: int,
                                      status: str) -> None:
    client, _ = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.example")
    await client.cmd("MAIL FROM:<s@remote.example>")
    reply = await client.cmd(f"RCPT TO:<{rcpt}>")
    assert (reply.code, reply.status) == (code, status), reply
    await client.close()


async def test_postmaster_without_domain_is_ours(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness = await node_factory(overrides={"inbound": {"hostname": "example.test"}})
    client, _ = await RawSMTP.connect(harness.port)
    await client.cmd("EHLO client.example")
    await client.cmd("MAIL FROM:<s@remote.example>")
    reply = await client.cmd("RCPT TO:<Postmaster>")
    assert reply.code == 250, reply
    await client.close()


async def test_sequence_and_syntax_errors(node: NodeHarness) -> None:
    client, _ = await RawSMTP.connect(node.port)
    assert (await client.cmd("MAIL FROM:<a@b.example>")).status == "5.5.1"  # no EHLO
    await client.cmd("EHLO client.example")
    assert (await client.cmd("RCPT TO:<alice@example.test>")).status == "5.5.1"  # no MAIL
    assert (await client.cmd("DATA")).status == "5.5.1"
    assert (await client.cmd("MAIL FROM:<a@b.example>")).code == 250
    assert (await client.cmd("MAIL FROM:<a@b.example>")).status == "5.5.1"  # nested
    assert (await client.cmd("DATA")).status == "5.5.1"  # no RCPT
    assert (await client.cmd("RCPT TO:<alice@example.test> NOTIFY=NEVER")).code == 555
    assert (await client.cmd("FOO bar")).status == "5.5.2"
    assert (await client.cmd("RSET")).code == 250
    assert (await client.cmd("MAIL FROM:<a@b.example> XYZ=1")).code == 555
    assert (await client.cmd("MAIL FROM:<a@b.example> BODY=BINARYMIME")).code == 555
    await client.close()


async def test_vrfy_and_expn_reveal_nothing(node: NodeHarness) -> None:
    client, _ = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.example")
    known = await client.cmd("VRFY alice@example.test")
    unknown = await client.cmd("VRFY nobody@example.test")
    assert known.code == unknown.code == 252 and known.text == unknown.text
    assert (await client.cmd("EXPN staff")).code == 502
    await client.close()


async def test_size_limits(node: NodeHarness) -> None:
    client, _ = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.example")
    reply = await client.cmd("MAIL FROM:<a@b.example> SIZE=2000000")
    assert (reply.code, reply.status) == (552, "5.3.4")
    assert (await client.cmd("MAIL FROM:<a@b.example> SIZE=1000")).code == 250
    assert (await client.cmd("RCPT TO:<alice@example.test>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    big = message("big", body=("y" * 998 + "\r\n") * 1100)
    await client.send(dot_stuff(big))
    reply = await client.read_reply()
    assert (reply.code, reply.status) == (552, "5.3.4")
    # The session goes on after the refusal, and nothing was queued.
    assert (await client.cmd("NOOP")).code == 250
    await client.close()
    assert node.node is not None and not node.node.queue.entries
    assert node.maildir_messages("alice@example.test") == []


async def test_command_line_limits(node: NodeHarness) -> None:
    client, _ = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.example")
    reply = await client.cmd("NOOP " + "x" * 600)
    assert (reply.code, reply.status) == (500, "5.5.2")
    reply = await client.cmd("NOOP " + "x" * 100_000)  # beyond the stream buffer too
    assert (reply.code, reply.status) == (500, "5.5.2")
    # A bare LF does not end a command: it is refused.
    await client.send(b"NOOP\n")
    reply = await client.read_reply()
    assert (reply.code, reply.status) == (500, "5.5.2")
    assert (await client.cmd("NOOP")).code == 250
    await client.close()


async def test_long_data_lines_are_kept(node: NodeHarness) -> None:
    long_line = "z" * 20_000
    original = message("long", body=long_line + "\r\nend\r\n")
    client, _ = await RawSMTP.connect(node.port)
    reply = await client.transaction("s@remote.example", ["alice@example.test"],
                                     dot_stuff(original))
    assert reply.code == 250
    await client.close()
    await node.wait_empty()
    [stored] = node.maildir_messages("alice@example.test")
    assert stored.endswith(original)


async def test_pipelining_all_at_once(node: NodeHarness) -> None:
    client, _ = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.example")
    body = dot_stuff(message("pipelined"))
    await client.send(b"MAIL FROM:<s@remote.example>\r\nRCPT TO:<alice@example.test>\r\n"
                      b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
                      b"DATA\r\n" + body + b"QUIT\r\n")
    codes = [(await client.read_reply()).code for _ in range(6)]
    assert codes == [250, 250, 550, 250, 354, 250]
    assert (await client.read_reply()).code == 221
    await client.close()
    await node.wait_empty()
    assert len(node.maildir_messages("alice@example.test")) == 1
    assert len(node.maildir_messages("bob@example.test")) == 1


async def test_too_many_recipients(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness = await node_factory(overrides={"inbound": {"max_recipients": 100}})
    client, _ = await RawSMTP.connect(harness.port)
    await client.cmd("EHLO client.example")
    await client.cmd("MAIL FROM:<s@remote.example>")
    for _ in range(100):
        assert (await client.cmd("RCPT TO:<alice@example.test>")).code == 250
    reply = await client.cmd("RCPT TO:<bob@example.test>")
    assert (reply.code, reply.status) == (452, "4.5.3")
    await client.close()


async def test_forged_authentication_results_removed(node: NodeHarness) -> None:
    original = message("ar", extra_headers=(
        "Authentication-Results: mx.test.example; spf=pass smtp.mailfrom=x@sender.example\r\n"
        "Authentication-Results: other.example;\r\n dkim=pass header.d=sender.example\r\n"))
    client, _ = await RawSMTP.connect(node.port)
    assert (await client.transaction("s@remote.example", ["alice@example.test"],
                                     dot_stuff(original))).code == 250
    await client.close()
    await node.wait_empty()
    [stored] = node.maildir_messages("alice@example.test")
    assert b"Authentication-Results: mx.test.example" not in stored
    assert b"Authentication-Results: other.example;" in stored
    assert stored.endswith(b"\r\nHello.\r\n")


async def test_starttls(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert, key = make_self_signed(tmp_path / "tls")
    harness = await node_factory(overrides={"inbound": {"tls_cert": str(cert),
                                                        "tls_key": str(key)}})
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, tls_context=context,
                           start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    assert smtp.supports_extension("starttls")
    await smtp.starttls()
    await smtp.ehlo()
    assert not smtp.supports_extension("starttls")
    errors, _ = await smtp.sendmail("s@remote.example", ["alice@example.test"],
                                    message("tls"))
    assert errors == {}
    await smtp.quit()
    await harness.wait_empty()
    [stored] = harness.maildir_messages("alice@example.test")
    assert b"with ESMTPS" in stored


ALIAS_TENANTS = """
[tenant.acme]
domains = ["example.test", "catch.example"]
mailboxes = ["alice@example.test", "bob@example.test", "inbox@catch.example"]
[tenant.acme.alias."team@example.test"]
targets = ["alice@example.test", "bob@example.test", "gone@example.test"]
[tenant.acme.alias."all@example.test"]
targets = ["team@example.test", "alice@example.test"]
[tenant.acme.forward."old@example.test"]
targets = ["new@elsewhere.example"]
[tenant.acme.domain."catch.example"]
catch_all = "inbox@catch.example"
"""


async def test_alias_catch_all_and_forward(node_factory) -> None:  # type: ignore[no-untyped-def]
    harness = await node_factory(tenants=ALIAS_TENANTS)
    client, _ = await RawSMTP.connect(harness.port)
    reply = await client.transaction("s@remote.example",
                                     ["all@example.test", "whoever@catch.example"],
                                     dot_stuff(message("alias")))
    assert reply.code == 250
    await client.cmd("MAIL FROM:<s@remote.example>")
    reply = await client.cmd("RCPT TO:<old@example.test>")
    assert (reply.code, reply.status) == (451, "4.3.0")  # forwarding needs SRS: deferred
    await client.close()
    await harness.wait_empty()
    # all@ -> team@ (alice, bob; gone@ skipped) + alice: one copy each, no duplicates.
    assert len(harness.maildir_messages("alice@example.test")) == 1
    assert len(harness.maildir_messages("bob@example.test")) == 1
    assert len(harness.maildir_messages("inbox@catch.example")) == 1


async def test_senders_cannot_forge_our_scan_headers(node: NodeHarness) -> None:
    original = message("forged verdicts", extra_headers=(
        "X-Spam-Flag: NO\r\nX-Spam-Score: -100\r\nX-Mailedge-Virus-Scan: clean\r\n"
        "X-Other: kept\r\n"))
    client, _ = await RawSMTP.connect(node.port)
    assert (await client.transaction("s@remote.example", ["alice@example.test"],
                                     dot_stuff(original))).code == 250
    await client.close()
    await node.wait_empty()
    [stored] = node.maildir_messages("alice@example.test")
    assert b"X-Spam-Flag: NO" not in stored and b"X-Spam-Score: -100" not in stored
    assert b"X-Mailedge-Virus-Scan: clean" not in stored
    assert b"X-Other: kept" in stored and stored.endswith(b"\r\nHello.\r\n")


async def test_replies_wait_for_a_client_that_does_not_read(node: NodeHarness) -> None:
    """Flow control: a client pipelining far more commands than the socket buffers hold
    replies for, and reading nothing for a while, still gets every reply, in order."""
    assert node.node is not None
    for server in node.node.servers:  # accepted sockets inherit the listener's buffer
        for sock in server.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    paused = []
    pause_writing = GatewaySMTP.pause_writing

    def counting_pause(self: GatewaySMTP) -> None:
        paused.append(self)
        pause_writing(self)

    client, _ = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.example")
    count = 30_000  # ~4 MB of replies: the server has to pause writing
    with mock.patch.object(GatewaySMTP, "pause_writing", counting_pause):
        client.writer.write(b"EHLO again.example\r\n" * count
                            + b"MAIL FROM:<s@remote.example>\r\n")
        await asyncio.sleep(0.5)
        for _ in range(count):
            assert (await client.read_reply()).code == 250
    assert paused, "the server never had to wait for the client"
    reply = await client.read_reply()
    assert (reply.code, reply.status) == (250, "2.1.0")
    reply = await client.cmd("RCPT TO:<alice@example.test>")
    assert reply.code == 250
    await client.close()
