"""OutboundAgent against real SMTP peers on 127.0.0.1, plus the MX planning table.

Peers: aiosmtpd's Controller (a test peer; the gateway's own modules never import
aiosmtpd) for normal sessions, STARTTLS and per-recipient refusals, and a small scripted
asyncio server for misbehaviour aiosmtpd will not produce (5xx greetings, broken TLS, a
connection dropped after DATA). No traffic leaves the loopback interface: MX answers come
from an injected lookup table whose addresses are all 127.0.0.1 (the real DNS test
server arrives with a later issue).
"""

from __future__ import annotations

import asyncio
import datetime
import random
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.delivery import DeliveryJob
from gateway.outbound import (
    DnsTemporaryError,
    DomainNotFound,
    MxPlan,
    MxRecord,
    OutboundAgent,
    outcome_from_reply,
    parse_smarthost,
    plan_mx,
)

LOOPBACK = "127.0.0.1"
MESSAGE = (
    b"From: alice@example.org\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\n"
    b"Hello.\r\n.leading dot survives\r\n"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _job(*recipients: str, sender: str = "alice@example.org", message: bytes = MESSAGE,
         smtputf8: bool = False) -> DeliveryJob:
    return DeliveryJob(queue_id="Q1", sender=sender, recipients=list(recipients),
                       message=message, smtputf8=smtputf8)


# ------------------------------------------------------------------------ aiosmtpd peer


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    content: bytes
    tls: bool


@dataclass
class RecordingHandler:
    """Records messages; refuses the recipients / senders listed with the given replies."""

    refuse_rcpt: dict[str, str] = field(default_factory=dict)
    refuse_mail: str | None = None
    refuse_data: str | None = None
    messages: list[Received] = field(default_factory=list)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if self.refuse_mail is not None:
            return self.refuse_mail
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.refuse_data is not None:
            return self.refuse_data
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      list(envelope.mail_options), envelope.original_content,
                                      session.ssl is not None))
        return "250 2.0.0 Ok: queued as PEER1"


@dataclass
class Peer:
    handler: RecordingHandler
    port: int


def _start_peer(handler: RecordingHandler, **kwargs: Any) -> tuple[Controller, int]:
    for _ in range(5):
        port = _free_port()
        controller = Controller(handler, hostname=LOOPBACK, port=port,
                                server_hostname="peer.test", **kwargs)
        try:
            controller.start()
        except OSError:  # the port was taken in the meantime
            continue
        return controller, port
    raise RuntimeError("could not start the SMTP test peer")


@pytest.fixture
def peer() -> Iterator[Peer]:
    handler = RecordingHandler()
    controller, port = _start_peer(handler, data_size_limit=10_000)
    try:
        yield Peer(handler, port)
    finally:
        controller.stop()


