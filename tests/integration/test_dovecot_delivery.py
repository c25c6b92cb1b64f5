"""End to end with a real Dovecot LMTP as storage: SMTP in, LMTP out, Maildir on disk.

Dovecot runs privately (tests/peers/dovecot.py) with CRLF storage, so what it stores
after the headers it and we prepend is byte for byte what the client sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from tests.peers.dovecot import DovecotLmtp
from tests.support.node import NodeHarness
from tests.support.sink import SmtpSink
from tests.support.smtp import RawSMTP, dot_stuff, message

pytestmark = pytest.mark.integration

TENANTS = """
[tenant.acme]
domains = ["example.test"]
mailboxes = ["alice@example.test", "bob@example.test", "dave@example.test",
             "ghost@example.test", "postmaster@example.test"]
[tenant.globex]
domains = ["example.org"]
mailboxes = ["carol@example.org"]
"""


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    server = await SmtpSink().start()
    yield server
    await server.stop()


async def lmtp_node(node_factory, dovecot: DovecotLmtp, sink: SmtpSink | None = None,  # type: ignore[no-untyped-def]
                    endpoint: str | None = None, tenants: str = TENANTS) -> NodeHarness:
    overrides = {"storage": {"lmtp": endpoint or f"127.0.0.1:{dovecot.port}",
                             "maildir": None}}
    if sink is not None:
        overrides["outbound"] = {"smarthost": f"127.0.0.1:{sink.port}"}
    harness: NodeHarness = await node_factory(tenants=tenants, overrides=overrides)
    return harness


def body_after_headers(stored: bytes, original: bytes) -> bytes:
    assert stored.endswith(original), stored[:600]
    return stored[: len(stored) - len(original)]


async def test_aiosmtplib_and_swaks_land_byte_exact(node_factory, dovecot: DovecotLmtp,  # type: ignore[no-untyped-def]
                                                   tmp_path: Path) -> None:
    harness = await lmtp_node(node_factory, dovecot)
    original = message("via aiosmtplib", body="caf\u00e9\r\n.dot line\r\n" + "q" * 3000 + "\r\n")
    errors, _ = await aiosmtplib.send(original, sender="s@remote.example",
                                      recipients=["alice@example.test", "carol@example.org"],
                                      hostname="127.0.0.1", port=harness.port)
    assert errors == {}

    swaks_body = tmp_path / "swaks.eml"
    swaks_original = message("via swaks", body="sent by swaks\r\n..two dots\r\n")
    swaks_body.write_bytes(swaks_original)
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"127.0.0.1:{harness.port}", "--from", "s@remote.example",
        "--to", "bob@example.test", "--helo", "swaks.example", "--data", str(swaks_body),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()
    assert b"250 2.0.0 Ok: queued as" in output

    await harness.wait_empty()
    [alice] = dovecot.messages("alice@example.test")
    [carol] = dovecot.messages("carol@example.org")
    [bob] = dovecot.messages("bob@example.test")
    for stored in (alice, carol):
        added = body_after_headers(stored, original)
        assert b"Received: from " in added and b"by mx.test.example (mailedge)" in added
    # swaks ends the data with CRLF of its own before the final dot.
    assert bob.endswith(swaks_original + b"\r\n")
    assert b"swaks.example" in bob


async def test_unix_socket_backend(node_factory, dovecot: DovecotLmtp) -> None:  # type: ignore[no-untyped-def]
    harness = await lmtp_node(node_factory, dovecot, endpoint=f"unix:{dovecot.socket_path}")
    original = message("unix")
    client, _ = await RawSMTP.connect(harness.port)
    assert (await client.transaction("s@remote.example", ["alice@example.test"],
                                     dot_stuff(original))).code == 250
    await client.close()
    await harness.wait_empty()
    [stored] = dovecot.messages("alice@example.test")
    assert stored.endswith(original)


async def test_per_recipient_permanent_failures_become_one_dsn(  # type: ignore[no-untyped-def]
        node_factory, dovecot: DovecotLmtp, sink: SmtpSink) -> None:
    # ghost@ exists in the directory but not in storage; dave@ is over quota in Dovecot.
    harness = await lmtp_node(node_factory, dovecot, sink)
    original = message("partly failing", body="the body must not be in the DSN\r\n")
    client, _ = await RawSMTP.connect(harness.port)
    reply = await client.transaction(
        "sender@remote.example",
        ["alice@example.test", "ghost@example.test", "dave@example.test"], dot_stuff(original))
    assert reply.code == 250
    await client.close()
    [dsn] = await sink.wait(1)
    await harness.wait_empty()
    assert len(dovecot.messages("alice@example.test")) == 1
    assert dsn.sender == "<>" and dsn.recipients == ["sender@remote.example"]  # aiosmtpd form
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed["Auto-Submitted"] == "auto-replied"
    text = dsn.data.decode("utf-8", "replace")
    assert "Final-Recipient: rfc822; ghost@example.test" in text
    assert "Final-Recipient: rfc822; dave@example.test" in text
    assert "alice@example.test" not in text.split("text/rfc822-headers")[0].split(
        "message/delivery-status")[1]
    assert "Diagnostic-Code: smtp; 550 5.1.1" in text
    assert "Diagnostic-Code: smtp; 552 5.2.2" in text
    assert "the body must not be in the DSN" not in text
    assert "Subject: partly failing" in text


async def test_null_sender_failure_gets_no_dsn(node_factory, dovecot: DovecotLmtp,  # type: ignore[no-untyped-def]
                                               sink: SmtpSink) -> None:
    harness = await lmtp_node(node_factory, dovecot, sink)
    client, _ = await RawSMTP.connect(harness.port)
    assert (await client.transaction("", ["ghost@example.test"],
                                     dot_stuff(message("bounce")))).code == 250
    await client.close()
    await harness.wait_empty()
    await asyncio.sleep(0.3)
    assert sink.messages == []


async def test_temporary_failure_retries_only_that_recipient(  # type: ignore[no-untyped-def]
        node_factory, dovecot_factory) -> None:
    storage: DovecotLmtp = dovecot_factory(over_quota=["dave@example.test"],
                                           quota_tempfail=True)
    harness = await lmtp_node(node_factory, storage)
    client, _ = await RawSMTP.connect(harness.port)
    assert (await client.transaction("s@remote.example",
                                     ["alice@example.test", "dave@example.test"],
                                     dot_stuff(message("tempfail")))).code == 250
    await client.close()
    assert harness.node is not None
    queue = harness.node.queue

    def dave_retried_twice() -> bool:
        return any(e.attempts >= 3 for e in queue.entries.values())

    async with asyncio.timeout(15):
        while not dave_retried_twice():
            await asyncio.sleep(0.05)
    [entry] = queue.entries.values()
    assert entry.pending() == [1]  # dave only
    assert "452 4.2.2" in entry.last_error
    assert len(storage.messages("alice@example.test")) == 1  # never delivered twice


async def test_storage_down_then_back_no_loss_no_duplicate(node_factory,  # type: ignore[no-untyped-def]
                                                           dovecot: DovecotLmtp) -> None:
    harness = await lmtp_node(node_factory, dovecot)
    dovecot.stop()
    originals = [message(f"while down {i}") for i in range(5)]
    client, _ = await RawSMTP.connect(harness.port)
    for i, original in enumerate(originals):
        assert (await client.transaction("s@remote.example", ["bob@example.test"],
                                         dot_stuff(original),
                                         helo=f"c{i}.example")).code == 250
    await client.close()
    assert harness.node is not None
    await harness.wait_idle()
    assert len(harness.node.queue.entries) == 5
    assert all(e.attempts >= 1 and "4.4.1" in e.last_error
               for e in harness.node.queue.entries.values())
    dovecot.start()
    harness.node.queue.retry_all()
    await harness.wait_empty(timeout=20)
    stored = dovecot.messages("bob@example.test")
    assert len(stored) == 5
    for original in originals:
        assert sum(s.endswith(original) for s in stored) == 1


async def test_mailbox_on_its_own_backend(node_factory, dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    default = dovecot_factory(mailboxes=["alice@example.test"])
    other = dovecot_factory(mailboxes=["bob@example.test"])
    tenants = f"""
