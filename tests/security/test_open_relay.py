"""The node is never an open relay, whatever the address tricks.

Only mailboxes in the tenant directory are accepted. Classic relay tests (the ones
relay checkers have used since the 1990s) all get a refusal at RCPT, and nothing is
ever queued for a foreign domain.
"""

from __future__ import annotations

import pytest

from tests.support.node import NodeHarness
from tests.support.smtp import RawSMTP

pytestmark = pytest.mark.integration

ATTEMPTS = [
    "<victim@foreign.example>",
    "<victim%foreign.example@example.test>",  # %-hack: a local part here, no such user
    "<foreign.example!victim@example.test>",  # bang path: the same
    "<@example.test:victim@foreign.example>",  # source route: the route is ignored
    "<@example.test,@mx.test.example:victim@foreign.example>",
    '<"victim@foreign.example"@example.test>',  # quoted local part
    '<"victim%foreign.example">',  # no domain at all
    "<victim@foreign.example@example.test>",  # two @: syntax error
    "<victim@[127.0.0.1]>",  # address literal of ourselves
    "<victim@[IPv6:::1]>",
    "<victim@example.test.foreign.example>",
    "<victim@foreign.example.>",
    "victim@foreign.example",
    "<victim@EXAMPLE.test@foreign.example>",
    "<alice@example.test> <victim@foreign.example>",
    "<victim@xn--bcher-kva.example>",
]


@pytest.mark.parametrize("rcpt", ATTEMPTS)
async def test_relay_attempt_refused(node: NodeHarness, rcpt: str) -> None:
    client, _ = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.example")
    assert (await client.cmd("MAIL FROM:<spammer@remote.example>")).code == 250
    reply = await client.cmd(f"RCPT TO:{rcpt}")
    assert reply.code in (550, 553, 501, 555), reply
    # With no recipient accepted there is nothing to send.
    assert (await client.cmd("DATA")).code == 503
    await client.close()
    assert node.node is not None and not node.node.queue.entries


async def test_null_sender_and_foreign_recipient_in_one_transaction(node: NodeHarness) -> None:
    client, _ = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.example")
    assert (await client.cmd("MAIL FROM:<>")).code == 250
    assert (await client.cmd("RCPT TO:<alice@example.test>")).code == 250
    assert (await client.cmd("RCPT TO:<victim@foreign.example>")).code == 550
    assert (await client.cmd("DATA")).code == 354
    await client.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert (await client.read_reply()).code == 250
    await client.close()
    await node.wait_empty()
    assert node.node is not None
    assert len(node.maildir_messages("alice@example.test")) == 1
    # The only copy went to the hosted mailbox: nothing else was attempted.
    assert [p.name for p in node.maildir.iterdir()] == ["example.test"]