def _self_signed(directory: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


@pytest.fixture
def tls_peer(tmp_path: Path) -> Iterator[Peer]:
    handler = RecordingHandler()
    controller, port = _start_peer(handler, tls_context=_self_signed(tmp_path))
    try:
        yield Peer(handler, port)
    finally:
        controller.stop()


def _agent(port: int, **kwargs: Any) -> OutboundAgent:
    return OutboundAgent(helo_name="mx1.mailedge.test", smarthost=f"{LOOPBACK}:{port}",
                         resolver=None, timeout=5, **kwargs)


# ------------------------------------------------------------------------ smarthost path


async def test_accepted(peer: Peer) -> None:
    agent = _agent(peer.port)
    outcomes = await agent.deliver(_job("bob@example.test", "carol@example.test"))
    await agent.aclose()

    assert [(o.code, o.status) for o in outcomes] == [(250, "2.0.0"), (250, "2.0.0")]
    assert all(o.remote == LOOPBACK for o in outcomes)
    assert outcomes[0].text == "Ok: queued as PEER1"
    [got] = peer.handler.messages
    assert got.mail_from == "alice@example.org"
    assert got.rcpt_tos == ["bob@example.test", "carol@example.test"]
    assert f"SIZE={len(MESSAGE)}" in got.mail_options
    assert got.content == MESSAGE  # dot-stuffing was undone by the peer
    assert not got.tls


async def test_null_sender(peer: Peer) -> None:
    [outcome] = await _agent(peer.port).deliver(_job("bob@example.test", sender=""))
    assert outcome.delivered
    assert peer.handler.messages[0].mail_from == "<>"  # aiosmtpd records the null path so


async def test_per_recipient_refusals(peer: Peer) -> None:
    peer.handler.refuse_rcpt = {
        "nobody@example.test": "550 5.1.1 <nobody@example.test>: User unknown",
        "busy@example.test": "450 4.2.1 Mailbox busy, try later",
        "plain@example.test": "550 No such user",
    }
    outcomes = await _agent(peer.port).deliver(
        _job("bob@example.test", "nobody@example.test", "busy@example.test",
             "plain@example.test")
    )
    assert [(o.code, o.status) for o in outcomes] == [
        (250, "2.0.0"), (550, "5.1.1"), (450, "4.2.1"), (550, "5.0.0"),
    ]
    assert outcomes[1].text == "<nobody@example.test>: User unknown"
    assert outcomes[1].diagnostic() == "smtp; 550 5.1.1 <nobody@example.test>: User unknown"
    assert outcomes[2].temporary
    assert peer.handler.messages[0].rcpt_tos == ["bob@example.test"]


async def test_all_recipients_refused_sends_no_data(peer: Peer) -> None:
    peer.handler.refuse_rcpt = {"bob@example.test": "550 5.1.1 unknown"}
    [outcome] = await _agent(peer.port).deliver(_job("bob@example.test"))
    assert (outcome.code, outcome.status) == (550, "5.1.1")
    assert peer.handler.messages == []


async def test_sender_refused_permanently(peer: Peer) -> None:
    peer.handler.refuse_mail = "550 5.7.1 Sender rejected"
    outcomes = await _agent(peer.port).deliver(_job("bob@example.test", "carol@example.test"))
    assert [(o.code, o.status, o.text) for o in outcomes] == [
        (550, "5.7.1", "Sender rejected")
    ] * 2


async def test_sender_refused_temporarily(peer: Peer) -> None:
    peer.handler.refuse_mail = "451 4.3.2 Please try again later"
    [outcome] = await _agent(peer.port).deliver(_job("bob@example.test"))
    assert (outcome.code, outcome.status) == (451, "4.3.2")
    assert outcome.remote == LOOPBACK


async def test_data_refused(peer: Peer) -> None:
    peer.handler.refuse_data = "554 5.6.0 Content rejected"
    peer.handler.refuse_rcpt = {"nobody@example.test": "550 5.1.1 unknown"}
    outcomes = await _agent(peer.port).deliver(_job("bob@example.test", "nobody@example.test"))
    assert [(o.code, o.status) for o in outcomes] == [(554, "5.6.0"), (550, "5.1.1")]


async def test_message_over_peer_size_limit(peer: Peer) -> None:
    big = MESSAGE + b"x" * 20_000 + b"\r\n"
    [outcome] = await _agent(peer.port).deliver(_job("bob@example.test", message=big))
    assert (outcome.code, outcome.status) == (552, "5.3.4")
    assert peer.handler.messages == []


async def test_smtputf8(peer: Peer) -> None:
    [outcome] = await _agent(peer.port).deliver(
        _job("jürgen@example.test", sender="ünal@example.org", smtputf8=True)
    )
    assert outcome.delivered
    [got] = peer.handler.messages
    assert got.rcpt_tos == ["jürgen@example.test"]
    assert "SMTPUTF8" in got.mail_options


async def test_non_ascii_address_without_smtputf8_is_refused_locally(peer: Peer) -> None:
    outcomes = await _agent(peer.port).deliver(_job("jürgen@example.test", "bob@example.test"))
    assert [(o.code, o.status) for o in outcomes] == [(553, "5.6.7"), (250, "2.0.0")]


async def test_starttls_is_used_when_offered(tls_peer: Peer) -> None:
    [outcome] = await _agent(tls_peer.port).deliver(_job("bob@example.test"))
    assert outcome.delivered
    assert tls_peer.handler.messages[0].tls


async def test_server_down_is_4_4_1() -> None:
    port = _free_port()  # nothing listens here
    outcomes = await _agent(port).deliver(_job("bob@example.test", "carol@example.test"))
    assert [(o.code, o.status) for o in outcomes] == [(451, "4.4.1")] * 2
    assert all(o.remote == "" for o in outcomes)


async def test_recipients_must_share_a_domain(peer: Peer) -> None:
    with pytest.raises(AssertionError):
        await _agent(peer.port).deliver(_job("bob@example.test", "eve@other.test"))


# ------------------------------------------------------------------------ scripted peer


class ScriptedPeer:
    """A tiny SMTP server on loopback whose behaviour is chosen per connection.

    Modes: "normal", "greet-554" (refuses at the greeting), "bad-tls" (offers STARTTLS,
    says 220, then sends plain text instead of a TLS handshake), "drop-after-data"
    (closes the connection without answering the end of DATA).
    """

    def __init__(self, modes: list[str]) -> None:
        self.modes = modes
        self.connections = 0
        self.delivered: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in list(self._writers):
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self.modes[min(self.connections, len(self.modes) - 1)]
        self.connections += 1
        self._writers.add(writer)
        try:
            await self._converse(mode, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
            self._writers.discard(writer)

    async def _converse(self, mode: str, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        async def say(text: str) -> None:
            writer.write(text.encode() + b"\r\n")
            await writer.drain()

        if mode == "greet-554":
            await say("554 5.7.1 No service for you")
            return
        await say("220 scripted.test ESMTP")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                extra = "250-STARTTLS\r\n" if mode == "bad-tls" else ""
                await say(f"250-scripted.test\r\n{extra}250 8BITMIME")
            elif verb == b"STAR":
                await say("220 2.0.0 Ready to start TLS")
                await say("this is not a TLS handshake")
                return
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                await say("250 2.0.0 OK")
            elif verb == b"DATA":
                await say("354 go ahead")
                data = await reader.readuntil(b"\r\n.\r\n")
                if mode == "drop-after-data":
                    return
                self.delivered.append(data)
                await say("250 2.0.0 queued")
            elif verb == b"QUIT":
                await say("221 2.0.0 bye")
                return
            else:
                await say("500 5.5.1 unknown command")


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedPeer]:
    server = ScriptedPeer(["normal"])
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_broken_tls_falls_back_to_plain_text(scripted: ScriptedPeer) -> None:
    scripted.modes = ["bad-tls", "normal"]
    [outcome] = await _agent(scripted.port).deliver(_job("bob@example.test"))
    assert outcome.delivered
    assert scripted.connections == 2
    assert len(scripted.delivered) == 1


async def test_connection_lost_after_data_is_temporary(scripted: ScriptedPeer) -> None:
    scripted.modes = ["drop-after-data"]
    [outcome] = await _agent(scripted.port).deliver(_job("bob@example.test"))
    assert (outcome.code, outcome.status) == (451, "4.4.2")


async def test_5xx_greeting_is_not_a_final_answer(scripted: ScriptedPeer) -> None:
    scripted.modes = ["greet-554"]
    [outcome] = await _agent(scripted.port).deliver(_job("bob@example.test"))
    assert (outcome.code, outcome.status) == (451, "4.4.1")


# ------------------------------------------------------------------------ MX routing


class TableLookup:
    """MxLookup from dictionaries; a value that is an exception class is raised."""

    def __init__(self, mx: dict[str, Any], addresses: dict[str, Any]) -> None:
        self._mx = mx
        self._addresses = addresses
        self.asked: list[str] = []

    async def mx(self, domain: str) -> list[MxRecord] | None:
        self.asked.append(f"MX {domain}")
        answer = self._mx[domain]
        if isinstance(answer, type) and issubclass(answer, Exception):
            raise answer(domain)
        return None if answer is None else [MxRecord(p, h) for p, h in answer]

    async def addresses(self, host: str) -> list[str]:
        self.asked.append(f"ADDR {host}")
        answer = self._addresses.get(host, DomainNotFound)
        if isinstance(answer, type) and issubclass(answer, Exception):
            raise answer(host)
        return list(answer)


def _mx_agent(port: int, lookup: TableLookup) -> OutboundAgent:
    return OutboundAgent(helo_name="mx1.mailedge.test", smarthost=None, resolver=None,
                         port=port, timeout=5, lookup=lookup, rng=random.Random(7))


async def test_mx_route_skips_hosts_that_fail(scripted: ScriptedPeer) -> None:
    scripted.modes = ["greet-554", "normal"]
    lookup = TableLookup(
        mx={"example.test": [(20, "mx-c.example.test."), (10, "mx-a.example.test."),
                             (15, "mx-b.example.test.")]},
        addresses={"mx-a.example.test": DomainNotFound,  # no such host: skipped
                   "mx-b.example.test": [LOOPBACK],  # refuses at the greeting
                   "mx-c.example.test": [LOOPBACK]},
    )
    [outcome] = await _mx_agent(scripted.port, lookup).deliver(_job("bob@example.test"))
    assert outcome.delivered
    assert outcome.remote == "mx-c.example.test"
    assert lookup.asked == ["MX example.test", "ADDR mx-a.example.test",
                            "ADDR mx-b.example.test", "ADDR mx-c.example.test"]
    assert scripted.connections == 2


async def test_no_mx_falls_back_to_the_domain(peer: Peer) -> None:
    lookup = TableLookup(mx={"example.test": None}, addresses={"example.test": [LOOPBACK]})
    [outcome] = await _mx_agent(peer.port, lookup).deliver(_job("bob@example.test"))
    assert outcome.delivered
    assert outcome.remote == "example.test"


async def test_null_mx_refuses_without_connecting() -> None:
    lookup = TableLookup(mx={"example.test": [(0, ".")]}, addresses={})
    outcomes = await _mx_agent(_free_port(), lookup).deliver(
        _job("bob@example.test", "carol@example.test"))
    assert [(o.code, o.status) for o in outcomes] == [(550, "5.1.10")] * 2
    assert outcomes[0].text == "Recipient domain does not accept mail"
    assert lookup.asked == ["MX example.test"]


@pytest.mark.parametrize(
    ("mx", "addresses", "expected"),
    [
        (DomainNotFound, {}, (550, "5.1.2")),
        (DnsTemporaryError, {}, (451, "4.4.3")),
        ([(10, "mx.example.test")], {"mx.example.test": DnsTemporaryError}, (451, "4.4.3")),
        ([(10, "mx.example.test")], {"mx.example.test": []}, (550, "5.4.4")),
        (None, {"example.test": []}, (550, "5.4.4")),
        (None, {"example.test": DomainNotFound}, (550, "5.1.2")),
    ],
)
async def test_dns_failures(mx: Any, addresses: dict[str, Any],
                            expected: tuple[int, str]) -> None:
    lookup = TableLookup(mx={"example.test": mx}, addresses=addresses)
    [outcome] = await _mx_agent(_free_port(), lookup).deliver(_job("bob@example.test"))
    assert (outcome.code, outcome.status) == expected


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (None, MxPlan(hosts=("example.test",), implicit=True)),
        ([], MxPlan(hosts=("example.test",), implicit=True)),
        ([MxRecord(0, ".")], MxPlan(hosts=(), null_mx=True)),
        ([MxRecord(10, ".")], MxPlan(hosts=(), null_mx=True)),
        ([MxRecord(0, "."), MxRecord(10, "mx.example.test.")],
         MxPlan(hosts=("mx.example.test",))),
        ([MxRecord(20, "b.example.test."), MxRecord(10, "A.Example.Test."),
          MxRecord(30, "c.example.test")],
         MxPlan(hosts=("a.example.test", "b.example.test", "c.example.test"))),
        ([MxRecord(10, "a.example.test."), MxRecord(5, "a.example.test.")],
         MxPlan(hosts=("a.example.test",))),
        ([MxRecord(10, "x.example.test."), MxRecord(10, "y.example.test."),
          MxRecord(5, "w.example.test.")],
         MxPlan(hosts=("w.example.test", "x.example.test", "y.example.test"))),
    ],
)
def test_plan_mx(records: list[MxRecord] | None, expected: MxPlan) -> None:
    assert plan_mx("Example.Test.", records) == expected


