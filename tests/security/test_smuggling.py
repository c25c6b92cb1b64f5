"""SMTP smuggling: no bare-CR/LF variant of end-of-data may start a second message.

Each vector hides `MAIL FROM ... DATA ...` after a fake end of data. Whatever the
node does with the first message (normalise or refuse), the hidden one must never be
stored as a message of its own, and nothing of it may turn into commands.
Both `[inbound] smuggling` modes are tested.
"""

from __future__ import annotations

import pytest

from tests.support.node import NodeHarness
from tests.support.smtp import RawSMTP

pytestmark = pytest.mark.integration

VECTORS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-cr": b"\r.\r",
    "crlf-dot-cr": b"\r\n.\r",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-crlf": b"\r.\r\n",
}


def smuggled(fake_end: bytes) -> bytes:
    return (b"From: <a@remote.example>\r\nSubject: first\r\n\r\nfirst body" + fake_end
            + b"MAIL FROM:<evil@remote.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled body\r\n.\r\n")


@pytest.mark.parametrize("mode", ["normalise", "reject"])
@pytest.mark.parametrize("vector", list(VECTORS))
async def test_no_second_message(node_factory, vector: str, mode: str) -> None:  # type: ignore[no-untyped-def]
    harness: NodeHarness = await node_factory(overrides={"inbound": {"smuggling": mode}})
    client, _ = await RawSMTP.connect(harness.port)
    await client.cmd("EHLO client.example")
    assert (await client.cmd("MAIL FROM:<a@remote.example>")).code == 250
    assert (await client.cmd("RCPT TO:<alice@example.test>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    await client.send(smuggled(VECTORS[vector]))
    reply = await client.read_reply()
    # Exactly one reply for the whole DATA: the hidden commands were data, not commands.
    if mode == "normalise":
        assert reply.code == 250, reply
    else:
        assert (reply.code, reply.status) == (550, "5.6.11"), reply
    assert (await client.cmd("NOOP")).code == 250  # nothing else is waiting in the stream
    await client.cmd("QUIT")
    await client.close()
    await harness.wait_empty()
    assert harness.maildir_messages("bob@example.test") == []
    stored = harness.maildir_messages("alice@example.test")
    if mode == "reject":
        assert stored == []
    else:
        [one] = stored
        assert b"smuggled body" in one  # still inside the first message
        # Normalised: every line ends in CRLF, and the fake end became a dot line that
        # the delivery agents dot-stuff again, never an end of data.
        assert b"\r\n" in one and b"\n" not in one.replace(b"\r\n", b"")
        assert b"\r" not in one.replace(b"\r\n", b"")
