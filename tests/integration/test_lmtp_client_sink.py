"""lmtp.client and lmtp.pool against a scripted LMTP server on a real socket.

The server below is written for these tests: it answers each command as it reads it (so
the client's pipelining is exercised for real), writes one reply per accepted recipient
after the data (RFC 2033 §4.2; aiosmtpd's LMTP class sends only one), records exactly
what it received, and can be told to misbehave: never greet, stop answering, close in the
middle of the data, say 421 while idle, drop a reused connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmtp import (
    ConnectError,
    ConnectionLost,
    Endpoint,
    ExtensionNotSupported,
    LmtpConnection,
    LmtpPool,
    LmtpPools,
    LmtpTimeout,
    LmtpTimeouts,
    LocalProtocolError,
    Reply,
    ServerUnavailable,
    decode_data,
    encode_data,
    normalise_message,
)
from lmtp import client as lmtp_client

SHORT = LmtpTimeouts(connect=0.3, command=0.3, data=0.3)
MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


@dataclass
class Received:
    sender: str
    params: list[str]
    recipients: list[str]  # the accepted ones
    payload: bytes  # exactly the bytes after 354, terminator included


@dataclass
class ScriptedServer:
    """A small LMTP server whose behaviour tests switch with the fields below."""

    extensions: tuple[str, ...] = ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8")
    greeting: bytes = b"220 sink.test LMTP ready\r\n"
    greet: bool = True
    hang_after_lhlo: bool = False  # read commands, answer none
    hang_after_payload: bool = False  # read the payload, answer nothing
    close_mid_data: bool = False  # after 354, read a few bytes and close
    close_after_first_final: bool = False
    drop_on_transaction: int | None = None  # close at the Nth MAIL of a connection
    goodbye_on_transaction: int | None = None  # 421 and close at the Nth MAIL
    stall_after_354: bool = False  # stop reading after 354
    hang_on_quit: bool = False
    drop_after_payload_on_transaction: int | None = None
    goodbye_after_transaction: bool = False  # 421 shortly after each transaction, close
    final_delay: float = 0.0
    go_ahead_without_recipients: bool = False  # 354 even if no RCPT was accepted

    received: list[Received] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    connections_total: int = 0
    current: int = 0
    max_concurrent: int = 0
    quits: int = 0
    host: str = ""
    port: int = 0
    endpoint: str = ""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[object]] = field(default_factory=set)

    async def start_tcp(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=2**20)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        self.endpoint = f"{self.host}:{self.port}"
        return self

    async def start_unix(self, path: str) -> ScriptedServer:
        self._server = await asyncio.start_unix_server(self._handle, path, limit=2**20)
        self.endpoint = f"unix:{path}"
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections_total += 1
        self.current += 1
        self.max_concurrent = max(self.max_concurrent, self.current)
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.current -= 1
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.greet:
            await reader.read()  # until the client gives up
            return
        writer.write(self.greeting)
        transactions = 0
        sender: str | None = None
        params: list[str] = []
        accepted: list[str] = []
        while True:
            line = await reader.readline()
            if not line:
                return
            command = line.decode("utf-8", "replace").rstrip("\r\n")
            self.commands.append(command)
            verb = command[:4].upper()
            if self.hang_after_lhlo and verb != "LHLO":
                await reader.read()
                return
            if verb == "LHLO":
                names = ["sink.test", *self.extensions]
                writer.write(
                    "".join(f"250-{n}\r\n" for n in names[:-1]).encode()
                    + f"250 {names[-1]}\r\n".encode()
                )
            elif verb == "MAIL":
                transactions += 1
                if self.drop_on_transaction == transactions:
                    return
                if self.goodbye_on_transaction == transactions:
                    writer.write(b"421 4.4.2 sink.test Idle timeout, closing\r\n")
                    await writer.drain()
                    return
                address, _, rest = command[11:].partition(">")
                if address.startswith("blocked"):
                    writer.write(b"550 5.7.1 Sender blocked\r\n")
                else:
                    sender, params, accepted = address, rest.split(), []
                    writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT":
                address = command[9:-1]
                if sender is None:
                    writer.write(b"503 5.5.1 MAIL first\r\n")
                elif address.startswith("unknown"):
                    writer.write(f"550 5.1.1 <{address}> User doesn't exist\r\n".encode())
                elif address.startswith("full"):
                    writer.write(f"452 4.2.2 <{address}> Mailbox is full\r\n".encode())
                else:
                    accepted.append(address)
                    writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == "DATA":
                if sender is None or (not accepted and not self.go_ahead_without_recipients):
                    writer.write(b"503 5.5.1 No valid recipients\r\n")
                    continue
                writer.write(b"354 OK\r\n")
                await writer.drain()
                if self.close_mid_data:
                    await reader.read(10)
                    return
                if self.stall_after_354:
                    await asyncio.sleep(3600)
                lines = []
                while True:
                    data_line = await reader.readline()
                    if not data_line:
                        return
                    lines.append(data_line)
                    if data_line == b".\r\n":
                        break
                payload = b"".join(lines)
                if not accepted:
                    writer.write(b"554 5.5.1 No valid recipients\r\n")
                    continue
                self.received.append(Received(sender, params, list(accepted), payload))
                if self.hang_after_payload:
                    await reader.read()
                    return
                if self.drop_after_payload_on_transaction == transactions:
                    return
                if self.final_delay:
                    await asyncio.sleep(self.final_delay)
                for address in accepted:
                    if address.startswith("sievefail"):
                        writer.write(f"550 5.7.1 <{address}> Refused by Sieve\r\n".encode())
                    else:
                        writer.write(f"250 2.0.0 <{address}> Saved\r\n".encode())
                    if self.close_after_first_final:
                        await writer.drain()
                        return
                sender, accepted = None, []
                if self.goodbye_after_transaction:
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(b"421 4.4.2 sink.test Idle timeout, closing\r\n")
                    await writer.drain()
                    return
            elif verb == "RSET":
                sender, accepted = None, []
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                self.quits += 1
                if self.hang_on_quit:
                    await reader.read()
                    return
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"500 5.5.2 Unknown command\r\n")
            await writer.drain()


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    srv = await ScriptedServer().start_tcp()
    yield srv
    await srv.stop()


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # UNIX socket paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="lmtp-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def unix_server(socket_dir: str) -> AsyncIterator[ScriptedServer]:
    srv = await ScriptedServer().start_unix(str(Path(socket_dir) / "lmtp.sock"))
    yield srv
    await srv.stop()


async def connect(srv: ScriptedServer, timeouts: LmtpTimeouts = SHORT) -> LmtpConnection:
    return await LmtpConnection.open_tcp(srv.host, srv.port, lhlo_name="gw.test", timeouts=timeouts)


def codes(replies: list[Reply]) -> list[int]:
    return [r.code for r in replies]


# -- one connection -----------------------------------------------------------------


async def test_tcp_delivery_with_per_recipient_results(server: ScriptedServer) -> None:
    recipients = ["ok@x.test", "unknown@x.test", "full@x.test", "sievefail@x.test", "ok2@x.test"]
    async with await connect(server) as conn:
        assert conn.greeting == Reply(220, None, ("sink.test LMTP ready",))
        assert "PIPELINING" in conn.extensions
        replies = await conn.send("a@example.org", recipients, MESSAGE)
        assert codes(replies) == [250, 550, 452, 550, 250]
        assert str(replies[0]) == "250 2.0.0 <ok@x.test> Saved"
        assert replies[1].enhanced == "5.1.1"
        assert replies[3].text == "<sievefail@x.test> Refused by Sieve"
        assert conn.is_reusable
    assert conn.is_closed
    (got,) = server.received
    assert got.sender == "a@example.org"
    assert got.recipients == ["ok@x.test", "sievefail@x.test", "ok2@x.test"]
    assert got.payload == encode_data(MESSAGE)
    assert server.commands[0] == "LHLO gw.test"
    assert server.commands[-1] == "QUIT" and server.quits == 1


async def test_unix_socket_delivery(unix_server: ScriptedServer) -> None:
    path = unix_server.endpoint.removeprefix("unix:")
    async with await LmtpConnection.open_unix(path, timeouts=SHORT) as conn:
        assert conn.remote == unix_server.endpoint
        replies = await conn.send("", ["b@x.test", "c@x.test"], MESSAGE)
    assert codes(replies) == [250, 250]
    assert unix_server.received[0].sender == ""
    assert unix_server.quits == 1


async def test_envelope_in_one_write_and_payload_in_one_write(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    original = lmtp_client._SocketAdapter.write

    async def recording_write(self: lmtp_client._SocketAdapter, data: bytes) -> None:
        writes.append(data)
        await original(self, data)

    monkeypatch.setattr(lmtp_client._SocketAdapter, "write", recording_write)
    async with await connect(server) as conn:
        writes.clear()
        await conn.send("a@x", ["b@x", "c@x", "d@x"], MESSAGE)
        assert writes == [
            b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nRCPT TO:<d@x>\r\nDATA\r\n",
            encode_data(MESSAGE),
        ]


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"no final newline",
        b"bare\nLF\nlines\n",
        b"bare\rCR\rlines\r",
        b"mixed\r\nand\nbare\rends\r\r\n",
        b".leading dot\r\n..two dots\r\n.\r\nlone dot line\r\n",
        b"smuggle\r\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<victim@x>\r\nDATA\r\nfake\r\n",
        b"bare LF smuggle\n.\nMAIL FROM:<evil@x>\n",
        b"8-bit \xff\xfe\xe9 bytes and NUL \x00\r\n",
        (b"x" * 78 + b"\r\n" + b".dot\r\n") * 640,  # ~52 KB
    ],
    ids=[
        "empty",
        "no-final-newline",
        "bare-lf",
        "bare-cr",
        "mixed",
        "dots",
        "crlf-smuggle",
        "lf-smuggle",
        "8bit",
        "50k",
    ],
)
async def test_payload_is_dot_stuffed_and_byte_exact(
    server: ScriptedServer, message: bytes
) -> None:
    async with await connect(server) as conn:
        replies = await conn.send("a@x", ["b@x"], message, eight_bit=True)
        assert codes(replies) == [250]
        # the connection is still in step: a second message goes through
        assert codes(await conn.send("a@x", ["c@x"], MESSAGE)) == [250]
    assert len(server.received) == 2  # nothing was smuggled in as a third transaction
    payload = server.received[0].payload
    assert payload == encode_data(message)
    assert decode_data(payload) == normalise_message(message)
    assert server.received[0].params == ["BODY=8BITMIME"]


async def test_smtputf8(server: ScriptedServer) -> None:
    async with await connect(server) as conn:
        replies = await conn.send(
            "jörg@bücher.test", ["δοκιμή@παράδειγμα.test"], MESSAGE, smtputf8=True, eight_bit=True
        )
    assert codes(replies) == [250]
    assert server.received[0].sender == "jörg@bücher.test"
    assert server.received[0].params == ["BODY=8BITMIME", "SMTPUTF8"]


async def test_smtputf8_not_advertised_leaves_the_connection_usable(
    server: ScriptedServer,
) -> None:
    server.extensions = ("PIPELINING", "8BITMIME")
    async with await connect(server) as conn:
        with pytest.raises(ExtensionNotSupported):
            await conn.send("jörg@x", ["b@x"], MESSAGE, smtputf8=True)
        with pytest.raises(LocalProtocolError):
            await conn.send("jörg@x", ["b@x"], MESSAGE)  # UTF-8 address needs SMTPUTF8
        assert conn.is_reusable
        assert codes(await conn.send("a@x", ["b@x"], MESSAGE)) == [250]
    assert not any(c.startswith("MAIL FROM:<jörg") for c in server.commands)


async def test_refused_mail_and_no_accepted_recipients_reset_and_continue(
    server: ScriptedServer,
) -> None:
    async with await connect(server) as conn:
        assert codes(await conn.send("blocked@x", ["b@x", "c@x"], MESSAGE)) == [550, 550]
        assert codes(await conn.send("a@x", ["unknown@x", "full@x"], MESSAGE)) == [550, 452]
        assert codes(await conn.send("a@x", ["b@x"], MESSAGE)) == [250]
    assert server.commands.count("RSET") == 2
    assert len(server.received) == 1


async def test_354_without_accepted_recipients_gets_a_lone_dot(server: ScriptedServer) -> None:
    server.go_ahead_without_recipients = True
    async with await connect(server) as conn:
        assert codes(await conn.send("a@x", ["unknown@x"], MESSAGE)) == [550]
        assert codes(await conn.send("a@x", ["b@x"], MESSAGE)) == [250]
    assert len(server.received) == 1


async def test_overlapping_sends_on_one_connection_are_refused(server: ScriptedServer) -> None:
    server.final_delay = 0.05
    async with await connect(server) as conn:
        first = asyncio.create_task(conn.send("a@x", ["b@x"], MESSAGE))
        await asyncio.sleep(0.01)
        with pytest.raises(LocalProtocolError):
            await conn.send("a@x", ["c@x"], MESSAGE)
        assert codes(await first) == [250]


# -- failures -----------------------------------------------------------------------


async def test_connection_refused_is_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(ConnectError) as info:
        await LmtpConnection.open_tcp("127.0.0.1", port, timeouts=SHORT)
    assert info.value.temporary


async def test_missing_unix_socket_is_connect_error(socket_dir: str) -> None:
    with pytest.raises(ConnectError):
        await LmtpConnection.open_unix(f"{socket_dir}/nothing-here", timeouts=SHORT)


async def test_refusing_greeting_is_server_unavailable(server: ScriptedServer) -> None:
    server.greeting = b"554 5.3.2 sink.test not accepting mail\r\n"
    with pytest.raises(ServerUnavailable) as info:
        await connect(server)
    assert info.value.reply is not None and info.value.reply.code == 554


async def test_no_greeting_times_out_in_the_connect_phase(server: ScriptedServer) -> None:
    server.greet = False
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(LmtpTimeout) as info:
        await connect(server)
    assert info.value.phase == "connect"
    assert 0.25 < loop.time() - start < 1.5


async def test_no_reply_to_the_envelope_times_out(server: ScriptedServer) -> None:
    server.hang_after_lhlo = True
    conn = await connect(server)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(LmtpTimeout) as info:
        await conn.send("a@x", ["b@x", "c@x"], MESSAGE)
    assert 0.25 < loop.time() - start < 1.5
    assert info.value.phase == "command"
    assert info.value.partial_results == (None, None)
    assert info.value.data_sent is False
    assert not conn.is_reusable
    await conn.aclose()
    assert conn.is_closed


async def test_no_reply_after_the_payload_times_out(server: ScriptedServer) -> None:
    server.hang_after_payload = True
    conn = await connect(server)
    with pytest.raises(LmtpTimeout) as info:
        await conn.send("a@x", ["b@x"], MESSAGE)
    assert info.value.phase == "data"
    assert info.value.data_sent is True
    await conn.aclose()
    assert len(server.received) == 1


async def test_server_closing_mid_data(server: ScriptedServer) -> None:
    server.close_mid_data = True
    conn = await connect(server)
    with pytest.raises(ConnectionLost) as info:
        await conn.send("a@x", ["b@x", "c@x"], MESSAGE * 1000)
    assert info.value.data_sent is True
    assert info.value.partial_results == (None, None)
    assert info.value.temporary
    await conn.aclose()
    assert conn.is_closed


async def test_server_closing_between_per_recipient_replies(server: ScriptedServer) -> None:
    server.close_after_first_final = True
    conn = await connect(server)
    with pytest.raises(ConnectionLost) as info:
        await conn.send("a@x", ["b@x", "unknown@x", "c@x"], MESSAGE)
    partial = info.value.partial_results
    assert partial[0] is not None and partial[0].code == 250  # delivered: do not retry b@x
    assert partial[1] is not None and partial[1].code == 550
    assert partial[2] is None
    await conn.aclose()


async def test_cancelled_send_closes_the_connection(server: ScriptedServer) -> None:
    server.final_delay = 0.2
    conn = await connect(server)
    task = asyncio.create_task(conn.send("a@x", ["b@x"], MESSAGE))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not conn.is_reusable
    await conn.aclose()
    assert conn.is_closed


async def test_large_message_goes_through_write_flow_control(server: ScriptedServer) -> None:
    message = (b"y" * 65_000 + b"\r\n") * 128  # 8 MB: more than the socket buffers hold
    timeouts = LmtpTimeouts(connect=0.3, command=0.3, data=10.0)
    async with await connect(server, timeouts) as conn:
        assert codes(await conn.send("a@x", ["b@x"], message)) == [250]
    assert server.received[0].payload == encode_data(message)


async def test_each_phase_gets_its_own_deadline(server: ScriptedServer) -> None:
    """Replies that each come within the limit never time out, however long the
    connection lives; an idle connection has no deadline at all."""
    server.final_delay = 0.2  # each final reply within the 0.3 s data limit
    async with await connect(server) as conn:
        for _ in range(3):  # 0.6 s in all: twice the limit
            assert codes(await conn.send("a@x", ["b@x"], MESSAGE)) == [250]
        await asyncio.sleep(0.4)
        assert conn.is_reusable
        assert codes(await conn.send("a@x", ["b@x"], MESSAGE)) == [250]
    server.final_delay = 0.0
    server.hang_after_payload = True  # and a late deadline still fires
    conn = await connect(server)
    with pytest.raises(LmtpTimeout) as info:
        await conn.send("a@x", ["b@x"], MESSAGE)
    assert info.value.phase == "data"
    await conn.aclose()


async def test_server_that_stops_reading_the_payload_times_out(server: ScriptedServer) -> None:
    server.stall_after_354 = True
    conn = await connect(server)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(LmtpTimeout) as info:
        await conn.send("a@x", ["b@x"], (b"z" * 998 + b"\r\n") * 8000)
    assert 0.25 < loop.time() - start < 1.5
    assert info.value.phase == "data"
    await conn.aclose()


async def test_421_while_idle_is_reported_by_the_next_send(server: ScriptedServer) -> None:
    server.goodbye_after_transaction = True
    conn = await connect(server)
    assert codes(await conn.send("a@x", ["b@x"], MESSAGE)) == [250]
    await asyncio.sleep(0.15)
    assert not conn.is_reusable
    with pytest.raises(ServerUnavailable) as info:
        await conn.send("a@x", ["c@x"], MESSAGE)
    assert info.value.reply is not None and info.value.reply.enhanced == "4.4.2"
    assert info.value.partial_results == () and not info.value.data_sent
    await conn.aclose()
    assert len(server.received) == 1


async def test_aclose_does_not_wait_forever_for_quit(server: ScriptedServer) -> None:
    server.hang_on_quit = True
    conn = await connect(server)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await conn.aclose()
    assert loop.time() - start < 1.5
    assert conn.is_closed
    await conn.aclose()  # twice is fine


async def test_unopened_connection_refuses_to_send() -> None:
    conn = LmtpConnection("nowhere:24")
    assert not conn.is_reusable and not conn.is_closed
    with pytest.raises(LocalProtocolError):
        await conn.send("a@x", ["b@x"], MESSAGE)
    await conn.aclose()
    assert "nowhere:24" in repr(conn)


# -- pools --------------------------------------------------------------------------


async def test_pool_reuses_one_connection_for_many_messages(server: ScriptedServer) -> None:
    async with LmtpPool(server.endpoint, max_connections=4, timeouts=SHORT) as pool:
        for i in range(30):
            replies = await pool.send("a@x", [f"u{i}@x"], MESSAGE)
            assert codes(replies) == [250]
        assert pool.open_connections == 1
        assert pool.idle_connections == 1
    assert server.connections_total == 1
    assert len(server.received) == 30
    assert server.quits == 1
    assert pool.open_connections == 0


async def test_pool_caps_concurrency(server: ScriptedServer) -> None:
    server.final_delay = 0.03
    pool = LmtpPool(server.endpoint, max_connections=3, timeouts=SHORT)
    seen_in_use: list[int] = []

    async def one(i: int) -> list[Reply]:
        replies = await pool.send("a@x", [f"u{i}@x"], MESSAGE)
        seen_in_use.append(pool.in_use)
        return replies

    results = await asyncio.gather(*(one(i) for i in range(15)))
    assert all(codes(r) == [250] for r in results)
    assert server.max_concurrent <= 3
    assert server.connections_total == 3
    assert max(seen_in_use) <= 3
    assert pool.open_connections <= 3
    await pool.aclose()
    assert server.quits == 3


async def test_pool_over_a_unix_socket(unix_server: ScriptedServer) -> None:
    async with LmtpPool(unix_server.endpoint, timeouts=SHORT) as pool:
        assert pool.endpoint == Endpoint(path=unix_server.endpoint[5:])
        for _ in range(3):
            assert codes(await pool.send("a@x", ["b@x"], MESSAGE)) == [250]
    assert unix_server.connections_total == 1


async def test_stale_idle_connection_is_retried_once_on_a_fresh_one(
    server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.drop_on_transaction = 2  # every connection dies at its second MAIL
    async with LmtpPool(server.endpoint, timeouts=SHORT) as pool:
        assert codes(await pool.send("a@x", ["b@x"], MESSAGE)) == [250]
        with caplog.at_level(logging.DEBUG, logger="lmtp.pool"):
            assert codes(await pool.send("a@x", ["c@x"], MESSAGE)) == [250]
    assert "retrying" in caplog.text
    assert server.connections_total == 2
    assert [r.recipients for r in server.received] == [["b@x"], ["c@x"]]


async def test_stale_idle_connection_answering_421_is_retried(server: ScriptedServer) -> None:
    server.goodbye_on_transaction = 2
    async with LmtpPool(server.endpoint, timeouts=SHORT) as pool:
        assert codes(await pool.send("a@x", ["b@x"], MESSAGE)) == [250]
        assert codes(await pool.send("a@x", ["c@x"], MESSAGE)) == [250]
    assert server.connections_total == 2
    assert len(server.received) == 2


async def test_no_retry_once_the_payload_was_sent(server: ScriptedServer) -> None:
    server.drop_after_payload_on_transaction = 2
    async with LmtpPool(server.endpoint, timeouts=SHORT) as pool:
        await pool.send("a@x", ["b@x"], MESSAGE)
        with pytest.raises(ConnectionLost) as info:
            await pool.send("a@x", ["c@x"], MESSAGE)
        assert info.value.data_sent
        # the dead connection is gone; the next message gets a new one
        assert codes(await pool.send("a@x", ["d@x"], MESSAGE)) == [250]
    assert [r.recipients for r in server.received] == [["b@x"], ["c@x"], ["d@x"]]
    assert server.connections_total == 2


async def test_no_retry_after_a_fresh_connection_fails(server: ScriptedServer) -> None:
    server.drop_on_transaction = 1
    async with LmtpPool(server.endpoint, timeouts=SHORT) as pool:
        with pytest.raises(ConnectionLost):
            await pool.send("a@x", ["b@x"], MESSAGE)
    assert server.connections_total == 1


async def test_no_retry_after_a_timeout(server: ScriptedServer) -> None:
    async with LmtpPool(server.endpoint, timeouts=SHORT) as pool:
        await pool.send("a@x", ["b@x"], MESSAGE)
        server.hang_after_lhlo = True  # the idle connection stops answering
        with pytest.raises(LmtpTimeout):
            await pool.send("a@x", ["c@x"], MESSAGE)
        assert pool.idle_connections == 0
    assert server.connections_total == 1


async def test_idle_421_from_the_server_is_noticed(server: ScriptedServer) -> None:
    server.goodbye_after_transaction = True
    async with LmtpPool(server.endpoint, timeouts=SHORT) as pool:
        assert codes(await pool.send("a@x", ["b@x"], MESSAGE)) == [250]
        await asyncio.sleep(0.15)  # the 421 arrives while the connection is idle
        assert codes(await pool.send("a@x", ["c@x"], MESSAGE)) == [250]
    assert server.connections_total == 2
    assert len(server.received) == 2


async def test_idle_connections_expire(server: ScriptedServer) -> None:
    async with LmtpPool(server.endpoint, idle_timeout=0.1, timeouts=SHORT) as pool:
        await pool.send("a@x", ["b@x"], MESSAGE)
        assert pool.idle_connections == 1
        await asyncio.sleep(0.3)
        assert pool.idle_connections == 0
        assert pool.open_connections == 0
        assert server.quits == 1
        await pool.send("a@x", ["c@x"], MESSAGE)
    assert server.connections_total == 2


async def test_pool_connect_failure_propagates() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with LmtpPool(f"127.0.0.1:{port}", timeouts=SHORT) as pool:
        with pytest.raises(ConnectError):
            await pool.send("a@x", ["b@x"], MESSAGE)
        assert pool.open_connections == 0


async def test_closed_pool_refuses_work(server: ScriptedServer) -> None:
    pool = LmtpPool(server.endpoint, timeouts=SHORT)
    await pool.aclose()
    with pytest.raises(RuntimeError):
        await pool.send("a@x", ["b@x"], MESSAGE)


async def test_pools_are_keyed_by_endpoint(
    server: ScriptedServer, unix_server: ScriptedServer
) -> None:
    async with LmtpPools(max_connections=2, timeouts=SHORT) as pools:
        assert pools.get(server.endpoint) is pools.get(f" {server.endpoint} ")
        assert pools.get(server.endpoint) is pools.get(Endpoint.parse(server.endpoint))
        assert codes(await pools.send(server.endpoint, "a@x", ["b@x"], MESSAGE)) == [250]
        assert codes(await pools.send(unix_server.endpoint, "a@x", ["c@x"], MESSAGE)) == [250]
        assert len(pools) == 2
        assert pools.get(server.endpoint).max_connections == 2
    assert server.received[0].recipients == ["b@x"]
    assert unix_server.received[0].recipients == ["c@x"]
    assert server.quits == unix_server.quits == 1
    with pytest.raises(RuntimeError):
        pools.get(server.endpoint)
