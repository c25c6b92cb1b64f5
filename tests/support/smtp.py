"""A raw SMTP client for tests: exact bytes in, parsed replies out.

aiosmtplib normalises what it sends (it fixes bare LF and dot-stuffs), which is right
for a client and wrong for a test that must send hostile bytes. This one sends
exactly what the test gives it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def status(self) -> str:
        match = re.match(r"^([245]\.\d{1,3}\.\d{1,3})\b", self.lines[-1])
        return match.group(1) if match else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class RawSMTP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1",
                      prefix: bytes = b"") -> tuple[RawSMTP, Reply]:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        if prefix:
            writer.write(prefix)
        return client, await client.read_reply()

    async def read_reply(self, timeout: float = 10.0) -> Reply:
        lines: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    raise ConnectionError("connection closed; got " + repr(lines))
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(line[4:])
                if len(line) < 4 or line[3] != "-":
                    return Reply(int(line[:3]), tuple(lines))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> Reply:
        data = line if isinstance(line, bytes) else line.encode()
        await self.send(data + b"\r\n")
        return await self.read_reply()

    async def closed(self, timeout: float = 5.0) -> bool:
        async with asyncio.timeout(timeout):
            return await self.reader.read() == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def transaction(self, sender: str, recipients: list[str], data: bytes,
                          helo: str = "client.example") -> Reply:
        """EHLO (if not yet), MAIL, RCPTs, DATA with data sent verbatim (must end CRLF.CRLF)."""
        assert (await self.cmd(f"EHLO {helo}")).code == 250
        reply = await self.cmd(f"MAIL FROM:<{sender}>")
        assert reply.code == 250, reply
        for rcpt in recipients:
            reply = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.code == 250, reply
        reply = await self.cmd("DATA")
        assert reply.code == 354, reply
        await self.send(data)
        return await self.read_reply()


def message(subject: str = "test", body: str = "Hello.\r\n", sender: str = "x@sender.example",
            to: str = "alice@example.test", extra_headers: str = "") -> bytes:
    text = (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@sender.example>\r\n{extra_headers}"
            f"\r\n{body}")
    return text.encode()


def dot_stuff(data: bytes) -> bytes:
    """Encode a CRLF message for DATA: dot-stuff and terminate."""
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"