def test_plan_mx_shuffles_only_within_a_preference() -> None:
    records = [MxRecord(10, f"h{i}.example.test") for i in range(6)]
    records.append(MxRecord(5, "first.example.test"))
    records.append(MxRecord(50, "last.example.test"))
    orders = {plan_mx("example.test", records, rng=random.Random(seed)).hosts
              for seed in range(20)}
    assert len(orders) > 1
    for hosts in orders:
        assert hosts[0] == "first.example.test" and hosts[-1] == "last.example.test"
        assert sorted(hosts[1:-1]) == [f"h{i}.example.test" for i in range(6)]


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (550, "5.1.1 User unknown", (550, "5.1.1", "User unknown")),
        (550, "User unknown", (550, "5.0.0", "User unknown")),
        (450, "5.1.1 class mismatch", (450, "4.0.0", "5.1.1 class mismatch")),
        (550, "5.7.1 first line\n5.7.1 second line", (550, "5.7.1", "first line second line")),
        (250, "2.0.0 Ok: queued", (250, "2.0.0", "Ok: queued")),
        (354, "go ahead", (451, "4.5.0", "Unexpected reply 354 go ahead")),
    ],
)
def test_outcome_from_reply(code: int, message: str, expected: tuple[int, str, str]) -> None:
    outcome = outcome_from_reply(code, message, "mx.example.test")
    assert (outcome.code, outcome.status, outcome.text) == expected
    assert outcome.remote == "mx.example.test"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("relay.example.test", ("relay.example.test", 25)),
        ("relay.example.test:587", ("relay.example.test", 587)),
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("[::1]:2525", ("::1", 2525)),
        ("[::1]", ("::1", 25)),
    ],
)
def test_parse_smarthost(spec: str, expected: tuple[str, int]) -> None:
    assert parse_smarthost(spec, 25) == expected
