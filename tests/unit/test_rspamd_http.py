"""RspamdClient's own HTTP/1.1 client (filters/rspamd.py) against tiny local servers.

Each test runs a bare asyncio server (`RawServer`, TCP on 127.0.0.1 or a UNIX socket)
whose per-connection handler the test writes itself, in raw bytes: keep-alive, chunked
bodies, a close before or in the middle of a reply, a trickle, garbage. The server counts
connections and requests, so a test can tell a reused connection from a new one and a
retried request from a single one. The parser is also fed byte by byte through a fake
transport, and the fake transport shows how many writes a request takes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from filters.rspamd import (
    RspamdClient,
    SpamResult,
    SpamScanError,
    _HttpConnection,
    url_problem,
)

REPLY = {"is_skipped": False, "score": 1.5, "required_score": 15.0, "action": "no action",
         "symbols": {"MIME_GOOD": {"name": "MIME_GOOD", "score": -0.1}},
         "message-id": "m@example.com", "time_real": 0.01}
BODY = json.dumps(REPLY).encode()
MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request from the client, or None at EOF before one."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode().split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in
                                                    lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, path, headers, body)


def response(body: bytes = BODY, status: int = 200, *, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{connection}\r\n").encode() + body


def chunked(body: bytes, sizes: tuple[int, ...] = (7, 1, 50)) -> bytes:
    out, pos, i = b"", 0, 0
    while pos < len(body):
        size = sizes[i % len(sizes)]
        piece = body[pos:pos + size]
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
        pos += size
        i += 1
    return out + b"0\r\nX-Trailer: yes\r\n\r\n"


Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter, int],
                   Awaitable[None]]


@dataclass
class RawServer:
    handler: Handler
    unix_path: Path | None = None
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    closed_by_client: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> RawServer:
        if self.unix_path is not None:
            self._server = await asyncio.start_unix_server(self._serve, str(self.unix_path))
        else:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def request(self, reader: asyncio.StreamReader) -> Request | None:
        request = await read_request(reader)
        if request is not None:
            self.requests.append(request)
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.handler(self, reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.active -= 1
            writer.close()
            self._tasks.discard(task)


async def keep_alive(server: RawServer, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, number: int) -> None:
    """Answers every request on the connection, keeping it open (HTTP/1.1 default)."""
    while (await server.request(reader)) is not None:
        writer.write(response())
        await writer.drain()
    server.closed_by_client += 1


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def make(handler: Handler, unix_path: Path | None = None) -> RawServer:
        server = await RawServer(handler, unix_path).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


async def scan(client: RspamdClient, message: bytes = MESSAGE) -> SpamResult:
    return await client.check(message, ip="192.0.2.1", helo="h.example", sender="a@example.com",
                              recipients=["b@example.net"], queue_id="Q1")


def client_for(server: RawServer, **kwargs: Any) -> RspamdClient:
    options: dict[str, Any] = {"timeout": 2.0, "max_size": 1 << 20, **kwargs}
    return RspamdClient(server.url, **options)


# -- bodies --------------------------------------------------------------------------------


async def test_chunked_reply(serve: Callable[..., Awaitable[RawServer]]) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        while await server.request(reader):
            raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY))
            for i in range(0, len(raw), 13):  # in pieces, as a slow network would
                writer.write(raw[i:i + 13])
                await writer.drain()
                await asyncio.sleep(0)

    server = await serve(handler)
    async with client_for(server) as client:
        first = await scan(client)
        second = await scan(client)  # after the trailer: the connection is reusable
    assert first == second
    assert (first.score, first.action, dict(first.symbols)) == (1.5, "no action",
                                                                 {"MIME_GOOD": -0.1})
    assert (server.connections, len(server.requests)) == (1, 2)


async def test_reply_to_eof_without_length(serve: Callable[..., Awaitable[RawServer]]) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + BODY)
        await writer.drain()
        writer.close()

    server = await serve(handler)
    async with client_for(server) as client:
        assert (await scan(client)).score == 1.5
        assert (await scan(client)).score == 1.5
    assert server.connections == 2  # read to EOF: never reused


async def test_interim_100_continue_is_skipped(
        serve: Callable[..., Awaitable[RawServer]]) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + response(close=True))

    server = await serve(handler)
    async with client_for(server) as client:
        assert (await scan(client)).score == 1.5


# -- connections ---------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(
        serve: Callable[..., Awaitable[RawServer]]) -> None:
    server = await serve(keep_alive)
    async with client_for(server) as client:
        await scan(client)
        await scan(client)
        assert await client.ping() is False  # our server answers JSON, not "pong"
    assert (server.connections, len(server.requests)) == (1, 3)
    assert [r.path for r in server.requests] == ["/checkv2", "/checkv2", "/ping"]
    await asyncio.sleep(0.05)
    assert server.closed_by_client == 1  # aclose() closed the idle connection


async def test_connection_close_is_honoured(
        serve: Callable[..., Awaitable[RawServer]]) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        while await server.request(reader):  # Rspamd 3.4: says close, then stays open a bit
            writer.write(response(close=True))

    server = await serve(handler)
    async with client_for(server) as client:
        await scan(client)
        await scan(client)
    assert (server.connections, len(server.requests)) == (2, 2)


@pytest.mark.parametrize(("connection", "connections"), [("Keep-Alive", 1), ("", 2)])
async def test_http10_keep_alive_only_when_asked(
        serve: Callable[..., Awaitable[RawServer]], connection: str, connections: int) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        while await server.request(reader):  # open either way: the client decides
            writer.write(f"HTTP/1.0 200 OK\r\nContent-Length: {len(BODY)}\r\n"
                         f"Connection: {connection}\r\n\r\n".encode() + BODY)

    server = await serve(handler)
    async with client_for(server) as client:
        await scan(client)
        await scan(client)
    assert (server.connections, len(server.requests)) == (connections, 2)


async def test_kept_alive_connection_closed_while_idle(
        serve: Callable[..., Awaitable[RawServer]]) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        await server.request(reader)
        writer.write(response())  # no "Connection: close", but closes right after
        await writer.drain()

    server = await serve(handler)
    async with client_for(server) as client:
        await scan(client)
        await asyncio.sleep(0.05)  # the client has seen the EOF while idle
        await scan(client)
    assert (server.connections, len(server.requests)) == (2, 2)  # no retry was needed


async def test_reused_connection_closed_before_reply_is_retried_once(
        serve: Callable[..., Awaitable[RawServer]]) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        await server.request(reader)
        if number == 1:
            writer.write(response())  # keep-alive...
            await writer.drain()
            await server.request(reader)  # ...but the next request gets no answer
            writer.transport.abort()  # a reset (the server's keep-alive timeout racing us)
            return
        writer.write(response(close=True))

    server = await serve(handler)
    async with client_for(server) as client:
        await scan(client)
        result = await scan(client)
    assert result.score == 1.5
    assert (server.connections, len(server.requests)) == (2, 3)


async def test_fresh_connection_closed_before_reply_is_not_retried(
        serve: Callable[..., Awaitable[RawServer]]) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        await server.request(reader)  # and close without a word

    server = await serve(handler)
    async with client_for(server) as client:
        with pytest.raises(SpamScanError, match=r"ServerDisconnected: .*without a response"):
            await scan(client)
    assert (server.connections, len(server.requests)) == (1, 1)


@pytest.mark.parametrize("reused", [False, True])
async def test_close_after_partial_reply_is_not_retried(
        serve: Callable[..., Awaitable[RawServer]], reused: bool) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        if reused:
            await server.request(reader)
            writer.write(response())
        await server.request(reader)
        writer.write(response()[:-10])  # the last 10 bytes of the JSON never come
        await writer.drain()

    server = await serve(handler)
    async with client_for(server) as client:
        if reused:
            await scan(client)
        with pytest.raises(SpamScanError, match="ServerDisconnected: reply incomplete after"):
            await scan(client)
    assert (server.connections, len(server.requests)) == (1, 2 if reused else 1)


async def test_close_in_the_middle_of_chunks(
        serve: Callable[..., Awaitable[RawServer]]) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunked(BODY)[:40])
        await writer.drain()

    server = await serve(handler)
    async with client_for(server) as client:
        with pytest.raises(SpamScanError, match="incomplete"):
            await scan(client)


async def test_connection_cap_with_keep_alive(
        serve: Callable[..., Awaitable[RawServer]]) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        while await server.request(reader):
            await asyncio.sleep(0.02)
            writer.write(response())

    server = await serve(handler)
    async with client_for(server, connections=2) as client:
        results = await asyncio.gather(*(scan(client) for _ in range(8)))
    assert len(results) == 8
    assert server.max_active <= 2 and server.connections == 2
    assert len(server.requests) == 8


async def test_unix_socket(serve: Callable[..., Awaitable[RawServer]],
                           tmp_path: Path) -> None:
    server = await serve(keep_alive, unix_path=tmp_path / "normal.sock")
    async with client_for(server) as client:
        assert client.base_url == f"unix:{tmp_path / 'normal.sock'}"
        assert (await scan(client)).score == 1.5
        assert (await scan(client)).score == 1.5
    assert (server.connections, len(server.requests)) == (1, 2)
    assert server.requests[0].headers["host"] == "localhost"
    assert server.requests[0].body == MESSAGE


async def test_unix_socket_missing(tmp_path: Path) -> None:
    async with RspamdClient(f"unix:{tmp_path / 'nothing.sock'}", timeout=1,
                            max_size=1000) as client:
        with pytest.raises(SpamScanError, match="FileNotFoundError"):
            await scan(client)


async def test_path_prefix_and_host_header(
        serve: Callable[..., Awaitable[RawServer]]) -> None:
    server = await serve(keep_alive)
    async with RspamdClient(server.url + "/rspamd/", timeout=1, max_size=1000) as client:
        await scan(client)
    request = server.requests[0]
    assert request.path == "/rspamd/checkv2"
    assert request.headers["host"] == server.url.removeprefix("http://")
    assert request.headers["content-length"] == str(len(MESSAGE))


async def test_host_name_is_resolved(serve: Callable[..., Awaitable[RawServer]]) -> None:
    server = await serve(keep_alive)
    url = server.url.replace("127.0.0.1", "localhost")
    async with RspamdClient(url, timeout=2, max_size=1000) as client:
        assert (await scan(client)).score == 1.5


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("trickle", [False, True])
async def test_slow_server_times_out(serve: Callable[..., Awaitable[RawServer]],
                                     trickle: bool) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        await server.request(reader)
        if trickle:  # a byte every 50 ms: the timeout covers the whole reply
            for byte in response():
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        await asyncio.sleep(10)

    server = await serve(handler)
    async with client_for(server, timeout=0.3) as client:
        started = time.monotonic()
        with pytest.raises(SpamScanError, match=r"timeout after 0\.3s"):
            await scan(client)
        assert 0.25 < time.monotonic() - started < 1.5
    assert server.connections == 1


async def test_timeout_counts_the_wait_for_a_connection_slot(
        serve: Callable[..., Awaitable[RawServer]]) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        await server.request(reader)
        await asyncio.sleep(10)

    server = await serve(handler)
    async with client_for(server, timeout=0.3, connections=1) as client:
        outcomes = await asyncio.gather(scan(client), scan(client), return_exceptions=True)
    assert all(isinstance(o, SpamScanError) and "timeout" in str(o) for o in outcomes)
    assert server.connections == 1


@pytest.mark.parametrize(("status", "body", "needle"), [
    (503, b"<html>busy</html>", "HTTP 503"),
    (500, b'{"error": "invalid command"}', "HTTP 500: invalid command"),
    (404, b"", "HTTP 404"),
])
async def test_non_200(serve: Callable[..., Awaitable[RawServer]], status: int, body: bytes,
                       needle: str) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        while await server.request(reader):
            writer.write(response(body, status))

    server = await serve(handler)
    async with client_for(server) as client:
        for _ in range(2):
            with pytest.raises(SpamScanError, match=needle):
                await scan(client)
        assert (await client.ping()) is False
    assert server.connections == 1  # an error reply read completely keeps the connection


@pytest.mark.parametrize(("raw", "needle"), [
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", "reply head larger"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 5000, "reply head larger"),
    (b"\x00\x01garbage\r\n\r\n", "bad HTTP status line"),
    (b"SMTP/1.1 200 OK\r\n\r\n", "bad HTTP status line"),
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "bad HTTP status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad HTTP header line"),
    (b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\n\r\n", "bad HTTP header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n", "bad HTTP header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
     "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n", "reply body larger"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
     "unsupported Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n",
     "bad chunk"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", "bad JSON"),
])
async def test_garbage_replies(serve: Callable[..., Awaitable[RawServer]], raw: bytes,
                               needle: str) -> None:
    async def handler(server: RawServer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, number: int) -> None:
        await server.request(reader)
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(5)  # keeps the connection open: the client must not wait

    server = await serve(handler)
    async with client_for(server, timeout=3) as client:
        started = time.monotonic()
        with pytest.raises(SpamScanError, match=needle):
            await scan(client)
        assert time.monotonic() - started < 1


# -- the parser and the writes, without a network ------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.writes.append(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    close = abort


@pytest.mark.parametrize("reply", [
    response(),
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY, (1, 2, 3)),
    b"HTTP/1.1 100 Continue\r\n\r\n" + response(),
])
async def test_parser_byte_by_byte(reply: bytes) -> None:
    connection = _HttpConnection()
    transport = FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    waiter = connection.send(b"POST /checkv2 HTTP/1.1\r\nContent-Length: 3\r\n\r\n", b"abc")
    assert transport.writes == [b"POST /checkv2 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"]
    for byte in reply:
        assert not waiter.done()
        connection.data_received(bytes([byte]))
    assert waiter.result() == (200, BODY, True)
    assert not connection.closed


async def test_request_is_one_write(serve: Callable[..., Awaitable[RawServer]],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    original = _HttpConnection.connection_made

    class Spy:  # uvloop's transports take no new attributes: a wrapper
        def __init__(self, transport: Any) -> None:
            self._transport = transport

        def write(self, data: bytes) -> None:
            writes.append(len(data))
            self._transport.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._transport, name)

    def spy(self: _HttpConnection, transport: Any) -> None:
        original(self, Spy(transport))

    monkeypatch.setattr(_HttpConnection, "connection_made", spy)
    server = await serve(keep_alive)
    big = MESSAGE + b"x" * 60_000
    async with client_for(server) as client:
        await scan(client, big)
    assert len(writes) == 1 and writes[0] > len(big)
    assert server.requests[0].body == big


def test_url_problem() -> None:
    for good in ("http://127.0.0.1:11333", "http://127.0.0.1:11333/", "http://[::1]:11333",
                 "https://rspamd.example/prefix", "unix:/run/rspamd/normal.sock"):
        assert url_problem(good) is None, good
    for bad in ("unix:run/rspamd.sock", "unix://run/x", "ftp://x", "http://", "127.0.0.1:11333",
                "http://h:99999", "http://h:1/?q=1", "http://u:p@h:1"):
        assert url_problem(bad), bad
        with pytest.raises(ValueError):
            RspamdClient(bad, timeout=1, max_size=1)
