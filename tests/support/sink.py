"""A recording SMTP server (aiosmtpd) on loopback: the "remote MX" for outbound mail.

Used where mail leaves the node (DSNs to remote senders): it is a real SMTP server on
a real socket, started in the test's event loop, and it keeps what it receives.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.peers.ports import free_port


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class SinkHandler:
    messages: list[Received] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.messages.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                      bytes(content)))
        self.arrived.set()
        return "250 2.0.0 stored"


class SmtpSink:
    def __init__(self) -> None:
        self.handler = SinkHandler()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> SmtpSink:
        self.port = free_port()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self.handler, hostname="sink.test", enable_SMTPUTF8=True),
            "127.0.0.1", self.port)
        return self

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    async def wait(self, count: int = 1, timeout: float = 10.0) -> list[Received]:
        async with asyncio.timeout(timeout):
            while len(self.handler.messages) < count:
                self.handler.arrived.clear()
                await self.handler.arrived.wait()
        return self.handler.messages

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