[tenant.acme]
domains = ["example.test"]
mailboxes = ["alice@example.test"]
[tenant.acme.mailbox."bob@example.test"]
storage = "127.0.0.1:{other.port}"
"""
    harness = await lmtp_node(node_factory, default, tenants=tenants)
    client, _ = await RawSMTP.connect(harness.port)
    assert (await client.transaction("s@remote.example",
                                     ["alice@example.test", "bob@example.test"],
                                     dot_stuff(message("two backends")))).code == 250
    await client.close()
    await harness.wait_empty()
    assert len(default.messages("alice@example.test")) == 1
    assert len(other.messages("bob@example.test")) == 1


async def test_unreachable_backend_is_paused_not_hammered(node_factory,  # type: ignore[no-untyped-def]
                                                          dovecot: DovecotLmtp) -> None:
    harness = await lmtp_node(node_factory, dovecot)
    assert harness.node is not None
    harness.node.router.backend_pause = 60.0
    dovecot.stop()
    client, _ = await RawSMTP.connect(harness.port)
    for i in range(4):
        assert (await client.transaction("s@remote.example", ["bob@example.test"],
                                         dot_stuff(message(f"paused {i}")),
                                         helo=f"c{i}.example")).code == 250
    await client.close()
    await harness.wait_idle()
    errors = sorted(e.last_error for e in harness.node.queue.entries.values())
    # One real attempt found the backend down; the others were deferred without trying.
    assert sum("paused" in error for error in errors) == 3, errors
    assert f"lmtp:127.0.0.1:{dovecot.port}" in harness.node.router.paused()


async def test_queue_lifetime_ends_in_a_dsn(node_factory, dovecot: DovecotLmtp,  # type: ignore[no-untyped-def]
                                            sink: SmtpSink) -> None:
    harness = await lmtp_node(node_factory, dovecot, sink)
    assert harness.node is not None
    harness.node.queue.settings = dataclasses.replace(harness.node.queue.settings, lifetime=0.5)
    dovecot.stop()
    client, _ = await RawSMTP.connect(harness.port)
    assert (await client.transaction("sender@remote.example", ["bob@example.test"],
                                     dot_stuff(message("never delivered")))).code == 250
    await client.close()
    [dsn] = await sink.wait(1, timeout=15)
    text = dsn.data.decode()
    assert "Final-Recipient: rfc822; bob@example.test" in text
    assert "Status: 4.4.7" in text and "Action: failed" in text
    await harness.wait_empty()


async def test_smtputf8_message_with_ascii_addresses_reaches_dovecot(  # type: ignore[no-untyped-def]
        node_factory, dovecot: DovecotLmtp) -> None:
    # Dovecot 2.3 does not offer SMTPUTF8; a message that only has UTF-8 in its headers
    # must still be delivered, not bounced for want of the extension.
    harness = await lmtp_node(node_factory, dovecot)
    original = "Subject: Grüße aus Köln\r\nFrom: <s@remote.example>\r\n\r\nbody\r\n".encode()
    client, _ = await RawSMTP.connect(harness.port)
    await client.cmd("EHLO client.example")
    assert (await client.cmd("MAIL FROM:<s@remote.example> SMTPUTF8 BODY=8BITMIME")).code == 250
    assert (await client.cmd("RCPT TO:<alice@example.test>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    await client.send(dot_stuff(original))
    assert (await client.read_reply()).code == 250
    await client.close()
    await harness.wait_empty()
    [stored] = dovecot.messages("alice@example.test")
    assert stored.endswith(original)
    assert b"with UTF8SMTP" in stored
