"""The Dovecot LMTP peer fixture, checked by speaking raw LMTP to it.

These tests pin down what the fixture promises other integration tests: where mail lands
and byte for byte what Dovecot stores, which replies unknown and over-quota recipients
get and at which stage, that the UNIX socket works, and that stop/restart behave. The
client here is a few lines of asyncio streams on purpose: it must not depend on the
project's own LMTP client, which these peers exist to test.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.peers.dovecot import FILLER_FOLDER, DovecotError, DovecotLmtp
from tests.peers.fixtures import DovecotFactory

pytestmark = pytest.mark.integration

SENDER = "sender@remote.example"

# A message that exercises what must survive unchanged: CRLF line ends, a line that
# starts with a dot (dot-stuffed on the wire), 8-bit UTF-8, trailing whitespace, an
# empty last line.
MESSAGE = (
    b"From: Sender <sender@remote.example>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: peer check\r\n"
    b"Message-ID: <peer-check@remote.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln.\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b"trailing space \r\n"
    b"\r\n"
)

# What Dovecot prepends for a transaction with one recipient (the client's address is
# left out for a UNIX-socket client).
ADDED_SINGLE = re.compile(
    rb"Return-Path: <(?P<sender>[^>]*)>\r\n"
    rb"Delivered-To: (?P<rcpt>\S+)\r\n"
    rb"Received: from (?P<helo>\S+)(?: \(\[(?P<ip>[^\]]+)\]\))?\r\n"
    rb"\tby dovecot\.test with LMTP\r\n"
    rb"\tid \S+\r\n"
    rb"\t\(envelope-from <[^>]*>\)\r\n"
    rb"\tfor <(?P<for>[^>]+)>; [^\r\n]+\r\n"
)
# ... and for a transaction with several: no Delivered-To and no "for".
ADDED_MULTI = re.compile(
    rb"Return-Path: <[^>]*>\r\n"
    rb"Received: from \S+ \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby dovecot\.test with LMTP\r\n"
    rb"\tid \S+\r\n"
    rb"\t\(envelope-from <[^>]*>\); [^\r\n]+\r\n"
)


class RawLmtp:
    """Just enough LMTP client: commands, multi-line replies, DATA with dot-stuffing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), 5)
            if not raw:
                raise ConnectionError(f"connection closed after {lines!r}")
            line = raw.decode().rstrip("\r\n")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    async def command(self, line: str) -> tuple[int, str]:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def data(self, message: bytes, accepted: int) -> list[tuple[int, str]]:
        """Send DATA and return one reply per accepted recipient (LMTP, RFC 2033)."""
        code, text = await self.command("DATA")
        assert code == 354, text
        stuffed = b"".join(
            b"." + line if line.startswith(b".") else line
            for line in message.splitlines(keepends=True)
        )
        self.writer.write(stuffed + b".\r\n")
        await self.writer.drain()
        return [await self.reply() for _ in range(accepted)]

    async def transaction(
        self, recipients: Sequence[str], message: bytes = MESSAGE, sender: str = SENDER
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """MAIL, RCPT each, DATA if any was accepted: (RCPT replies, DATA replies)."""
        code, text = await self.command(f"MAIL FROM:<{sender}>")
        assert code == 250, text
        rcpt = [await self.command(f"RCPT TO:<{r}>") for r in recipients]
        accepted = sum(1 for code, _ in rcpt if code == 250)
        if not accepted:
            await self.command("RSET")
            return rcpt, []
        return rcpt, await self.data(message, accepted)


@asynccontextmanager
async def lmtp_session(
    dovecot: DovecotLmtp, *, unix: bool = False, helo: str = "gateway.test"
) -> AsyncIterator[RawLmtp]:
    if unix:
        reader, writer = await asyncio.open_unix_connection(str(dovecot.socket_path))
    else:
        reader, writer = await asyncio.open_connection(dovecot.host, dovecot.port)
    client = RawLmtp(reader, writer)
    try:
        code, text = await client.reply()
        assert code == 220, text
        code, text = await client.command(f"LHLO {helo}")
        assert code == 250, text
        yield client
        await client.command("QUIT")
    finally:
        writer.close()
        await writer.wait_closed()


def stored_body(stored: bytes, pattern: re.Pattern[bytes]) -> tuple[re.Match[bytes], bytes]:
    match = pattern.match(stored)
    assert match is not None, stored[:600]
    return match, stored[match.end():]


def _read(path: Path) -> str:
    return path.read_bytes().decode()


def _running(pid: int) -> bool:
    try:
        stat = _read(Path(f"/proc/{pid}/stat"))
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_startup_is_fast_and_private(dovecot: DovecotLmtp) -> None:
    assert dovecot.startup_seconds is not None and dovecot.startup_seconds < 1.0
    assert dovecot.running
    assert dovecot.pid is not None
    assert _read(dovecot.workdir / "base" / "master.pid").strip() == str(dovecot.pid)
    # Its own master with its own configuration, not the system's.
    argv = _read(Path(f"/proc/{dovecot.pid}/cmdline")).split("\0")
    assert argv[0].endswith("/dovecot") and argv[1:4] == ["-F", "-c", str(dovecot.config_path)]
    async with lmtp_session(dovecot) as lmtp:
        code, text = await lmtp.command("LHLO again.test")
    assert code == 250
    assert {"8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "CHUNKING"} <= set(
        text.splitlines()
    )


async def test_message_lands_byte_exact_in_maildir(dovecot: DovecotLmtp) -> None:
    async with lmtp_session(dovecot) as lmtp:
        rcpt, data = await lmtp.transaction(["alice@example.test"])
    assert rcpt == [(250, "2.1.5 OK")]
    assert len(data) == 1 and data[0][0] == 250 and data[0][1].startswith("2.0.0 <alice")

    [stored] = dovecot.messages("alice@example.test")
    match, body = stored_body(stored, ADDED_SINGLE)
    assert body == MESSAGE
    assert match["sender"] == SENDER.encode()
    assert match["rcpt"] == match["for"] == b"alice@example.test"
    assert match["helo"] == b"gateway.test" and match["ip"] == b"127.0.0.1"
    # Delivered to alice's Maildir under <root>/<domain>/<local>/new.
    [path] = (dovecot.maildir_root / "example.test" / "alice" / "new").iterdir()
    assert path.read_bytes() == stored
    assert dovecot.messages("bob@example.test") == []


async def test_several_recipients_share_one_file(dovecot: DovecotLmtp) -> None:
    recipients = ["alice@example.test", "Bob@Example.TEST", "carol@example.org"]
    async with lmtp_session(dovecot) as lmtp:
        rcpt, data = await lmtp.transaction(recipients)
    assert [code for code, _ in rcpt] == [250, 250, 250]
    assert [code for code, _ in data] == [250, 250, 250]
    copies = [dovecot.messages(r) for r in recipients]
    assert all(len(c) == 1 for c in copies)
    assert copies[0] == copies[1] == copies[2]
    _, body = stored_body(copies[0][0], ADDED_MULTI)
    assert body == MESSAGE
    inodes = {next((dovecot.maildir(r) / "new").iterdir()).stat().st_ino for r in recipients}
    assert len(inodes) == 1  # hard links of one file


async def test_unknown_user_is_refused_at_rcpt(dovecot: DovecotLmtp) -> None:
    async with lmtp_session(dovecot) as lmtp:
        rcpt, data = await lmtp.transaction(["nobody@example.test", "alice@example.test"])
    code, text = rcpt[0]
    assert (code, text.split()[0]) == (550, "5.1.1")
    assert "nobody@example.test" in text
    assert rcpt[1][0] == 250 and [c for c, _ in data] == [250]
    assert len(dovecot.messages("alice@example.test")) == 1


async def test_subaddress_lands_in_the_inbox(dovecot: DovecotLmtp) -> None:
    async with lmtp_session(dovecot) as lmtp:
        rcpt, data = await lmtp.transaction(["alice+lists@example.test"])
    assert rcpt[0][0] == 250 and data[0][0] == 250
    [stored] = dovecot.messages("alice@example.test")
    match, _ = stored_body(stored, ADDED_SINGLE)
    assert match["rcpt"] == b"alice+lists@example.test"


async def test_over_quota_user_is_refused_at_rcpt(dovecot: DovecotLmtp) -> None:
    async with lmtp_session(dovecot) as lmtp:
        rcpt, data = await lmtp.transaction(["dave@example.test", "alice@example.test"])
    code, text = rcpt[0]
    assert code == 552
    assert text == "5.2.2 <dave@example.test> Quota exceeded (mailbox for user is full)"
    assert [c for c, _ in data] == [250]
    assert dovecot.messages("dave@example.test") == []
    # The filler that holds dave over quota is in another folder, not INBOX.
    assert len(list((dovecot.maildir("dave@example.test") / FILLER_FOLDER / "cur").iterdir()))


async def test_quota_tempfail_and_data_stage(dovecot_factory: DovecotFactory) -> None:
    dovecot = dovecot_factory(
        ["erin@example.test"],
        over_quota=["dave@example.test"],
        quotas={"frank@example.test": 600},
        quota_tempfail=True,
    )
    async with lmtp_session(dovecot) as lmtp:
        rcpt, data = await lmtp.transaction(
            ["dave@example.test", "frank@example.test", "erin@example.test"],
            message=MESSAGE + b"x" * 1000 + b"\r\n",
        )
    assert rcpt[0][0] == 452 and rcpt[0][1].startswith("4.2.2 <dave@example.test> Quota")
    # frank is under his limit at RCPT; the message does not fit, so DATA says no for him.
    assert rcpt[1][0] == 250 and rcpt[2][0] == 250
    assert data[0][0] == 452 and data[0][1].startswith("4.2.2 <frank@example.test> Quota")
    assert data[1][0] == 250
    assert dovecot.messages("frank@example.test") == []
    assert len(dovecot.messages("erin@example.test")) == 1


async def test_unix_socket(dovecot: DovecotLmtp) -> None:
    assert dovecot.socket_path.is_socket()
    async with lmtp_session(dovecot, unix=True) as lmtp:
        rcpt, data = await lmtp.transaction(["carol@example.org"])
    assert rcpt[0][0] == 250 and data[0][0] == 250
    [stored] = dovecot.messages("carol@example.org")
    match, body = stored_body(stored, ADDED_SINGLE)
    assert body == MESSAGE
    assert match["ip"] is None  # a UNIX-socket client has no address to name


async def test_stop_then_connect_fails(dovecot: DovecotLmtp) -> None:
    pid = dovecot.pid
    assert pid is not None and dovecot.processes()
    started = time.monotonic()
    dovecot.stop()
    assert time.monotonic() - started < 5
    assert not dovecot.running and dovecot.pid is None
    with pytest.raises(OSError):
        socket.create_connection((dovecot.host, dovecot.port), timeout=1).close()
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(str(dovecot.socket_path))
    assert dovecot.processes() == []
    assert not _running(pid)
    dovecot.stop()  # idempotent


async def test_restart_keeps_port_and_mail(dovecot: DovecotLmtp) -> None:
    async with lmtp_session(dovecot) as lmtp:
        await lmtp.transaction(["bob@example.test"])
    port, old_pid = dovecot.port, dovecot.pid
    dovecot.restart()
    assert dovecot.port == port and dovecot.pid != old_pid
    async with lmtp_session(dovecot) as lmtp:
        rcpt, data = await lmtp.transaction(["bob@example.test"])
    assert rcpt[0][0] == 250 and data[0][0] == 250
    assert len(dovecot.messages("bob@example.test")) == 2


def test_config_error_fails_fast(dovecot_factory: DovecotFactory) -> None:
    started = time.monotonic()
    with pytest.raises(DovecotError, match="Unknown setting: no_such_setting"):
        dovecot_factory(extra_config="no_such_setting = yes\n")
    assert time.monotonic() - started < 5
